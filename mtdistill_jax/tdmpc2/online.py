"""Online TD-MPC2 in one compiled program: env step, planning, replay and updates inside one loop.

The official ``online_trainer.py`` runs one env: act (random actions for the first ``seed_steps`` steps) -> step
-> add to the buffer when the episode ends -> one update per env step after the seed steps, and at the step the
seed phase ends as many updates as there were seed steps (pretraining on the seed data). :class:`OnlineLoop`
does the same for ``M`` envs stepping in lockstep (any MT30 subset x N envs per task, one
:class:`~mtdistill_jax.envs.multitask.MultiTaskEnv`): one *agent step* is M env steps, and

- during the seed phase (agent steps ``0 .. S`` with ``S = seed_agent_steps = max(ceil(seed_steps / M), T)``:
  the official trainer acts randomly while ``step <= seed_steps``, and here at least one whole episode is
  collected, the buffer's unit) the actions are uniform in [-1, 1] on each task's used action dims, as the
  official ``torch.rand`` actions;
- afterwards the actor is the planner (:func:`~mtdistill_jax.tdmpc2.planner.make_plan_policy`, official
  ``act`` in training mode: ``mode='sample'``);
- the episodes go to the on-device :class:`~mtdistill_jax.data.replay.ReplayBuffer` step by step (sampleable once
  complete);
- ``utd`` updates per env step after the seed phase (official 1; fractions accumulate, so ``utd=1/16`` with
  M = 16 is one update per agent step), and at agent step ``S`` ``seed_updates`` updates at once (official: as
  many as seed steps, at ``step == seed_steps``), then ``utd * M`` per agent step from ``S + 1`` on. Each
  update is the library's update function (``make_update_fn`` or a distillation update), on a batch from the
  buffer.

:meth:`OnlineLoop.train_chunk` runs ``K`` agent steps (``K`` traced: one compiled program for every chunk
length) as one pure function of the :class:`OnlineCarry` (learner state, replay state, env state, planner state,
key, counters); jit it with the carry donated. Python only runs between chunks (logging, evaluation,
checkpoints): :func:`train_online` is the whole run (config -> envs -> loop -> checkpoints, metrics, evaluation),
with the host side shared with the offline loop (:class:`~mtdistill_jax.tdmpc2.host_loop.HostLoop`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax import math as tdmath
from mtdistill_jax.acting import Transition
from mtdistill_jax.data.replay import ReplayBuffer, ReplayState
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.planner import compiler_options as planner_compiler_options
from mtdistill_jax.tdmpc2.planner import init_planner_state, make_plan_policy
from mtdistill_jax.tdmpc2.train import TrainingState, init_training_state, make_update_fn

log = logging.getLogger(__name__)

OFFICIAL_MIN_SEED_STEPS = 1000  # official seed_steps = max(1000, 5 * episode_length)


@flax.struct.dataclass
class OnlineCarry:
    """Everything the online loop carries from one agent step to the next (and what a checkpoint saves)."""

    learner: TrainingState
    replay: ReplayState
    env_state: Any
    policy_state: Any
    key: jax.Array
    agent_steps: jax.Array  # int32: agent steps taken (M env steps each)
    update_credit: jax.Array  # float32: updates owed but not yet run (fractional utd)
    updates: jax.Array  # int32: updates run
    returns: jax.Array  # [M] float32: return of each env's current episode so far


@flax.struct.dataclass
class ChunkStats:
    """Sums over a chunk: ``metrics`` (update metrics summed over its updates), ``num_updates``, and the returns of
    the episodes that ended in it (``episode_return_sum`` [M], ``episodes`` [M] count per env), and whether the
    learner's params are all finite after it."""

    metrics: dict
    num_updates: jax.Array
    episode_return_sum: jax.Array
    episodes: jax.Array
    params_finite: jax.Array  # bool: every float leaf of the learner's params is finite at the chunk's end


def default_seed_steps(episode_length: int) -> int:
    """The official ``seed_steps``: ``max(1000, 5 * episode_length)`` env steps."""
    return max(OFFICIAL_MIN_SEED_STEPS, 5 * int(episode_length))


