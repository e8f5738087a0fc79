"""Offline TD-MPC2 training on a fixed set of episodes, checkpointed and resumable.

``train_offline(config, episodes, workdir)`` trains ``config.steps`` updates from sub-trajectories of
``episodes``, saving the whole run (learner state, PRNG key, sampler cursor, config) every ``save_every``
steps. Started again with the same workdir it resumes from the latest checkpoint and, on CPU, reproduces the
uninterrupted run bit for bit (the key and the data cursor are part of the checkpoint). A SIGTERM/SIGINT or a
TPU preemption notice makes it save at the end of the current chunk and return with ``preempted=True``.

The loop (convention 3): one compiled program, :func:`make_train_chunk`, runs up to
``K = config.train.steps_per_dispatch`` updates per host dispatch (sample -> update inside ``lax.fori_loop``);
the episodes are an argument of that program (:class:`~mtdistill_jax.data.offline.OfflineData`), never a
constant. Python runs only between chunks, for logging, checkpoints and preemption checks. Chunk schedule:
a chunk ends at the next multiple of K, of ``log_every``, of ``save_every`` or at ``config.steps``, whichever
comes first, so logs and checkpoints land exactly where they did with one update per dispatch. The chunk
length is a traced argument (a ``fori_loop`` with a dynamic trip count), so every chunk length runs the *same*
compiled body: one compilation per run, and a resumed run (whose chunks may be cut differently, e.g. by another
``save_every``) performs bit-identical arithmetic.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax.checkpoint.manager import CheckpointManager
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.data.offline import OfflineData, OfflineSampler, SamplerState
from mtdistill_jax.data.tdmpc2_format import Episodes
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.train import TrainingState, init_training_state, make_update_fn, validate_batch

log = logging.getLogger(__name__)


@flax.struct.dataclass
class ChunkMetrics:
    total: dict  # name -> float32 sum over the chunk's updates (divide by the chunk length for the mean)
    last: dict  # name -> float32 value at the chunk's last update


def make_train_chunk(update: Callable, sampler: OfflineSampler, batch_constraint=None) -> Callable:
    """Pure ``train_chunk(state, data, data_state, rng, num_steps) -> (state, data_state, rng, ChunkMetrics)``.

    Runs ``num_steps`` (a traced int32 scalar) iterations of: split ``rng`` -> sample batch ``data_state.count``
    from ``data`` -> ``update(state, batch, key)``; the same per-step key sequence as a host loop doing one
    update per dispatch. ``batch_constraint`` (e.g. a mesh's batch shardings) is applied to each batch with
    ``jax.lax.with_sharding_constraint``. Not jitted: see :func:`compile_train_chunk`.
    """

    def train_chunk(state: TrainingState, data: OfflineData, data_state: SamplerState, rng, num_steps):
        def one(carry):
            state, data_state, rng = carry
            rng, key = jax.random.split(rng)
            batch, data_state = sampler.sample(data, data_state)
            if batch_constraint is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_constraint)
            state, metrics = update(state, batch, key)
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            return (state, data_state, rng), metrics

        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(one, (state, data_state, rng))[1])

        def body(_, c):
            carry, total, _last = c
            carry, metrics = one(carry)
            return carry, jax.tree_util.tree_map(jnp.add, total, metrics), metrics

        (state, data_state, rng), total, last = jax.lax.fori_loop(
            0, num_steps, body, ((state, data_state, rng), zeros, zeros))
        return state, data_state, rng, ChunkMetrics(total=total, last=last)

    return train_chunk


def compile_train_chunk(train_chunk: Callable, mesh=None) -> Callable:
    """The one jit of the offline loop (state donated), through :func:`mtdistill_jax.parallel.compile_step`:
    with a mesh every argument and output is replicated and the batch sharding comes from
    :func:`make_train_chunk`'s ``batch_constraint``."""
    from mtdistill_jax.parallel import compile_step

    return compile_step(train_chunk, mesh, donate_argnums=0)


def chunk_end(step: int, total: int, *every: int) -> int:
    """End of the chunk starting at ``step``: the next multiple of any of ``every``, or ``total``."""
    return min([total] + [(step // e + 1) * e for e in every])


@dataclasses.dataclass
class RunResult:
    state: TrainingState
    rng: jax.Array
    data_state: SamplerState
    step: int  # updates done when the run returned
    resumed_from: int | None  # checkpoint step the run started from (None: fresh)
    preempted: bool  # stopped early by a signal or a preemption notice (after saving)
    metrics: dict[str, float]  # last logged metrics (means over the updates since the log before)


def train_offline(config: ml_collections.ConfigDict, episodes: Episodes | OfflineData, workdir: str, *,
                  save_every: int = 1000, keep: int = 3, async_save: bool = True, mesh=None,
                  handle_signals: bool = True, on_step: Callable[[int, dict], Any] | None = None,
                  log_every: int | None = None, update_fn: Callable | None = None) -> RunResult:
    """Run (or resume) offline training to ``config.steps`` updates; returns the final :class:`RunResult`.

    ``update_fn`` replaces the default step ``make_update_fn(make_world_model(config.model), config)`` by any
    pure step called as ``update_fn(state, batch, key) -> (state, metrics)`` (e.g. one with extra loss terms).

    ``on_step(step, metrics)`` is called after each chunk (``step``: updates done; ``metrics``: those of the
    chunk's last update, device scalars). ``episodes`` may already be on device as
    :class:`~mtdistill_jax.data.offline.OfflineData` (from ``OfflineSampler.load``).
    """
    from mtdistill_jax.configs.tasks import get_task_set

    check_config(config)
    ts = get_task_set(config.model.task_set)
    sampler = OfflineSampler(config.train.batch_size, config.train.horizon, ts.obs_pad, ts.action_pad)
    task = np.asarray(episodes.task)
    if task.min() < 0 or task.max() >= ts.num_tasks:
        raise UserError(f"episodes have task ids in [{task.min()}, {task.max()}], "
                        f"outside [0, {ts.num_tasks}) of {ts.name}")
    batch_constraint = None
    if mesh is not None:
        from mtdistill_jax.parallel import batch_sharding, check_divisible, replicate, replicated

        check_divisible(config.train.batch_size, mesh)
        batch_constraint = batch_sharding(mesh)
    if isinstance(episodes, OfflineData):
        data = episodes if mesh is None else replicate(episodes, mesh)
    else:
        data = sampler.load(episodes, None if mesh is None else replicated(mesh))
    update = update_fn or make_update_fn(make_world_model(config.model), config)
    train_chunk = compile_train_chunk(make_train_chunk(update, sampler, batch_constraint), mesh)
    K = config.train.steps_per_dispatch
    log_every = log_every or config.log_every
    mngr = CheckpointManager(workdir, config, keep=keep, save_every=save_every, async_save=async_save)
    if handle_signals:
        mngr.handle_signals()
    try:
        key = jax.random.key(config.seed)
        k_init, k_data, k_run = jax.random.split(key, 3)
        resumed_from = mngr.latest_step()
        if resumed_from is None:
            state = init_training_state(config, k_init)
            data_state, rng = sampler.init(k_data), k_run
        else:
            state_target = jax.eval_shape(lambda k: init_training_state(config, k), k_init)
            data_target = jax.eval_shape(sampler.init, k_data)
            state, rng, data_state = mngr.restore(state_target, data_target, step=resumed_from)
            log.info("resumed from step %d in %s", resumed_from, workdir)
        if mesh is not None:
            state, data_state, rng = replicate((state, data_state, rng), mesh)
        validate_batch(jax.eval_shape(sampler.sample, data, data_state)[0], config, check_values=False)
        step = int(state.step)
        metrics: dict[str, float] = {}
        preempted = False
        t_log, s_log = time.perf_counter(), step
        window = None  # metric sums since the last log
        while step < config.steps:
            end = chunk_end(step, config.steps, K, log_every, save_every)
            state, data_state, rng, m = train_chunk(state, data, data_state, rng, np.int32(end - step))
            step = end
            window = m.total if window is None else jax.tree_util.tree_map(jnp.add, window, m.total)
            if on_step is not None:
                on_step(step, m.last)
            if step % log_every == 0 or step == config.steps:
                metrics = {k: float(v) / (step - s_log) for k, v in window.items()}  # blocks on the chunk
                now = time.perf_counter()
                rate = (step - s_log) / max(now - t_log, 1e-9)
                log.info("step %d/%d (%.1f it/s) %s", step, config.steps, rate,
                         " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
                t_log, s_log, window = now, step, None
            if mngr.should_stop(step):
                mngr.save(step, state, rng=rng, data=data_state, force=True)
                preempted = True
                log.warning("stopping at step %d after a preemption notice/signal (checkpoint saved)", step)
                break
            mngr.save(step, state, rng=rng, data=data_state, force=step == config.steps)
        mngr.wait_until_finished()
        return RunResult(state=state, rng=rng, data_state=data_state, step=step, resumed_from=resumed_from,
                         preempted=preempted, metrics=metrics)
    finally:
        mngr.close()
