"""Offline TD-MPC2 training on a fixed set of episodes, checkpointed and resumable.

``train_offline(config, episodes, workdir)`` trains ``config.steps`` updates from sub-trajectories of
``episodes``, saving the whole run (learner state, PRNG key, sampler cursor, config) every ``save_every``
steps. Started again with the same workdir it resumes from the latest checkpoint and, on CPU, reproduces the
uninterrupted run bit for bit (the key and the data cursor are part of the checkpoint). A SIGTERM/SIGINT or a
TPU preemption notice makes it save at the end of the current chunk and return with ``preempted=True``.

The loop (convention 3): one compiled program, :func:`make_train_chunk`, runs up to
``K = config.train.steps_per_dispatch`` updates per host dispatch (sample -> update inside ``lax.fori_loop``);
the episodes are an argument of that program (:class:`~mtdistill_jax.data.offline.OfflineData`), never a
constant, and so is ``aux`` (any pytree the update reads, e.g. a frozen teacher). Python runs only between
chunks, for logging, evaluation, checkpoints and preemption checks. Chunk schedule: a chunk ends at the next
multiple of K, of ``log_every``, of ``save_every``, of ``eval_every`` or at ``config.steps``, whichever comes
first, so logs, evaluations and checkpoints land exactly where they did with one update per dispatch. The
chunk length is a traced argument (a ``fori_loop`` with a dynamic trip count), so every chunk length runs the
*same* compiled body: one compilation per run, and a resumed run (whose chunks may be cut differently, e.g. by
another ``save_every``) performs bit-identical arithmetic.

Data of any size: given a :class:`~mtdistill_jax.data.native.NativeDataset` (memory-mapped shards on disk) instead
of in-memory episodes, the batches are gathered on the host by a
:class:`~mtdistill_jax.data.native.NativeSampler` (the same windows as the in-memory sampler for the same key), K
of them stacked per chunk and put on the device by a background thread a few chunks ahead; the compiled chunk
takes them as its ``data`` argument. The cursor and the checkpoints are the same, and so is the run.

Shared by every offline learner: ``update_fn`` (the step), ``init_state`` (its fresh state, also the restore
target) and ``aux`` (its frozen inputs) make the distillation run the same loop as plain TD-MPC2 training.

Between chunks the host also

- checks that the chunk's summed metrics are finite; otherwise it stops *before* saving that chunk's state
  and raises :class:`NonFiniteLossError` (the last good checkpoint stays the latest one on disk);
- every ``log_every`` steps, logs the mean of every metric over the updates since the last log plus
  ``perf/steps_per_second`` (to the Python log, the progress bar's postfix and the metrics writer);
- every ``eval_every`` steps and at the end, calls ``eval_fn(state, step) -> {name: value}`` (its metrics,
  plus ``perf/eval_seconds``, go to the same places).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax.checkpoint.manager import CheckpointManager, config_to_dict
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.data.native import NativeDataset, NativeSampler, Prefetcher
from mtdistill_jax.data.offline import OfflineData, OfflineSampler, SamplerState, check_finite
from mtdistill_jax.data.tdmpc2_format import Episodes
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.host_loop import (  # noqa: F401
    PROGRESS_METRICS,
    HostLoop,
    MetricsSink,
    NonFiniteLossError,
    check_eval_every,
    chunk_end,
)
from mtdistill_jax.tdmpc2.train import TrainingState, init_training_state, make_update_fn, validate_batch
from mtdistill_jax.types import Batch

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the run's config, written in the workdir when training starts
@flax.struct.dataclass
class ChunkMetrics:
    total: dict  # name -> float32 sum over the chunk's updates (divide by the chunk length for the mean)
    last: dict  # name -> float32 value at the chunk's last update


def make_train_chunk(update: Callable, sampler: OfflineSampler | None, batch_constraint=None) -> Callable:
    """Pure ``train_chunk(state, data, data_state, rng, num_steps, aux=None) -> (state, data_state, rng,
    ChunkMetrics)``.

    Runs ``num_steps`` (a traced int32 scalar) iterations of: split ``rng`` -> sample batch ``data_state.count``
    from ``data`` -> ``update(state, batch, key)`` (or ``update(state, batch, key, None, aux)`` when ``aux`` is
    given: ``update(state, batch, key, draws=None, aux=None) -> (state, metrics)``); the same per-step key
    sequence as a host loop doing one update per dispatch. ``aux`` is any pytree (e.g. frozen teacher params,
    int8/float16 leaves allowed), an argument of the program like ``data``, never a constant.
    ``batch_constraint`` (e.g. a mesh's batch shardings) is applied to each batch with
    ``jax.lax.with_sharding_constraint``. Not jitted: see :func:`compile_train_chunk`.

    With ``sampler=None`` the batches come from the host (a :class:`~mtdistill_jax.data.native.NativeDataset`):
    ``data`` is a time-major :class:`Batch` of K stacked batches (obs [K, H+1, B, O], action [K, H, B, A],
    reward [K, H, B, 1], task [K, B]; K fixed, the chunk's ``num_steps <= K`` first ones are used) holding
    batches ``data_state.count ..`` of the stream; iteration j takes ``data[j]`` and advances the cursor.
    """

    def train_chunk(state: TrainingState, data: OfflineData | Batch, data_state: SamplerState, rng, num_steps,
                    aux=None):
        def one(carry, j):
            state, data_state, rng = carry
            rng, key = jax.random.split(rng)
            if sampler is None:
                batch = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False),
                                               data)
                data_state = data_state.replace(count=data_state.count + 1)
            else:
                batch, data_state = sampler.sample(data, data_state)
            if batch_constraint is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_constraint)
            state, metrics = update(state, batch, key) if aux is None else update(state, batch, key, None, aux)
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            return (state, data_state, rng), metrics

        # traced once: the eval_shape below and the loop body share the trace (index 0 weakly typed, as the loop's)
        one = jax.jit(one)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(one, (state, data_state, rng), 0)[1])

        def body(j, c):
            carry, total, _last = c
            carry, metrics = one(carry, j)
            return carry, jax.tree_util.tree_map(jnp.add, total, metrics), metrics

        (state, data_state, rng), total, last = jax.lax.fori_loop(
            0, num_steps, body, ((state, data_state, rng), zeros, zeros))
        return state, data_state, rng, ChunkMetrics(total=total, last=last)

    return train_chunk


def compile_train_chunk(train_chunk: Callable, mesh=None, aux_specs=None, data_specs=None,
                        compiler_options: dict | None = None) -> Callable:
    """The one jit of the offline loop (only the state, argument 0, is donated: never ``data`` or ``aux``),
    through :func:`mtdistill_jax.parallel.compile_step`: with a mesh every argument and output is replicated
    (``aux`` laid out by ``aux_specs``, a pytree prefix of PartitionSpecs, when given; ``data`` by
    ``data_specs``, e.g. :func:`stacked_batch_specs` for host batches) and the batch sharding comes from
    :func:`make_train_chunk`'s ``batch_constraint``. ``compiler_options``: XLA options of the program (e.g.
    :func:`mtdistill_jax.distill.step.compiler_options` for a bf16 teacher)."""
    from mtdistill_jax.parallel import compile_step

    in_specs = () if aux_specs is None and data_specs is None else (None, data_specs, None, None, None, aux_specs)
    return compile_step(train_chunk, mesh, in_specs=in_specs, donate_argnums=0, compiler_options=compiler_options)


def stacked_batch_specs() -> Batch:
    """PartitionSpecs of K stacked time-major batches (the B axis split over the mesh's ``data`` axis)."""
    from jax.sharding import PartitionSpec as P

    from mtdistill_jax.parallel import DATA_AXIS

    tb = P(None, None, DATA_AXIS)
    return Batch(obs=tb, action=tb, reward=tb, task=P(None, DATA_AXIS))


def _host_batches(sampler: NativeSampler, key, count: int, step: int, total: int, every: tuple, K: int,
                  put: Callable, depth: int) -> Prefetcher:
    """The chunks' stacked batches from ``step`` (cursor ``count``) on, in the chunk schedule of the loop
    (:func:`chunk_end`), each padded to K batches and placed by ``put``, computed ``depth`` chunks ahead."""

    def plan():
        c, s = count, step
        while s < total:
            end = chunk_end(s, total, *every)
            yield c, end - s
            c, s = c + end - s, end

    def make(item):
        c, n = item
        return n, put(sampler.sample_many(key, c, n, pad_to=K))

    return Prefetcher(make, plan(), depth=depth, name="host-batches")


@dataclasses.dataclass
class RunResult:
    state: TrainingState
    rng: jax.Array
    data_state: SamplerState
    step: int  # updates done when the run returned
    resumed_from: int | None  # checkpoint step the run started from (None: fresh)
    preempted: bool  # stopped early by a signal or a preemption notice (after saving)
    metrics: dict[str, float]  # last logged metrics (means over the updates since the log before)
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last eval_fn result (+ seconds)


def _write_config_json(workdir: str, config: ml_collections.ConfigDict) -> None:
    """``workdir/config.json``: the run's config (the same JSON the checkpoints hold), written atomically."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def start_run_outputs(workdir: str, config: ml_collections.ConfigDict, metrics_dir: str | None,
                      start_step: int):
    """A run's outputs on the main process (others: nothing, None): ``workdir/config.json`` and, with
    ``metrics_dir``, the :class:`~mtdistill_jax.metrics.MetricsWriter` the run owns (resumed at ``start_step``),
    else None. Shared by the offline and the online loop."""
    if jax.process_index() != 0:
        return None
    _write_config_json(workdir, config)
    if metrics_dir is None:
        return None
    from mtdistill_jax.metrics import MetricsWriter

    return MetricsWriter(metrics_dir, start_step=start_step)


def train_offline(config: ml_collections.ConfigDict, episodes: Episodes | OfflineData | NativeDataset,
                  workdir: str, *,
                  save_every: int = 1000, keep: int = 3, async_save: bool = True, mesh=None,
                  handle_signals: bool = True, on_step: Callable[[int, dict], Any] | None = None,
                  log_every: int | None = None, update_fn: Callable | None = None,
                  init_state: Callable[[jax.Array], TrainingState] | None = None, aux: Any = None,
                  aux_specs: Any = None, eval_every: int | None = None,
                  eval_fn: Callable[[TrainingState, int], Mapping] | None = None,
                  writer: MetricsSink | None = None, metrics_dir: str | None = None,
                  progress: bool = True, data_mode: str = "uniform", prefetch: int = 2,
                  compiler_options: dict | None = None) -> RunResult:
    """Run (or resume) offline training to ``config.steps`` updates; returns the final :class:`RunResult`.

    Learner:

    - ``update_fn`` replaces the default step ``make_update_fn(make_world_model(config.model), config)`` by any
      pure step ``update_fn(state, batch, key, draws=None, aux=None) -> (state, metrics)`` (e.g. one with
      extra loss terms); whatever metric names it returns are logged. Without ``aux`` it is called as
      ``update_fn(state, batch, key)``.
    - ``init_state(key) -> TrainingState`` makes the fresh state of a new run and, through
      ``jax.eval_shape``, the restore target of a resumed one (default ``init_training_state(config, key)``);
      a learner whose state carries more (e.g. ``params['distill']``) passes its own.
    - ``aux``: any pytree handed to every update as a jit *argument* (copied to the device once, replicated on
      a mesh, never donated: the caller's arrays stay valid), e.g. frozen teacher params; ``aux_specs``
      (PartitionSpecs, a pytree prefix of ``aux``) lays it out on the mesh instead, e.g. a sharded teacher
      (:func:`mtdistill_jax.distill.teacher_specs`).

    Data: ``episodes`` as :class:`~mtdistill_jax.data.tdmpc2_format.Episodes` (host arrays, checked and copied
    to the device) or already on device as :class:`~mtdistill_jax.data.offline.OfflineData` (from
    ``OfflineSampler.load``). NaN/inf in a frame the sampler can read raises
    :class:`~mtdistill_jax.data.offline.NonFiniteDataError` before anything is written.

    Or ``episodes`` as a :class:`~mtdistill_jax.data.native.NativeDataset` (memory-mapped shards, any size,
    validated when written): a :class:`~mtdistill_jax.data.native.NativeSampler` gathers the batches on the
    host (this host's rows on a multi-host run) and a background thread keeps ``prefetch`` chunks of K stacked
    batches ahead on the device; the compiled chunk takes those K batches and runs K updates per dispatch. The
    cursor (and so the checkpoint) is the same :class:`SamplerState`, and with ``data_mode="uniform"`` (the
    official sampler) the batches are those the in-memory path draws from the same episodes: the same run.
    ``data_mode="balanced"`` gives each task present an equal share of every batch (native data only). The
    dataset's task set must be the config's.

    Reporting:

    - ``on_step(step, metrics)`` is called after each chunk (``step``: updates done; ``metrics``: those of
      the chunk's last update, device scalars).
    - Every ``log_every`` steps (default ``config.log_every``) the means of the metrics over the window plus
      ``perf/steps_per_second`` (evaluation time excluded) are logged and written to ``writer`` (anything with
      ``write(step, metrics)``; the caller closes it) or, with ``metrics_dir``, to a
      :class:`~mtdistill_jax.metrics.MetricsWriter` built there (``metrics.csv`` + ``tb/``, resumed at the
      checkpoint step, closed at the end; process 0 only). Give at most one of the two.
    - ``eval_fn(state, step) -> {name: float}`` runs between chunks at every multiple of ``eval_every``
      (None/0: only at the end) and once more at the end of the run (not after a preemption); its metrics
      (name them ``eval/...``) and ``perf/eval_seconds`` go to the log and the writer, in the same row as
      the training metrics of that step.
    - ``progress``: a tqdm bar over the steps on stderr (rate, ETA; the postfix shows
      :data:`PROGRESS_METRICS` present at each log).

    Failures: a chunk whose summed metrics are not all finite stops the run before that chunk is saved
    (pending saves are finished) with :class:`NonFiniteLossError`. ``workdir/config.json`` holds the run's
    config once training starts.
    """
    from mtdistill_jax.configs.tasks import get_task_set

    check_config(config)
    eval_every = check_eval_every(eval_every, eval_fn)
    if writer is not None and metrics_dir is not None:
        raise UserError("give a metrics writer or a metrics_dir, not both")
    ts = get_task_set(config.model.task_set)
    native = isinstance(episodes, NativeDataset)
    if native:
        if episodes.task_set.name != ts.name:
            raise UserError(f"the dataset {episodes.path} holds task set {episodes.task_set.name}; the config's "
                            f"model.task_set is {ts.name}")
        sampler = NativeSampler(episodes, config.train.batch_size, config.train.horizon, mode=data_mode,
                                process_index=jax.process_index(), process_count=jax.process_count())
    else:
        if data_mode != "uniform":
            raise UserError(f"data_mode={data_mode!r} needs a native dataset (open_dataset); in-memory episodes are "
                            "sampled uniformly")
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
    K = config.train.steps_per_dispatch
    put_batches = None
    if native:
        data = None  # K stacked host batches per chunk, made below
        if mesh is None:
            put_batches = jax.device_put
        else:
            from mtdistill_jax.parallel import to_shardings

            stacked_shardings = to_shardings(stacked_batch_specs(), mesh)
            if jax.process_count() > 1:
                def put_batches(b):
                    return jax.tree_util.tree_map(jax.make_array_from_process_local_data, stacked_shardings, b)
            else:
                def put_batches(b):
                    return jax.device_put(b, stacked_shardings)
    elif isinstance(episodes, OfflineData):
        check_finite(episodes, "data")
        data = episodes if mesh is None else replicate(episodes, mesh)
    else:
        data = sampler.load(episodes, None if mesh is None else replicated(mesh))
    if aux is not None:
        if mesh is None:
            aux = jax.device_put(aux)
        elif aux_specs is None:
            aux = replicate(aux, mesh)
        else:
            from mtdistill_jax.parallel import to_shardings

            aux = jax.device_put(aux, to_shardings(aux_specs, mesh))
    update = update_fn or make_update_fn(make_world_model(config.model), config)
    init_state = init_state or (lambda k: init_training_state(config, k))
    train_chunk = compile_train_chunk(make_train_chunk(update, None if native else sampler, batch_constraint), mesh,
                                      None if mesh is None else aux_specs,
                                      stacked_batch_specs() if native and mesh is not None else None,
                                      compiler_options)
    log_every = log_every or config.log_every
    mngr = CheckpointManager(workdir, config, keep=keep, save_every=save_every, async_save=async_save)
    if handle_signals:
        mngr.handle_signals()
    own_writer = loop = host_batches = None
    try:
        key = jax.random.key(config.seed)
        k_init, k_data, k_run = jax.random.split(key, 3)
        resumed_from = mngr.latest_step()
        if resumed_from is None:
            state = init_state(k_init)
            data_state, rng = sampler.init(k_data), k_run
        else:
            state_target = jax.eval_shape(init_state, k_init)
            data_target = jax.eval_shape(sampler.init, k_data)
            state, rng, data_state = mngr.restore(state_target, data_target, step=resumed_from)
            log.info("resumed from step %d in %s", resumed_from, workdir)
        if mesh is not None:
            state, data_state, rng = replicate((state, data_state, rng), mesh)
        step = int(state.step)
        if native:
            one = sampler.sample_at(data_state.key, 0)
            validate_batch(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), one), config,
                           check_values=False)
            data = put_batches(sampler.sample_many(data_state.key, 0, 0, pad_to=K))  # shapes for compiling
            if step < config.steps:
                host_batches = _host_batches(sampler, np.asarray(jax.device_get(data_state.key)),
                                             int(data_state.count), step, config.steps,
                                             (K, log_every, save_every, eval_every), K, put_batches, prefetch)
        else:
            validate_batch(jax.eval_shape(sampler.sample, data, data_state)[0], config, check_values=False)
        own_writer = start_run_outputs(workdir, config, metrics_dir, resumed_from or 0)
        writer = writer if own_writer is None else own_writer
        chunk_args = () if aux is None else (aux,)
        if step < config.steps:  # compile before the clock starts, so rates and the ETA count training only
            t_compile = time.perf_counter()
            train_chunk = train_chunk.lower(state, data, data_state, rng, np.int32(1), *chunk_args).compile()
            log.info("compiled the training chunk in %.1f s%s", time.perf_counter() - t_compile,
                     f" (XLA options {compiler_options})" if compiler_options else "")

        def summarize(window, steps, seconds):
            return {**{k: v / steps for k, v in window.items()}, "perf/steps_per_second": steps / seconds}

        def save(at, force):
            mngr.save(at, state, rng=rng, data=data_state, force=force)

        loop = HostLoop(mngr, total=config.steps, step=step, log_every=log_every, save_every=save_every,
                        eval_every=eval_every, eval_fn=eval_fn, summarize=summarize, writer=writer,
                        progress=progress, unit="update")
        while not loop.done:
            start, end = loop.step, loop.chunk_end(K)
            if host_batches is not None:
                n, data = next(host_batches)
                assert n == end - start, (n, start, end)
            state, data_state, rng, m = train_chunk(state, data, data_state, rng, np.int32(end - start),
                                                    *chunk_args)
            totals = {k: float(v) for k, v in jax.device_get(m.total).items()}  # waits for the chunk
            loop.check(start, end, totals)
            if on_step is not None:
                on_step(end, m.last)
            if loop.finish(end, totals, state, save):
                break
        step, eval_metrics, preempted = loop.step, loop.eval_metrics, loop.preempted
        metrics = {k: v for k, v in loop.metrics.items() if not k.startswith("perf/")}  # means of the update metrics
        mngr.wait_until_finished()
        return RunResult(state=state, rng=rng, data_state=data_state, step=step, resumed_from=resumed_from,
                         preempted=preempted, metrics=metrics, eval_metrics=eval_metrics)
    finally:
        if host_batches is not None:
            host_batches.close()
        if loop is not None:
            loop.close()
        if own_writer is not None:
            own_writer.close()
        mngr.close()