class OnlineLoop:
    """``loop = OnlineLoop(config, env)``; ``carry = loop.init(key)``; ``carry, stats = loop.train_chunk_jit(carry,
    K)`` (``jit(loop.train_chunk, donate_argnums=0)``, compiled with ``loop.compiler_options``, the planner's
    :func:`~mtdistill_jax.tdmpc2.planner.compiler_options`: for a planner computing in bf16 on CPU, YNNPACK's
    single-dot path, the CPU's bf16 units).

    ``env``: a batched env with a common episode length (e.g. ``MultiTaskEnv(tasks, N)``, ``auto_reset=True``);
    ``config``: the training config (``config.train`` hyperparameters, ``config.planner``, ``config.model``);
    ``update_fn``: ``(state, batch, key) -> (state, metrics)`` (default: the TD-MPC2 update of ``config``);
    ``seed_steps`` (env steps, default official), ``seed_updates`` (default: ``seed_steps``), ``utd`` (updates per
    env step, default 1), ``capacity`` (transitions, default ``min(config.steps, 1M)``: the official
    ``min(steps, 1M)``, ``config.steps`` counting env steps).
    """

    def __init__(self, config: ml_collections.ConfigDict, env, *, update_fn: Callable | None = None,
                 seed_steps: int | None = None, seed_updates: int | None = None, utd: float = 1.0,
                 capacity: int | None = None, init_state: Callable | None = None):
        lengths = {int(x) for x in env.episode_lengths}
        if len(lengths) != 1:
            raise UserError(f"online training needs one episode length for all envs, got {sorted(lengths)}")
        self.T = lengths.pop()
        self.M = int(env.num_envs)
        if utd <= 0:
            raise UserError(f"utd (updates per env step) must be > 0, got {utd}")
        self.config, self.env, self.utd = config, env, float(utd)
        self.seed_steps = default_seed_steps(self.T) if seed_steps is None else int(seed_steps)
        self.seed_updates = self.seed_steps if seed_updates is None else int(seed_updates)
        if self.seed_steps < 0 or self.seed_updates < 0:
            raise UserError(f"seed_steps and seed_updates must be >= 0, got {self.seed_steps}, {self.seed_updates}")
        # random actions for ceil(seed_steps / M) agent steps, and at least one whole episode (the buffer's unit)
        self.seed_agent_steps = max(math.ceil(self.seed_steps / self.M), self.T)
        capacity = min(int(config.steps), 1_000_000) if capacity is None else int(capacity)
        ts_obs, ts_act = env.obs_pad, env.action_pad
        self.replay = ReplayBuffer(max(capacity, self.M * self.T), episode_length=self.T, num_envs=self.M,
                                   batch_size=config.train.batch_size, horizon=config.train.horizon,
                                   obs_dim=ts_obs, action_dim=ts_act)
        model = make_world_model(config.model)
        self.update = update_fn or make_update_fn(model, config)
        self.init_state = init_state or (lambda key: init_training_state(config, key))
        self.planner = make_plan_policy(model, config, "sample")
        self._init = jax.jit(self._fresh_carry)
        # Traced once each per chunk: the accumulators' zeros come from eval_shape of these same jitted functions,
        # whose traces the loop bodies then reuse (JAX caches a jitted function's trace per argument shapes).
        # Plain functions would be traced twice, the update four times (smoke config: a 15 s trace instead of 6 s).
        self._agent_step = jax.jit(self.agent_step)
        self._one_update_jit = jax.jit(self._one_update)
        self.compiler_options = planner_compiler_options(config)  # XLA options of the loop's program
        self.train_chunk_jit = jax.jit(self.train_chunk, donate_argnums=0, compiler_options=self.compiler_options)

    def init(self, key) -> OnlineCarry:
        """The carry a fresh run starts from, as one compiled program: run eagerly, the envs' MJX reset and the
        learner's init dispatch hundreds of small ops, each compiled on first use and too small for the
        persistent cache (measured: 56 s of each launch/train.py start on a 2-core CPU, smoke config)."""
        return self._init(key)

    def _fresh_carry(self, key) -> OnlineCarry:
        k_learn, k_env, k_replay, k_loop = jax.random.split(key, 4)
        return OnlineCarry(learner=self.init_state(k_learn), replay=self.replay.init(k_replay),
                           env_state=self.env.reset(k_env), policy_state=init_planner_state(self.config, self.M),
                           key=k_loop, agent_steps=jnp.zeros((), jnp.int32),
                           update_credit=jnp.zeros((), jnp.float32), updates=jnp.zeros((), jnp.int32),
                           returns=jnp.zeros((self.M,), jnp.float32))

    # --------------------------------------------------------------------------------------------- acting
    def _act(self, carry: OnlineCarry, key):
        es = carry.env_state
        seeding = carry.agent_steps <= self.seed_agent_steps  # official: random while step <= seed_steps

        def random_action(_):
            a = tdmath.uniform(key, (self.M, self.env.action_pad), jnp.float32, -1.0, 1.0)
            return a * self.env.action_masks, carry.policy_state

        def plan(_):
            return self.planner(carry.learner.params, es.obs, es.task, es.first, carry.policy_state, key)

        return jax.lax.cond(seeding, random_action, plan, None)

    # -------------------------------------------------------------------------------------------- updates
    def _num_updates(self, carry: OnlineCarry):
        """(updates to run after this agent step, remaining credit)."""
        step = carry.agent_steps - 1  # the index of this agent step (the counter is already advanced)
        after_seed = step > self.seed_agent_steps
        at_seed_end = step == self.seed_agent_steps  # official: seed_steps updates at step == seed_steps
        credit = carry.update_credit + jnp.where(after_seed, self.utd * self.M, 0.0)
        n = jnp.floor(credit)
        n_total = n.astype(jnp.int32) + jnp.where(at_seed_end, self.seed_updates, 0)
        return n_total, credit - n

    def _updates(self, learner, replay: ReplayState, key, n):
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32),
                                       jax.eval_shape(self._one_update_jit, learner, replay, key)[2])

        def body(i, c):
            learner, replay, total = c
            learner, replay, metrics = self._one_update_jit(learner, replay, jax.random.fold_in(key, i))
            return learner, replay, jax.tree_util.tree_map(jnp.add, total, metrics)

        return jax.lax.fori_loop(0, n, body, (learner, replay, zeros))

    def _one_update(self, learner, replay, key):
        batch, replay = self.replay.sample(replay)
        learner, metrics = self.update(learner, batch, key)
        return learner, replay, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    # ---------------------------------------------------------------------------------------------- chunk
    def agent_step(self, carry: OnlineCarry) -> tuple[OnlineCarry, tuple[dict, jax.Array, jax.Array, jax.Array]]:
        """One agent step (M env steps) and the updates it owes: ``(carry, (metrics sums, updates, ended-episode
        returns [M], ended [M]))``."""
        key, k_act, k_upd = jax.random.split(carry.key, 3)
        es = carry.env_state
        replay = jax.lax.cond(es.first[0], lambda r: self.replay.start(r, es.obs, es.task), lambda r: r,
                              carry.replay)
        action, policy_state = self._act(carry, k_act)
        nxt = self.env.step(es, action)
        tr = Transition(obs=es.obs, action=action, reward=nxt.reward, next_obs=nxt.final_obs, done=nxt.done,
                        first=es.first, task=es.task)
        replay = self.replay.add(replay, tr.action, tr.reward, tr.next_obs)
        returns = carry.returns + tr.reward
        ended_returns = jnp.where(tr.done, returns, 0.0)
        carry = carry.replace(env_state=nxt, policy_state=policy_state, key=key, replay=replay,
                              agent_steps=carry.agent_steps + 1, returns=jnp.where(tr.done, 0.0, returns))
        n, credit = self._num_updates(carry)
        learner, replay, metrics = self._updates(carry.learner, carry.replay, k_upd, n)
        carry = carry.replace(learner=learner, replay=replay, update_credit=credit, updates=carry.updates + n)
        return carry, (metrics, n, ended_returns, tr.done.astype(jnp.int32))

    def train_chunk(self, carry: OnlineCarry, num_agent_steps) -> tuple[OnlineCarry, ChunkStats]:
        """``num_agent_steps`` agent steps in one loop (a Python int, or a traced int32: then every chunk length
        runs the same compiled program, as the offline chunk); sums of what happened in them."""
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(self._agent_step, carry)[1])

        def body(_, c):
            carry, total = c
            carry, out = self._agent_step(carry)
            return carry, jax.tree_util.tree_map(jnp.add, total, out)

        carry, (metrics, n, ended, done) = jax.lax.fori_loop(0, num_agent_steps, body, (carry, zeros))
        finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(carry.learner.params)
                            if jnp.issubdtype(x.dtype, jnp.floating)]).all()
        return carry, ChunkStats(metrics=metrics, num_updates=n, episode_return_sum=ended, episodes=done,
                                 params_finite=finite)


