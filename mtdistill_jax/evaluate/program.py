"""The batched evaluation program: every task and episode in one compiled ``lax.scan``.

Protocol (the official ``evaluate.py``): per task, ``episodes`` episodes of the task set's episode length
(MT30: 500 agent steps, action repeat 2), acting with the planner as ``agent.act(obs, t0=t==0, task=i)`` does
(``mode='sample'``: an elite drawn by score plus planner noise; ``'elite'`` = official ``eval_mode=True``
and ``'mean'`` are available), score = mean over tasks of return / 10. Here the K tasks x E episodes run as
K*E environments side by side: each step is one :func:`~mtdistill_jax.acting.env_step` (the planner policy,
vmapped over all envs, then the per-task physics, vmapped over episodes), with ``t0`` read from each env's
``first`` flag; ``chunk`` steps run inside one ``lax.scan`` that the host calls length/chunk times (so a
progress bar with ETA can be shown).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from mtdistill_jax import math as tdmath
from mtdistill_jax.acting import env_step
from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.envs.registry import task_names
from mtdistill_jax.errors import UserError
from mtdistill_jax.evaluate.result import EvalResult
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.planner import MODES, PRIOR_MODES, init_planner_state, make_plan_policy
from mtdistill_jax.tdmpc2.planner import compiler_options as planner_compiler_options
from mtdistill_jax.xla_cpu import check_mapping_budget


@flax.struct.dataclass
class EvalCarry:
    """What the evaluation scan carries: the env state, the policy state, per-env returns [K*E] and the key."""

    env_state: Any
    policy_state: Any
    returns: jax.Array
    key: jax.Array


def episode_length_of(task_set: str, tasks: Sequence[str], episode_length: int | None = None) -> int:
    """``episode_length`` if given, else the task set's episode length shared by ``tasks`` (MT30: 500)."""
    if episode_length is not None:
        return int(episode_length)
    ts = get_task_set(task_set)
    lengths = {ts.episode_lengths[ts.task_id(t)] for t in tasks}
    if len(lengths) != 1:
        raise UserError(f"tasks {list(tasks)} have different episode lengths {sorted(lengths)}; evaluate them "
                        f"separately")
    return lengths.pop()


POLICIES = ("planner", "prior")  # MPPI (the official act) / the policy prior alone (official mpc=False)


def make_actor(config: ml_collections.ConfigDict, policy: str = "planner", mode: str = "sample",
               noise: float = 0.0) -> Callable:
    """The actor policy ``(params, obs, task, first, state, key) -> (action, state)`` of an evaluation or a
    collection: ``policy='planner'`` (MPPI, ``mode`` in sample/elite/mean) or ``'prior'`` (the policy prior,
    ``mode`` sample/mean); ``noise > 0`` adds N(0, noise^2) to every used action dimension (padding stays 0)
    and clips to [-1, 1], for exploration data."""
    from mtdistill_jax.nn.world_model import action_masks
    from mtdistill_jax.tdmpc2.planner import make_prior_policy

    model = make_world_model(config.model)
    act = make_plan_policy(model, config, mode) if policy == "planner" else make_prior_policy(model, config, mode)
    if not noise:
        return act
    masks = jnp.asarray(action_masks(config.model.task_set))

    def noisy(params, obs, task, first, state, key):
        k_act, k_noise = jax.random.split(key)
        action, state = act(params, obs, task, first, state, k_act)
        eps = noise * tdmath.normal(k_noise, action.shape, action.dtype) * masks[task]
        return jnp.clip(action + eps, -1.0, 1.0), state

    return noisy


