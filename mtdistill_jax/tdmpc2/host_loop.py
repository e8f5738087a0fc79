"""What runs on the host between compiled chunks, shared by the offline and the online training loops.

A training loop (``train_offline``, ``train_online``) runs its compiled chunk program and hands each chunk's
summed metrics to one :class:`HostLoop`, which does everything else in the same way for both:

- the chunk schedule (:func:`chunk_end`): a chunk ends at the next multiple of K, of ``log_every``, of
  ``save_every``, of ``eval_every`` or at ``total``, so logs, evaluations and checkpoints land exactly there;
- the NaN/inf guard (:meth:`HostLoop.check`): a chunk whose sums are not all finite stops the run with
  :class:`NonFiniteLossError` *before* its state is saved (pending saves are finished, the last good checkpoint
  stays the latest one) and the message names the metrics, the chunk's steps and that checkpoint;
- metric windows: the sums since the last log are kept and, every ``log_every`` steps and at the end, turned
  into a row by the loop's ``summarize(window, steps, seconds)`` (means, rates), logged to the Python log, the
  progress bar's postfix and the metrics writer (e.g. :class:`~mtdistill_jax.metrics.MetricsWriter`:
  ``metrics.csv`` + TensorBoard);
- evaluations: ``eval_fn(state, step)`` at every multiple of ``eval_every`` and at the end (not after a
  preemption), timed (``perf/eval_seconds``) and left out of the throughput of the next log;
- checkpoints and preemption: ``save(step, force)`` after every chunk (the checkpoint manager keeps the
  interval), and a SIGTERM/SIGINT or preemption notice saves at the end of the chunk and stops the loop;
- a tqdm progress bar over the steps (rate, ETA, a few metrics in its postfix).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from mtdistill_jax.errors import UserError

log = logging.getLogger(__name__)

# Metrics shown in the progress bar's postfix when the update (or the evaluation) returns them.
PROGRESS_METRICS = ("train/total_loss", "train/pi_loss", "train/episode_return", "distill/loss", "eval/score")


class NonFiniteLossError(UserError):
    """A chunk of training produced a NaN/inf metric; the run stopped without saving that chunk's state. The
    message names the metrics, the chunk's steps and the last good checkpoint."""