# ------------------------------------------------------------------------------------------------- the run
CARRY_STATE_FIELDS = ("replay", "env_state", "policy_state", "agent_steps", "update_credit", "updates", "returns")


def carry_rest(carry: OnlineCarry) -> dict:
    """What a checkpoint saves beside the learner state and the key: replay buffer, env and planner state,
    counters."""
    return {name: getattr(carry, name) for name in CARRY_STATE_FIELDS}


@dataclasses.dataclass
class OnlineResult:
    carry: OnlineCarry  # the whole state at the end (learner, replay, envs, key, counters)
    step: int  # env steps done (all envs together)
    resumed_from: int | None  # checkpoint step the run started from (None: fresh)
    preempted: bool  # stopped early by a signal or a preemption notice (after saving)
    metrics: dict[str, float]  # last logged metrics
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last eval_fn result (+ seconds)

    @property
    def state(self) -> TrainingState:
        return self.carry.learner


def make_online_env(config: ml_collections.ConfigDict):
    """The run's :class:`~mtdistill_jax.envs.multitask.MultiTaskEnv`: ``config.tasks`` x
    ``config.online.envs_per_task`` envs, episodes of ``config.online.episode_length`` (0: the task set's)."""
    from mtdistill_jax.configs.online import task_list
    from mtdistill_jax.configs.tasks import get_task_set
    from mtdistill_jax.envs.multitask import MultiTaskEnv

    return MultiTaskEnv(task_list(config), config.online.envs_per_task, task_set=get_task_set(config.model.task_set),
                        episode_length=config.online.episode_length or None)