def make_eval_program(config: ml_collections.ConfigDict, tasks: Sequence[str], episodes: int, mode: str = "sample",
                      chunk: int = 10, impls: dict[str, str] | None = None, episode_length: int | None = None,
                      record: bool = False, *, policy: str = "planner", noise: float = 0.0,
                      transitions: bool = False, share_physics: bool = True):
    """``(env, init(key) -> EvalCarry, run_chunk(params, carry) -> (carry, recorded))`` for K tasks x ``episodes``.

    ``run_chunk`` advances every env by ``chunk`` agent steps inside one compiled ``lax.scan``. With
    ``record``, ``recorded`` holds per task the render state (qpos, qvel, act, info) of its first episode
    after each step (``env.task_render_states``); with ``transitions`` it holds the
    :class:`~mtdistill_jax.acting.Transition` of every env and step (``[chunk, K*E, ...]``, rows task-major);
    with both, ``(render states, transitions)``; else None. ``policy``/``noise``: :func:`make_actor`.
    ``share_physics=False`` traces one physics model per task instead of one per physics structure (slower to
    compile; for comparisons, see ``benchmarks/compile_eval.py``).
    """
    from mtdistill_jax.envs.multitask import MultiTaskEnv  # imports MuJoCo/MJX: only once arguments are checked

    tasks = check_eval_args(config.model.task_set, tasks, episodes, mode, chunk, episode_length, policy)
    ts = get_task_set(config.model.task_set)
    env = MultiTaskEnv(tasks, episodes, ts, episode_length=episode_length_of(ts.name, tasks, episode_length),
                       auto_reset=False, impls=impls, share_physics=share_physics)
    actor = make_actor(config, policy, mode, noise)

    def init(key):
        k_env, k_plan = jax.random.split(key)
        policy_state = init_planner_state(config, env.num_envs) if policy == "planner" else ()
        return EvalCarry(env_state=env.reset(k_env), policy_state=policy_state,
                         returns=jnp.zeros((env.num_envs,), jnp.float32), key=k_plan)

    def run_chunk(params, carry: EvalCarry):
        def step(c: EvalCarry, _):
            key, k = jax.random.split(c.key)
            es, ps, tr = env_step(env, actor, params, c.env_state, c.policy_state, k)
            rec = env.task_render_states(es) if record else None
            if transitions:
                rec = tr if rec is None else (rec, tr)
            return EvalCarry(env_state=es, policy_state=ps, returns=c.returns + tr.reward, key=key), rec

        return jax.lax.scan(step, carry, None, length=chunk)

    return env, init, run_chunk


def check_eval_args(task_set: str, tasks: Sequence[str] | None = None, episodes: int = 10, mode: str = "sample",
                    chunk: int = 10, episode_length: int | None = None, policy: str = "planner") -> list[str]:
    """The tasks to evaluate (default: the whole task set), after checking every argument of :func:`evaluate`
    (cheaply: nothing is built or compiled); a bad one raises a :class:`~mtdistill_jax.errors.UserError`
    saying what is valid. ``episode_length`` None: the task set's."""
    ts = get_task_set(task_set)
    tasks = ts.select(tasks)
    no_env = [t for t in tasks if t not in task_names()]
    if no_env:
        raise UserError(f"no MJX environment for {no_env} (Meta-World tasks of {ts.name} are supported offline "
                        f"only); tasks that can be evaluated: {', '.join(task_names())}")
    if episodes < 1:
        raise UserError(f"episodes must be >= 1, got {episodes}")
    if policy not in POLICIES:
        raise UserError(f"policy must be one of {POLICIES}, got {policy!r}")
    modes = MODES if policy == "planner" else PRIOR_MODES
    if mode not in modes:
        raise UserError(f"mode must be one of {modes} for the {policy}, got {mode!r}")
    if episode_length is not None and episode_length < 1:
        raise UserError(f"episode_length must be >= 1, got {episode_length}")
    length = episode_length_of(ts.name, tasks, episode_length)
    if chunk < 1 or length % chunk:
        raise UserError(f"chunk {chunk} must divide the episode length {length}")
    return tasks