class MetricsSink(Protocol):
    """What the training loops write metric rows to (e.g. :class:`~mtdistill_jax.metrics.MetricsWriter`)."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...


def chunk_end(step: int, total: int, *every: int | None) -> int:
    """End of the chunk starting at ``step``: the next multiple of any of ``every`` (None: ignored), or
    ``total``."""
    return min([total] + [(step // e + 1) * e for e in every if e])


def fmt_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def check_eval_every(eval_every, eval_fn) -> int | None:
    """``eval_every`` as an int >= 1 or None (evaluate only at the end); a ``UserError`` for a bad value or for
    ``eval_every`` without an ``eval_fn``."""
    if eval_every is not None and (isinstance(eval_every, bool) or int(eval_every) < 0):
        raise UserError(f"eval_every must be an int >= 1 (or 0/None: evaluate only at the end), got {eval_every}")
    eval_every = int(eval_every or 0) or None
    if eval_every is not None and eval_fn is None:
        raise UserError(f"eval_every={eval_every} needs an eval_fn(state, step) -> metrics")
    return eval_every


class HostLoop:
    """The host side of a chunked training loop (see the module docstring).

    ``mngr``: the run's :class:`~mtdistill_jax.checkpoint.manager.CheckpointManager`; ``total``/``step``: the
    run's length and where it starts (a resumed run: the checkpoint's step), in ``unit`` (``'update'`` offline,
    ``'env step'`` online); ``summarize(window, steps, seconds) -> row``: the logged metrics from the sums of
    the chunks since the last log (``steps`` of them, ``seconds`` of training without evaluations).
    Use::

        while not loop.done:
            start, end = loop.step, loop.chunk_end(K)
            ... run the chunk -> totals (host floats) ...
            loop.check(start, end, totals)          # raises on NaN/inf, before anything is saved
            if loop.finish(end, totals, state, save): break   # True: preempted (saved)
        loop.close()
    """

    def __init__(self, mngr, *, total: int, step: int, log_every: int, save_every: int,
                 eval_every: int | None, eval_fn: Callable[[Any, int], Mapping] | None,
                 summarize: Callable[[dict, int, float], dict], writer: MetricsSink | None = None,
                 progress: bool = True, unit: str = "update", desc: str = "train"):
        from tqdm import tqdm

        self.mngr, self.total, self.step = mngr, int(total), int(step)
        self.log_every, self.save_every, self.eval_every = int(log_every), int(save_every), eval_every
        self.eval_fn, self.summarize, self.writer, self.unit = eval_fn, summarize, writer, unit
        self.metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.preempted = False
        self._postfix: dict[str, str] = {}
        self._window: dict[str, float] = {}  # sums since the last log (host, float64)
        self._t_log, self._s_log = time.perf_counter(), self.step
        self._tqdm = tqdm
        self.bar = tqdm(total=self.total, initial=self.step, desc=desc, unit=unit.replace(" ", "_"),
                        disable=not progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def chunk_end(self, K: int) -> int:
        """End of the chunk starting at the current step (at most ``K`` steps long)."""
        return chunk_end(self.step, self.total, K, self.log_every, self.save_every, self.eval_every)

    def report(self, msg: str, *args) -> None:
        """A log line that does not break the progress bar."""
        if self.bar.disable:
            log.info(msg, *args)
        else:
            with self._tqdm.external_write_mode(file=sys.stderr):
                log.info(msg, *args)

    def check(self, start: int, end: int, totals: Mapping[str, float], *, params_finite: bool = True) -> None:
        """Raise :class:`NonFiniteLossError` when a chunk's sums are not all finite, or ``params_finite`` is
        False (the learner's parameters hold a NaN/inf), after finishing pending saves."""
        bad = sorted(k for k, v in totals.items() if not np.isfinite(v))
        if not params_finite:
            bad.append("learner params")
        if bad:
            self.mngr.wait_until_finished()
            raise NonFiniteLossError(self._nonfinite_message(bad, totals, start, end))

    def _nonfinite_message(self, bad: list[str], totals: Mapping[str, float], start: int, end: int) -> str:
        values = ", ".join(f"{k}={totals.get(k, 'NaN/inf')}" for k in bad)
        last = self.mngr.latest_step()
        if last is None:
            good = f"there is no checkpoint in {self.mngr.directory} yet (save_every={self.save_every})"
        else:
            good = (f"the last good checkpoint is step {last} in {self.mngr.directory} (running again with this "
                    "workdir resumes from it)")
        return (f"non-finite training metrics in {self.unit}s {start + 1}..{end} (sums over the chunk: {values}); "
                f"training stopped and step {end} was not saved; {good}. Check the data and the loss terms, or "
                "lower config.train.lr")

    def finish(self, end: int, totals: Mapping[str, float], state, save: Callable[[int, bool], Any]) -> bool:
        """After a (checked) chunk ending at ``end``: window, log, evaluation, progress, checkpoint. ``state`` is
        what ``eval_fn`` evaluates; ``save(step, force)`` saves the run. Returns True when the run was preempted
        (saved; stop the loop)."""
        start, self.step = self.step, int(end)
        self.bar.update(self.step - start)
        for k, v in totals.items():
            self._window[k] = self._window.get(k, 0.0) + float(v)
        row: dict[str, float] = {}
        if self.step % self.log_every == 0 or self.step == self.total:
            seconds = max(time.perf_counter() - self._t_log, 1e-9)
            self.metrics = self.summarize(self._window, self.step - self._s_log, seconds)
            row.update(self.metrics)
            self.report("step %d/%d %s", self.step, self.total, fmt_metrics(self.metrics))
            self._t_log, self._s_log, self._window = time.perf_counter(), self.step, {}
        stop = self.mngr.should_stop(self.step)  # a preemption notice: save now, no evaluation first
        if self.eval_fn is not None and not stop and ((self.eval_every and self.step % self.eval_every == 0)
                                                      or self.step == self.total):
            t_eval = time.perf_counter()
            self.eval_metrics = {k: float(v) for k, v in self.eval_fn(state, self.step).items()}
            seconds = time.perf_counter() - t_eval
            self._t_log += seconds  # the throughput of the next log counts training time only
            self.eval_metrics["perf/eval_seconds"] = seconds
            row.update(self.eval_metrics)
            self.report("eval at step %d (%.1f s) %s", self.step, seconds, fmt_metrics(self.eval_metrics))
        if row:
            self._postfix.update({k.removeprefix("train/"): f"{row[k]:.4g}" for k in PROGRESS_METRICS if k in row})
            self.bar.set_postfix(self._postfix, refresh=False)
            if self.writer is not None:
                self.writer.write(self.step, row)
        if stop:
            save(self.step, True)
            self.preempted = True
            log.warning("stopping at step %d after a preemption notice/signal (checkpoint saved)", self.step)
            return True
        save(self.step, self.step == self.total)
        return False

    def close(self) -> None:
        self.bar.close()