def replay_capacity(config: ml_collections.ConfigDict | dict) -> int:
    """Replay capacity in transitions of an online config (or its saved JSON): ``min(steps, buffer_size)``."""
    return min(int(config["steps"]), int(config["online"]["buffer_size"]))


def make_online_loop(config: ml_collections.ConfigDict, env=None, *, update_fn: Callable | None = None,
                     init_state: Callable | None = None, capacity: int | None = None) -> OnlineLoop:
    """The :class:`OnlineLoop` of an online config (``configs/online.py``): seed steps/updates (-1: official),
    ``utd``, replay capacity ``min(steps, buffer_size)`` unless ``capacity`` (transitions) is given."""
    o = config.online
    return OnlineLoop(config, make_online_env(config) if env is None else env, update_fn=update_fn,
                      init_state=init_state, seed_steps=None if o.seed_steps < 0 else o.seed_steps,
                      seed_updates=None if o.seed_updates < 0 else o.seed_updates, utd=o.utd,
                      capacity=replay_capacity(config) if capacity is None else capacity)


RESUME_FIELDS = ("tasks", "online.envs_per_task", "online.episode_length")  # what a resumed run cannot change


def _check_resumable(mngr, config: ml_collections.ConfigDict, workdir: str) -> None:
    """A ``UserError`` when the latest checkpoint in ``workdir`` is of an offline run, or of an online run with
    other tasks, envs per task or episode length (its env states and buffer would not fit, or silently belong
    to other tasks)."""
    from mtdistill_jax.configs.online import task_list

    saved = mngr.saved_config()
    if "online" not in saved:
        raise UserError(f"the checkpoints in {workdir} are of an offline run; give another --workdir")
    now = {"tasks": task_list(config), "online.envs_per_task": config.online.envs_per_task,
           "online.episode_length": config.online.episode_length}
    was = {"tasks": task_list(saved), "online.envs_per_task": saved["online"]["envs_per_task"],
           "online.episode_length": saved["online"]["episode_length"]}
    diff = [f"{k}: checkpoint {was[k]!r} vs config {now[k]!r}" for k in RESUME_FIELDS if was[k] != now[k]]
    if diff:
        raise UserError(f"the checkpoints in {workdir} are of an online run with other envs ({'; '.join(diff)}); "
                        "resume with the same settings or give another --workdir")