def compile_eval_program(init: Callable, run_chunk: Callable, params, key: jax.Array | None = None, *,
                         donate: bool = True, side_by_side: bool = True,
                         compiler_options: dict | None = None) -> tuple[Any, Any, dict[str, float]]:
    """``(init, run, seconds)``: :func:`make_eval_program`'s ``init`` and ``run_chunk`` compiled, side by side.

    Each XLA:CPU compile keeps about one core busy, and the reset (whose tasks' initial-state draws trace their own
    physics) is a third of the 30-task program's compile, so the two overlap: ``run_chunk`` is lowered for the
    shapes ``init`` returns (traced, not run) and compiles in a worker thread while ``init`` is lowered and
    compiled in another (all 30 MT30 tasks on 2 cores: 4.5-4.6 instead of 6.0-6.1 min, peak RSS 5.6-5.7 instead
    of 4.4-4.6 GiB; ``benchmarks/compile_eval.py``). ``side_by_side=False`` compiles one after the other. ``run``
    donates its carry unless ``donate`` is False. ``seconds``: ``lower`` (tracing and lowering both), ``init`` and
    ``run`` (each compile's own wall time) and ``compile`` (from the first compile's start to the last one's end).
    ``compiler_options``: XLA options for ``run_chunk``'s program, the one that runs the model (e.g.
    :func:`mtdistill_jax.tdmpc2.planner.compiler_options`).
    """
    key = jax.random.key(0) if key is None else key
    seconds: dict[str, float] = {}

    def compile_one(name, lowered):
        t0 = time.perf_counter()
        out = lowered.compile()
        seconds[name] = time.perf_counter() - t0
        return out

    t = time.perf_counter()
    with ThreadPoolExecutor(2 if side_by_side else 1, thread_name_prefix="compile-eval") as pool:
        traced_init = jax.jit(init).trace(key)
        lowered_run = jax.jit(run_chunk, donate_argnums=(1,) if donate else (),
                              compiler_options=compiler_options).lower(params, traced_init.out_info)
        lowered_at = time.perf_counter()
        run_f = pool.submit(compile_one, "run", lowered_run)  # the longer compile first
        if not side_by_side:
            run_f.result()
        t_init = time.perf_counter()
        lowered_init = traced_init.lower()  # meanwhile, side by side (XLA releases the GIL while it compiles)
        seconds["lower"] = lowered_at - t + time.perf_counter() - t_init
        init_f = pool.submit(compile_one, "init", lowered_init)
        compiled_init, compiled_run = init_f.result(), run_f.result()
    seconds["compile"] = time.perf_counter() - lowered_at
    return compiled_init, compiled_run, seconds


_PROGRAMS: OrderedDict = OrderedDict()  # compiled rollout programs of this process (see compiled_program)
MAX_PROGRAMS = 8  # most compiled programs kept; the least recently used is dropped first


def compiled_program(config: ml_collections.ConfigDict, tasks: Sequence[str], episodes: int, mode: str = "sample",
                     chunk: int = 10, episode_length: int | None = None, *, params, policy: str = "planner",
                     noise: float = 0.0, record: bool = False, transitions: bool = False,
                     impls: dict[str, str] | None = None, side_by_side: bool = True):
    """``(env, init, run, compile_seconds)``: :func:`make_eval_program` built, jitted and compiled for ``params``'
    shapes, once per process for everything that shapes it (config, tasks, episodes, mode, chunk, length, policy,
    noise, outputs, params shapes and dtypes); ``compile_seconds`` is 0 when this process already had it.
    ``side_by_side``: :func:`compile_eval_program`'s (False: less peak memory, a longer compile).

    Building the MJX tasks and compiling the rollout dominate a short evaluation or collection (minutes for a
    few tasks on CPU), so evaluations of many agents or checkpoints in one process, collections with several
    seeds and the periodic evaluation of a training run all reuse one program. ``run`` donates its carry.
    """
    tasks = tuple(tasks)
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(params))
    from mtdistill_jax.configs.tasks import task_discounts

    key = (config.model.to_json(), config.planner.to_json(), tuple(task_discounts(config).tolist()), tasks, episodes,
           mode, chunk, episode_length, policy, float(noise), record, transitions,
           tuple(sorted((impls or {}).items())), shapes)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return (*_PROGRAMS[key], 0.0)
    t = time.perf_counter()
    env, init, run_chunk = make_eval_program(config, list(tasks), episodes, mode, chunk, impls, episode_length,
                                             record, policy=policy, noise=noise, transitions=transitions)
    check_mapping_budget(len(env.structures), jax.default_backend())  # before compiling: an error, not a crash
    init, run, _ = compile_eval_program(init, run_chunk, params, side_by_side=side_by_side,
                                        compiler_options=planner_compiler_options(config))
    _PROGRAMS[key] = (env, init, run)
    while len(_PROGRAMS) > MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return env, init, run, time.perf_counter() - t


