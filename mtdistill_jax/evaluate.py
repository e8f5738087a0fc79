"""Batched evaluation of a TD-MPC2 agent on MT30 tasks: every task and episode in one compiled program.

Protocol (the official ``evaluate.py``): per task, ``episodes`` episodes of 500 agent steps (action repeat 2),
acting with the planner as ``agent.act(obs, t0=t==0, task=i)`` does (``mode='sample'``: an elite drawn by
score plus planner noise; ``'elite'`` / ``'mean'`` are available), score = mean over tasks of return / 10.
Here the K tasks x E episodes run as K*E environments side by side: the planner is vmapped over all of them
and the per-task physics is vmapped over episodes, inside one ``lax.scan`` of ``chunk`` steps that the
host calls 500/chunk times (so a progress bar with ETA can be shown).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.envs.registry import task_names
from mtdistill_jax.envs.score import normalized_return
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.planner import MODES, PlannerState, make_planner
from mtdistill_jax.xla_cpu import check_mapping_budget

EPISODE_LENGTH = 500


@dataclasses.dataclass
class EvalResult:
    tasks: list[str]
    returns: np.ndarray  # [K, E] episode returns
    mode: str
    seconds: float  # wall time of the rollouts (compile excluded)
    compile_seconds: float
    plan_calls: int  # planner calls (one per env per step)
    trajectories: dict | None = None  # task -> {qpos, qvel, act, info} of its first episode (record=True)
    seeds: tuple[int, ...] = ()  # PRNG seeds of the runs whose episodes these are (several after merge_results)
    episode_length: int = EPISODE_LENGTH

    @property
    def episodes_per_task(self) -> int:
        return int(self.returns.shape[1])

    @property
    def normalized(self) -> np.ndarray:  # [K]
        return normalized_return(self.returns.mean(axis=1))

    @property
    def normalized_score(self) -> float:
        return float(np.mean(self.normalized))

    def to_dict(self) -> dict:
        return {"normalized_score": self.normalized_score, "episodes_per_task": self.episodes_per_task,
                "mode": self.mode, "seeds": [int(s) for s in self.seeds], "episode_length": self.episode_length,
                "seconds": self.seconds, "compile_seconds": self.compile_seconds, "plan_calls": self.plan_calls,
                "tasks": [{"name": t, "returns": [float(x) for x in r], "mean": float(r.mean()),
                           "std": float(r.std()), "normalized": float(n)}
                          for t, r, n in zip(self.tasks, self.returns, self.normalized, strict=True)]}

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        """The inverse of :meth:`to_dict` (trajectories are not stored)."""
        try:
            tasks = [t["name"] for t in d["tasks"]]
            returns = np.asarray([t["returns"] for t in d["tasks"]], np.float64)
            if returns.ndim != 2 or returns.shape[1] < 1:
                raise ValueError(f"per-task returns must be equal-length, non-empty lists, got shape {returns.shape}")
            return cls(tasks=tasks, returns=returns, mode=d["mode"], seconds=float(d.get("seconds", 0.0)),
                       compile_seconds=float(d.get("compile_seconds", 0.0)),
                       plan_calls=int(d.get("plan_calls", 0)), seeds=tuple(int(s) for s in d.get("seeds", ())),
                       episode_length=int(d.get("episode_length", EPISODE_LENGTH)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not an evaluation result (see EvalResult.to_dict): {e!r}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        """Read a result ``.json`` written by :func:`write_outputs`; errors name the file."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            d = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise UserError(f"{path}: not a JSON file ({e})") from None
        try:
            return cls.from_dict(d)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None

    def table(self) -> str:
        rows = [f"| task | return (mean ± std over {self.episodes_per_task}) | normalized |", "|---|---|---|"]
        for t, r, n in zip(self.tasks, self.returns, self.normalized, strict=True):
            rows.append(f"| {t} | {r.mean():.1f} ± {r.std():.1f} | {n:.2f} |")
        rows.append(f"| **MT30 normalized score** ({len(self.tasks)} tasks) | | **{self.normalized_score:.2f}** |")
        return "\n".join(rows)


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """Pool the episodes of several runs of the same evaluation made with different seeds.

    Lets the episodes of one evaluation be spread over several processes or machines (e.g. one 1-episode
    all-MT30 run per CPU core, or per seed on a machine too small for the batched program): the result is
    what one run with all their episodes per task reports. Runs must share tasks (same order), planner mode
    and episode length, and record distinct seeds (a repeated seed repeats the same episodes).
    """
    results = list(results)
    if not results:
        raise UserError("nothing to merge")
    first = results[0]
    seeds: list[int] = []
    for i, r in enumerate(results):
        if r.tasks != first.tasks:
            raise UserError(f"run {i} has tasks {r.tasks}, run 0 has {first.tasks}")
        if r.mode != first.mode or r.episode_length != first.episode_length:
            raise UserError(f"run {i} used mode {r.mode!r} / episode length {r.episode_length}, run 0 "
                             f"{first.mode!r} / {first.episode_length}")
        if not r.seeds:
            raise UserError(f"run {i} records no seed, so its episodes cannot be told apart from the others'")
        repeated = sorted(set(seeds) & set(r.seeds))
        if repeated:
            raise UserError(f"seed(s) {repeated} appear in more than one run: their episodes would be counted twice")
        seeds += list(r.seeds)
    return EvalResult(tasks=list(first.tasks), returns=np.concatenate([r.returns for r in results], axis=1),
                      mode=first.mode, seconds=sum(r.seconds for r in results),
                      compile_seconds=sum(r.compile_seconds for r in results),
                      plan_calls=sum(r.plan_calls for r in results), seeds=tuple(seeds),
                      episode_length=first.episode_length)