def train_online(config: ml_collections.ConfigDict, workdir: str, *, save_every: int = 10_000, keep: int = 3,
                 async_save: bool = True, handle_signals: bool = True, log_every: int | None = None,
                 update_fn: Callable | None = None, init_state: Callable | None = None,
                 eval_every: int | None = None, eval_fn: Callable | None = None, writer=None,
                 metrics_dir: str | None = None, progress: bool = True,
                 on_step: Callable[[int, ChunkStats], Any] | None = None) -> OnlineResult:
    """Run (or resume) online training to ``config.steps`` env steps (an online config, ``configs/online.py``).

    Chunks of up to ``config.online.agent_steps_per_dispatch`` agent steps run as one compiled program (the
    carry donated); between them the host loop shared with ``train_offline`` checks for NaN/inf (metrics and the
    learner's params: the run stops before saving, naming them and the last good checkpoint), logs, evaluates
    and saves. Every count is in env steps (all envs together): ``config.steps``, ``log_every`` (default
    ``config.log_every``), ``save_every``, ``eval_every``; each must be a multiple of the number of envs.

    Checkpoints (orbax, in ``workdir``) hold the whole run: learner state, key, replay buffer, env and planner
    states, counters. Started again with the same workdir the run resumes from the latest one and, on CPU,
    reaches the same final state as an uninterrupted run, bit for bit. A SIGTERM/SIGINT or a preemption notice
    saves at the end of the chunk and returns with ``preempted=True``.

    Metrics (``writer`` or a :class:`~mtdistill_jax.metrics.MetricsWriter` in ``metrics_dir``), every
    ``log_every`` env steps: the update metrics (``train/...``, means over the updates since the last log),
    ``train/episode_return`` (mean return of the episodes that ended since; per task
    ``train/<task>/episode_return`` when there are several), ``train/updates`` (total so far),
    ``perf/env_steps_per_second`` and ``perf/updates_per_second`` (evaluation time excluded); ``eval_fn(state,
    step)`` metrics (e.g. ``eval/<task>/return``, ``eval/score``) at every multiple of ``eval_every`` and at the
    end. ``update_fn`` / ``init_state``: another learner (e.g. a distillation update), as in ``train_offline``.
    ``on_step(env_step, stats)`` is called after each chunk with its :class:`ChunkStats` (host values).
    """
    from mtdistill_jax.checkpoint.manager import CheckpointManager
    from mtdistill_jax.configs.online import check_config, num_envs, task_list
    from mtdistill_jax.tdmpc2.host_loop import HostLoop, check_eval_every
    from mtdistill_jax.tdmpc2.offline import start_run_outputs

    check_config(config)
    eval_every = check_eval_every(eval_every, eval_fn)
    if writer is not None and metrics_dir is not None:
        raise UserError("give a metrics writer or a metrics_dir, not both")
    log_every = int(log_every or config.log_every)
    M = num_envs(config)
    for name, value in (("save_every", save_every), ("log_every", log_every), ("eval_every", eval_every)):
        if value and value % M:
            raise UserError(f"{name}={value} is not a multiple of the {M} envs that step together (env steps)")
    mngr = CheckpointManager(workdir, config, keep=keep, save_every=save_every, async_save=async_save)
    own_writer = host = None
    try:
        capacity = None
        if mngr.latest_step() is not None:
            _check_resumable(mngr, config, workdir)
            # the buffer keeps the size it was made with (e.g. a run extended by --config.steps)
            slots, frames = mngr.saved_data_shapes()["replay"]["data"]["obs"][:2]
            capacity = slots * (frames - 1)
            if capacity != replay_capacity(config):
                log.info("replay capacity stays %d transitions as in the checkpoint (min(steps, online.buffer_size) "
                         "of this config: %d)", capacity, replay_capacity(config))
        loop = make_online_loop(config, update_fn=update_fn, init_state=init_state, capacity=capacity)
        K = int(config.online.agent_steps_per_dispatch)
        tasks = task_list(config)
        log.info("online: %s x %d envs (%d in all), episodes of %d steps, seed phase %d agent steps (%d seed updates), "
                 "utd %g, replay %d episodes (%.1f MiB)", ", ".join(tasks), config.online.envs_per_task, M, loop.T,
                 loop.seed_agent_steps, loop.seed_updates, loop.utd, loop.replay.capacity, loop.replay.nbytes() / 2**20)
        if handle_signals:
            mngr.handle_signals()
        key = jax.random.key(config.seed)
        resumed_from = mngr.latest_step()
        if resumed_from is None:  # copies: init may hand the same buffer to two leaves, and the carry is donated
            carry = jax.tree_util.tree_map(lambda x: x.copy(), loop.init(key))
        else:
            target = jax.eval_shape(loop.init, key)
            learner, rng, rest = mngr.restore(target.learner, carry_rest(target), step=resumed_from)
            carry = OnlineCarry(learner=learner, key=rng, **rest)
            log.info("resumed from env step %d in %s", resumed_from, workdir)
        step = int(carry.agent_steps) * M
        own_writer = start_run_outputs(workdir, config, metrics_dir, resumed_from or 0)
        writer = writer if own_writer is None else own_writer
        chunk = loop.train_chunk_jit
        if step < config.steps:  # compile before the clock starts, so rates and the ETA count training only
            t_compile = time.perf_counter()
            chunk = chunk.lower(carry, np.int32(1)).compile()
            log.info("compiled the online chunk in %.1f s", time.perf_counter() - t_compile)
        task_of_env = np.repeat(np.arange(len(tasks)), config.online.envs_per_task)

        def summarize(window, steps, seconds):
            n, e = window.get("_updates", 0.0), window.get("_episodes", 0.0)
            row = {k: v / n for k, v in window.items() if not k.startswith("_")} if n else {}
            if e:
                row["train/episode_return"] = window["_return_sum"] / e
            if len(tasks) > 1:
                for t in tasks:
                    if window.get(f"_episodes/{t}"):
                        row[f"train/{t}/episode_return"] = window[f"_return_sum/{t}"] / window[f"_episodes/{t}"]
            row.update({"train/updates": float(carry.updates),  # the carry after the window's last chunk
                        "perf/env_steps_per_second": steps / seconds, "perf/updates_per_second": n / seconds})
            return row

        def save(at, force):
            mngr.save(at, carry.learner, rng=carry.key, data=carry_rest(carry), force=force)

        host = HostLoop(mngr, total=config.steps, step=step, log_every=log_every, save_every=save_every,
                        eval_every=eval_every, eval_fn=eval_fn, summarize=summarize, writer=writer,
                        progress=progress, unit="env step")
        while not host.done:
            start, end = host.step, host.chunk_end(K * M)
            carry, stats = chunk(carry, np.int32((end - start) // M))
            stats = jax.device_get(stats)  # waits for the chunk
            totals = {k: float(v) for k, v in stats.metrics.items()}
            host.check(start, end, totals, params_finite=bool(stats.params_finite))
            counts = {"_updates": float(stats.num_updates), "_episodes": float(stats.episodes.sum()),
                      "_return_sum": float(stats.episode_return_sum.sum())}
            if len(tasks) > 1:
                for i, t in enumerate(tasks):
                    counts[f"_episodes/{t}"] = float(stats.episodes[task_of_env == i].sum())
                    counts[f"_return_sum/{t}"] = float(stats.episode_return_sum[task_of_env == i].sum())
            if on_step is not None:
                on_step(end, stats)
            if host.finish(end, {**totals, **counts}, carry.learner, save):
                break
        mngr.wait_until_finished()
        return OnlineResult(carry=carry, step=host.step, resumed_from=resumed_from, preempted=host.preempted,
                            metrics=host.metrics, eval_metrics=host.eval_metrics)
    finally:
        if host is not None:
            host.close()
        if own_writer is not None:
            own_writer.close()
        mngr.close()