def clear_program_cache() -> None:
    """Drop the compiled programs :func:`compiled_program` keeps (with ``jax.clear_caches()``, this releases
    their code and memory mappings)."""
    _PROGRAMS.clear()


def evaluate(params, config: ml_collections.ConfigDict, tasks: Sequence[str] | None = None, episodes: int = 10,
             seed: int = 1, mode: str = "sample", chunk: int = 10, progress: bool = True,
             impls: dict[str, str] | None = None, on_chunk: Callable[[int], None] | None = None,
             episode_length: int | None = None, record: bool = False, policy: str = "planner",
             side_by_side: bool = True) -> EvalResult:
    """Evaluate ``params`` (a WorldModel tree) on ``tasks`` (default: the whole task set) with the official
    protocol; returns per-task episode returns and the normalized score. ``episode_length`` defaults to the
    task set's (MT30: 500); shorter is for smoke tests and quick looks only (scores are then not comparable).
    ``policy='prior'`` acts with the policy prior alone (official ``mpc=False``; ``mode`` sample or mean)
    instead of the planner. The compiled program is kept for later calls in this process
    (:func:`compiled_program`): evaluating another agent of the same shapes does not compile again. Its reset and
    step chunk compile side by side (:func:`compile_eval_program`); ``side_by_side=False`` compiles them one after
    the other, for less peak memory (all 30 MT30 tasks on a 2-core CPU: 4.4-4.6 instead of 5.6-5.7 GiB, 6.0-6.1
    instead of 4.5-4.6 min)."""
    tasks = check_eval_args(config.model.task_set, tasks, episodes, mode, chunk, episode_length, policy)
    episode_length = episode_length_of(config.model.task_set, tasks, episode_length)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    env, init, run, compile_s = compiled_program(config, tasks, episodes, mode, chunk, episode_length, params=params,
                                                 policy=policy, record=record, impls=impls,
                                                 side_by_side=side_by_side)
    carry = init(jax.random.key(seed))
    first = None
    if record:  # the reset state, so videos start at t = 0
        first = [jax.tree_util.tree_map(lambda x: np.asarray(x)[None], env.task_render_states(carry.env_state))]
    t = time.perf_counter()
    with tqdm(total=episode_length, desc=f"eval {len(tasks)} tasks x {episodes} episodes", unit="step",
              disable=not progress, leave=True) as bar:
        for i in range(episode_length // chunk):
            carry, rec = run(params, carry)
            jax.block_until_ready(carry.returns)
            if record:
                first.append(jax.tree_util.tree_map(np.asarray, rec))
            bar.update(chunk)
            if on_chunk is not None:
                on_chunk((i + 1) * chunk)
    seconds = time.perf_counter() - t
    returns = np.asarray(carry.returns, np.float64).reshape(len(tasks), episodes)
    trajectories = None
    if record:
        stacked = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *first)
        trajectories = dict(zip(tasks, stacked, strict=True))
    return EvalResult(tasks=tasks, returns=returns, mode=mode if policy == "planner" else f"{policy}/{mode}",
                      seconds=seconds, compile_seconds=compile_s, plan_calls=episode_length * env.num_envs,
                      trajectories=trajectories, seeds=(seed,), episode_length=episode_length)
