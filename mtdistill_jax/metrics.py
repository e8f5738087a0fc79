"""Metrics a run writes for people to plot: TensorBoard event files and one CSV, side by side.

``MetricsWriter(directory)`` appends every ``write(step, {name: value})`` to

- ``<directory>/metrics.csv``: columns ``step``, ``wall_time`` (seconds of the run since it started, summed
  over restarts) and one column per metric name (``train/reward_loss``, ``distill/loss``, ``eval/score``,
  ``perf/steps_per_second``, ...), in the order the names first appeared; a row leaves empty the metrics it
  does not carry (``pandas.read_csv`` reads them as NaN). When a write brings a name the file has no column
  for (e.g. the first evaluation), the file is rewritten with the wider header, so it stays one valid CSV
  that ``pandas.read_csv`` / ``csv.DictReader`` / :func:`read_metrics` read;
- ``<directory>/tb/``: TensorBoard event files (tensorboardX), one scalar per metric name and step
  (``tensorboard --logdir <directory>/tb``).

Resuming: ``MetricsWriter(directory, start_step=N)`` (N = the checkpoint step the run resumes from) keeps the
rows with ``step <= N`` of an existing ``metrics.csv`` and appends after them (rows of steps the restarted run
will do again are dropped, so none appears twice); TensorBoard is told to purge events after step N
(``purge_step``). ``start_step=0`` (a fresh run) starts a new CSV. Rows are flushed as they are written.
"""

from __future__ import annotations

import csv
import errno
import math
import os
import time
from collections.abc import Mapping

import numpy as np

from mtdistill_jax.errors import UserError

__all__ = ["CSV_NAME", "TB_DIR", "MetricsWriter", "read_metrics"]

CSV_NAME = "metrics.csv"
TB_DIR = "tb"
_FIXED = ("step", "wall_time")


def _read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a metrics CSV (a row cut short by a crash mid-write is left out)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if header and header[:2] != list(_FIXED):
            raise UserError(f"{path} is not a metrics file of this library (its header starts with "
                            f"{header[:2]}, expected {list(_FIXED)}); move it away or use another workdir")
        rows = [r for r in reader if None not in r.values() and None not in r]
    return header, rows


def _to_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"metric {name!r} has the value {value!r}; metrics must be numbers (scalars)") from None


class MetricsWriter:
    """Writes metric dicts to ``<directory>/metrics.csv`` and TensorBoard (``<directory>/tb``).

    ``start_step``: the step the run starts from (0: fresh, truncates an existing CSV; N > 0: resumed from a
    checkpoint at step N, keeps the rows up to N). ``tensorboard=False`` writes only the CSV. Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike, *, start_step: int = 0, tensorboard: bool = True):
        if int(start_step) < 0:
            raise UserError(f"start_step must be >= 0, got {start_step}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.csv_path = os.path.join(self.directory, CSV_NAME)
        self.tb_dir = os.path.join(self.directory, TB_DIR)
        os.makedirs(self.directory, exist_ok=True)
        self._fields: list[str] = list(_FIXED)
        self._time_offset = 0.0  # wall time of the run before this process (from the kept rows)
        self._t0 = time.monotonic()
        self._file = None
        self._closed = False
        kept: list[dict[str, str]] = []
        if start_step > 0 and os.path.isfile(self.csv_path) and os.path.getsize(self.csv_path) > 0:
            header, rows = _read_rows(self.csv_path)
            kept = [r for r in rows if _step_of(r) is not None and _step_of(r) <= start_step]
            if kept:
                self._fields = header
                self._time_offset = max((_float_or(r.get("wall_time"), 0.0) for r in kept), default=0.0)
        if kept:
            self._rewrite(kept)
        elif os.path.exists(self.csv_path):
            os.remove(self.csv_path)  # a fresh run (or nothing kept): the header comes with the first row
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: it pulls in torch when that is installed

            self._tb = SummaryWriter(logdir=self.tb_dir, purge_step=int(start_step) + 1, flush_secs=30)

    # ------------------------------------------------------------------------------------------- write
    @property
    def fieldnames(self) -> list[str]:
        """CSV columns: ``step``, ``wall_time``, then the metric names in order of first appearance."""
        return list(self._fields)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One CSV row and one TensorBoard scalar per metric, at ``step`` (updates done). Values are Python
        or NumPy/JAX scalars (NaN/inf are written as ``nan``/``inf``)."""
        if self._closed:
            raise RuntimeError("MetricsWriter.write after close()")
        values = {str(k): _to_float(k, v) for k, v in metrics.items()}
        reserved = sorted(set(values) & set(_FIXED))
        if reserved:
            raise UserError(f"metric names {reserved} are reserved for the CSV's own columns")
        step = int(step)
        wall = self._time_offset + (time.monotonic() - self._t0)
        new = sorted(k for k in values if k not in self._fields)
        if new or self._file is None:
            self._fields += new
            rows = _read_rows(self.csv_path)[1] if os.path.isfile(self.csv_path) else []
            self._rewrite(rows)
        row = {"step": step, "wall_time": f"{wall:.3f}", **{k: repr(v) for k, v in values.items()}}
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            now = time.time()
            for k, v in values.items():
                self._tb.add_scalar(k, v, step, walltime=now)
            self._tb.flush()

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Write the header ``self._fields`` and ``rows`` to a new file that replaces the CSV, then append."""
        if self._file is not None:
            self._file.close()
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv_path)
        self._file = open(self.csv_path, "a", newline="")  # noqa: SIM115 (closed by close())
        self._writer = csv.DictWriter(self._file, fieldnames=self._fields, restval="", extrasaction="ignore")

    # ------------------------------------------------------------------------------------------- close
    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the CSV and the event file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _float_or(s: str | None, default: float) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return default


def _step_of(row: Mapping[str, str]) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


def read_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a ``metrics.csv`` (or of ``<path>/metrics.csv`` for a run directory) as float64 arrays
    of one length (NaN where a row has no value); ``step`` as int64. No pandas needed."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CSV_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    header, rows = _read_rows(path)
    out = {k: np.asarray([_float_or(r.get(k), math.nan) for r in rows], np.float64) for k in header}
    if "step" in out:
        out["step"] = out["step"].astype(np.int64)
    return out
