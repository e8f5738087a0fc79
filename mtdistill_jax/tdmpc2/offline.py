"""Offline TD-MPC2 training on a fixed set of episodes, checkpointed and resumable.

``train_offline(config, episodes, workdir)`` trains ``config.steps`` updates from sub-trajectories of
``episodes``, saving the whole run (learner state, PRNG key, sampler cursor, config) every
``save_every`` steps. Started again with the same workdir it resumes from the latest checkpoint and, on CPU,
reproduces the uninterrupted run bit for bit (the key and the data cursor are part of the checkpoint). A
SIGTERM/SIGINT or a TPU preemption notice makes it save at the current step and return with
``preempted=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from mtdistill_jax.checkpoint.manager import CheckpointManager
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.data.offline import OfflineSampler, SamplerState
from mtdistill_jax.data.tdmpc2_format import Episodes
from mtdistill_jax.errors import UserError
from mtdistill_jax.tdmpc2.train import Learner, TrainingState, validate_batch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    state: TrainingState
    rng: jax.Array
    data_state: SamplerState
    step: int  # updates done when the run returned
    resumed_from: int | None  # checkpoint step the run started from (None: fresh)
    preempted: bool  # stopped early by a signal or a preemption notice (after saving)
    metrics: dict[str, float]  # last logged metrics


def train_offline(config: ml_collections.ConfigDict, episodes: Episodes, workdir: str, *, save_every: int = 1000,
                  keep: int = 3, async_save: bool = True, mesh=None, handle_signals: bool = True,
                  on_step: Callable[[int, dict], Any] | None = None, log_every: int | None = None) -> RunResult:
    """Run (or resume) offline training to ``config.steps`` updates; returns the final :class:`RunResult`."""
    from mtdistill_jax.configs.tasks import get_task_set

    check_config(config)
    ts = get_task_set(config.model.task_set)
    learner = Learner(config, mesh=mesh)
    sampler = OfflineSampler(episodes, config.train.batch_size, config.train.horizon, ts.obs_pad, ts.action_pad)
    if episodes.task.min() < 0 or episodes.task.max() >= ts.num_tasks:
        raise UserError(f"episodes have task ids in [{episodes.task.min()}, {episodes.task.max()}], "
                        f"outside [0, {ts.num_tasks}) of {ts.name}")
    sample = jax.jit(sampler.sample)
    log_every = log_every or config.log_every
    mngr = CheckpointManager(workdir, config, keep=keep, save_every=save_every, async_save=async_save)
    if handle_signals:
        mngr.handle_signals()
    try:
        key = jax.random.key(config.seed)
        k_init, k_data, k_run = jax.random.split(key, 3)
        resumed_from = mngr.latest_step()
        if resumed_from is None:
            state = learner.init(k_init)
            data_state, rng = sampler.init(k_data), k_run
        else:
            state_target = jax.eval_shape(learner.init, k_init)
            data_target = jax.eval_shape(sampler.init, k_data)
            state, rng, data_state = mngr.restore(state_target, data_target, step=resumed_from)
            log.info("resumed from step %d in %s", resumed_from, workdir)
        step = int(state.step)
        metrics: dict[str, float] = {}
        preempted = False
        t0, s0 = time.perf_counter(), step
        while step < config.steps:
            rng, k = jax.random.split(rng)
            batch, data_state = sample(data_state)
            if step == s0:
                validate_batch(batch, config)  # once: shapes and task ids of the data
            state, m = learner.update(state, batch, k, check_values=False)
            step += 1
            if on_step is not None:
                on_step(step, m)
            if step % log_every == 0 or step == config.steps:
                metrics = {k: float(v) for k, v in m.items()}
                rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
                log.info("step %d/%d (%.1f it/s) %s", step, config.steps, rate,
                         " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
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