class Progress:
    """A one-line progress bar with rate and ETA on stderr (no dependency)."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        eta = el / max(done, 1) * (self.total - done)
        width = 30
        bar = "#" * int(width * done / self.total) + "-" * (width - int(width * done / self.total))
        end = "\n" if done >= self.total else "\r"
        self.stream.write(f"{self.label} [{bar}] {done}/{self.total} steps  {el:6.0f}s elapsed  ETA {eta:6.0f}s{end}")
        self.stream.flush()


def first_episode_states(state):
    """Per task, what rendering needs of its first env (qpos, qvel, act, task info) in a MultiTaskState."""
    return tuple({"qpos": g.env.data.qpos[0], "qvel": g.env.data.qvel[0], "act": g.env.data.act[0],
                  "info": jax.tree_util.tree_map(lambda x: x[0], g.env.info)} for g in state.groups)


def make_eval_program(config: ml_collections.ConfigDict, tasks: Sequence[str], episodes: int, mode: str = "sample",
                      chunk: int = 10, impls: dict[str, str] | None = None, episode_length: int = EPISODE_LENGTH,
                      record: bool = False):
    """``(env, init(key) -> carry, run_chunk(params, carry) -> (carry, recorded))`` for K tasks x ``episodes``.

    ``carry`` = (env state, planner warm start, step t, returns [K*E], key); ``run_chunk`` advances every
    env by ``chunk`` agent steps inside one compiled ``lax.scan``. With ``record``, ``recorded`` holds per
    task the physics state (qpos, qvel, act, info) of its first episode after each step, else None.
    """
    from mtdistill_jax.envs.multitask import MultiTaskEnv  # imports MuJoCo/MJX: only once arguments are checked

    check_eval_args(config.model.task_set, tasks, episodes, mode, chunk, episode_length)
    ts = get_task_set(config.model.task_set)
    env = MultiTaskEnv(tasks, episodes, ts, episode_length=episode_length, auto_reset=False, impls=impls)
    plan = make_planner(make_world_model(config.model), config)
    B = env.num_envs
    H, A = config.planner.horizon, ts.action_pad

    def init(key):
        k_env, k_plan = jax.random.split(key)
        return (env.reset(k_env), PlannerState(prev_mean=jnp.zeros((B, H, A), jnp.float32)),
                jnp.zeros((), jnp.int32), jnp.zeros((B,), jnp.float32), k_plan)

    def run_chunk(params, carry):
        def step(c, _):
            es, ps, t, ret, key = c
            key, k = jax.random.split(key)
            t0 = jnp.broadcast_to(t == 0, (B,))
            action, mean = plan(params, es.obs, es.task, ps.prev_mean, t0, k, mode)
            es = env.step(es, action)
            rec = first_episode_states(es) if record else None
            return (es, PlannerState(prev_mean=mean), t + 1, ret + es.reward, key), rec

        return jax.lax.scan(step, carry, None, length=chunk)

    return env, init, run_chunk


def check_eval_args(task_set: str, tasks: Sequence[str] | None = None, episodes: int = 10, mode: str = "sample",
                    chunk: int = 10, episode_length: int = EPISODE_LENGTH) -> list[str]:
    """The tasks to evaluate (default: the whole task set), after checking every argument of :func:`evaluate`
    (cheaply: nothing is built or compiled); a bad one raises a :class:`~mtdistill_jax.errors.UserError`
    saying what is valid."""
    ts = get_task_set(task_set)
    tasks = ts.select(tasks)
    no_env = [t for t in tasks if t not in task_names()]
    if no_env:
        raise UserError(f"no MJX environment for {no_env} (Meta-World tasks of {ts.name} are supported offline "
                        f"only); tasks that can be evaluated: {', '.join(task_names())}")
    if episodes < 1:
        raise UserError(f"episodes must be >= 1, got {episodes}")
    if mode not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {mode!r}")
    if episode_length < 1:
        raise UserError(f"episode_length must be >= 1, got {episode_length}")
    if chunk < 1 or episode_length % chunk:
        raise UserError(f"chunk {chunk} must divide the episode length {episode_length}")
    return tasks


def evaluate(params, config: ml_collections.ConfigDict, tasks: Sequence[str] | None = None, episodes: int = 10,
             seed: int = 1, mode: str = "sample", chunk: int = 10, progress: bool = True,
             impls: dict[str, str] | None = None, on_chunk: Callable[[int], None] | None = None,
             episode_length: int = EPISODE_LENGTH, record: bool = False) -> EvalResult:
    """Evaluate ``params`` (a WorldModel tree) on ``tasks`` (default: the whole task set) with the official
    protocol; returns per-task episode returns and the normalized score. ``episode_length`` below 500 is
    for smoke tests and quick looks only (scores are then not comparable)."""
    tasks = check_eval_args(config.model.task_set, tasks, episodes, mode, chunk, episode_length)
    check_mapping_budget(len(tasks), jax.default_backend())
    env, init, run_chunk = make_eval_program(config, tasks, episodes, mode, chunk, impls, episode_length, record)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    carry = jax.jit(init)(jax.random.key(seed))
    first = None
    if record:  # the reset state, so videos start at t = 0
        first = [jax.tree_util.tree_map(lambda x: np.asarray(x)[None], first_episode_states(carry[0]))]
    t = time.perf_counter()
    run = jax.jit(run_chunk, donate_argnums=(1,)).lower(params, carry).compile()
    compile_s = time.perf_counter() - t
    bar = Progress(episode_length, f"eval {len(tasks)} tasks x {episodes} episodes", progress)
    t = time.perf_counter()
    for i in range(episode_length // chunk):
        carry, rec = run(params, carry)
        jax.block_until_ready(carry[3])
        if record:
            first.append(jax.tree_util.tree_map(np.asarray, rec))
        bar.update((i + 1) * chunk)
        if on_chunk is not None:
            on_chunk((i + 1) * chunk)
    seconds = time.perf_counter() - t
    returns = np.asarray(carry[3], np.float64).reshape(len(tasks), episodes)
    trajectories = None
    if record:
        stacked = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *first)
        trajectories = dict(zip(tasks, stacked, strict=True))
    return EvalResult(tasks=tasks, returns=returns, mode=mode, seconds=seconds, compile_seconds=compile_s,
                      plan_calls=episode_length * env.num_envs, trajectories=trajectories, seeds=(seed,),
                      episode_length=episode_length)


def save_videos(result: EvalResult, workdir: str, fps: float = 25.0, height: int = 240, width: int = 320,
                tasks: Sequence[str] | None = None) -> dict[str, str]:
    """One mp4 per task of its first recorded episode (needs ``evaluate(..., record=True)``)."""
    import types

    from mtdistill_jax.envs import make
    from mtdistill_jax.envs.render import render_frames, save_video

    if result.trajectories is None:
        raise ValueError("no trajectories recorded: run evaluate(..., record=True)")
    os.makedirs(workdir, exist_ok=True)
    out = {}
    for task in tasks or result.tasks:
        traj = result.trajectories[task]
        T = traj["qpos"].shape[0]
        states = [types.SimpleNamespace(
            data=types.SimpleNamespace(qpos=traj["qpos"][i], qvel=traj["qvel"][i], act=traj["act"][i]),
            info=jax.tree_util.tree_map(lambda x, i=i: x[i], traj["info"])) for i in range(T)]
        frames = render_frames(make(task), states, height=height, width=width)
        out[task] = save_video(frames, os.path.join(workdir, f"{task}.mp4"), fps)
    return out


def write_outputs(result: EvalResult, workdir: str, name: str = "eval", command: str | None = None) -> dict[str, str]:
    """``<name>.json``, ``<name>.csv``, ``<name>.md`` and a per-task bar chart ``<name>.png`` in ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, f"{name}.{k}") for k in ("json", "csv", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    with open(paths["csv"], "w") as f:
        f.write("task,mean,std,normalized," + ",".join(f"ep{i}" for i in range(result.episodes_per_task)) + "\n")
        for t, r, n in zip(result.tasks, result.returns, result.normalized, strict=True):
            f.write(f"{t},{r.mean():.3f},{r.std():.3f},{n:.4f}," + ",".join(f"{x:.3f}" for x in r) + "\n")
    with open(paths["md"], "w") as f:
        if command:
            f.write(f"Command: `{command}`\n\n")
        seeds = ", ".join(map(str, result.seeds)) or "not recorded"
        f.write(f"{result.episodes_per_task} episode(s) per task of {result.episode_length} agent steps, planner "
                f"mode `{result.mode}`, seed(s) {seeds}.\n\n")
        f.write(result.table() + "\n")
    plot_bars(result, paths["png"])
    return paths


def plot_bars(result: EvalResult, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(result.tasks) + 2), 4))
    x = np.arange(len(result.tasks))
    ax.bar(x, result.normalized, yerr=result.returns.std(axis=1) / 10, capsize=2, color="#4c72b0")
    ax.set_xticks(x, result.tasks, rotation=75, ha="right", fontsize=8)
    ax.set_ylabel("normalized return (return / 10)")
    ax.set_ylim(0, 100)
    ax.set_title(f"normalized score {result.normalized_score:.2f} ({result.episodes_per_task} episodes/task, "
                 f"mode {result.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
