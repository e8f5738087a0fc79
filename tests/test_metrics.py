"""MetricsWriter: metrics.csv that stays one valid CSV as columns appear, resumes without duplicate rows, and
TensorBoard event files with the same scalars."""

import csv
import glob
import math
import os
import struct

import numpy as np
import pytest

from mtdistill_jax.errors import UserError
from mtdistill_jax.metrics import CSV_NAME, MetricsWriter, read_metrics


def _rows(directory):
    with open(os.path.join(directory, CSV_NAME), newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _tb_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under ``logdir`` (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack_from("<Q", raw, pos)
            event = event_pb2.Event.FromString(raw[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_csv_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(2, {"train/total_loss": np.float32(0.5), "perf/steps_per_second": 10.0})
        w.write(4, {"train/total_loss": 0.25, "perf/steps_per_second": 12.0, "eval/score": 1.5,
                    "eval/cup-catch/return": 15.0})  # new columns: the header is rewritten
        w.write(6, {"train/total_loss": float("nan")})
        assert w.fieldnames[:2] == ["step", "wall_time"]
    fields, rows = _rows(tmp_path)
    assert fields == ["step", "wall_time", "perf/steps_per_second", "train/total_loss", "eval/cup-catch/return",
                      "eval/score"]
    assert [r["step"] for r in rows] == ["2", "4", "6"]
    assert rows[0]["eval/score"] == "" and float(rows[1]["eval/score"]) == 1.5
    assert float(rows[0]["train/total_loss"]) == 0.5 and rows[2]["train/total_loss"] == "nan"
    times = [float(r["wall_time"]) for r in rows]
    assert 0 <= times[0] <= times[1] <= times[2]
    cols = read_metrics(tmp_path)
    np.testing.assert_array_equal(cols["step"], [2, 4, 6])
    assert math.isnan(cols["eval/score"][0]) and cols["eval/score"][1] == 1.5 and math.isnan(cols["eval/score"][2])

    scalars = _tb_scalars(tmp_path / "tb")
    assert scalars["train/total_loss"][:2] == [(2, 0.5), (4, 0.25)]
    assert scalars["eval/score"] == [(4, 1.5)]


def test_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in (1, 2, 3, 4):
            w.write(step, {"train/loss": float(step)})
    last_kept_time = float(_rows(tmp_path)[1][1]["wall_time"])
    # the run died after logging step 4 but its last checkpoint is step 2: rows 3 and 4 will be done again
    with MetricsWriter(tmp_path, start_step=2) as w:
        w.write(3, {"train/loss": 30.0, "eval/score": 1.0})
    fields, rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["train/loss"] for r in rows] == ["1.0", "2.0", "30.0"] and rows[2]["eval/score"] == "1.0"
    assert float(rows[2]["wall_time"]) >= last_kept_time  # wall time adds up over restarts
    # a fresh run (start_step=0) in the same directory starts a new file
    with MetricsWriter(tmp_path, start_step=0) as w:
        w.write(1, {"x": 1.0})
    fields, rows = _rows(tmp_path)
    assert fields == ["step", "wall_time", "x"] and len(rows) == 1


def test_row_cut_short_by_a_crash_is_dropped(tmp_path):
    (tmp_path / CSV_NAME).write_text("step,wall_time,a,b\n1,0.1,1.0,2.0\n2,0.2,3.0,4.0\n3,0.3,5.")
    with MetricsWriter(tmp_path, start_step=10, tensorboard=False) as w:
        w.write(11, {"a": 7.0, "b": 8.0})
    assert [r["step"] for r in _rows(tmp_path)[1]] == ["1", "2", "11"]
    assert not (tmp_path / "tb").exists()


def test_errors(tmp_path):
    (tmp_path / CSV_NAME).write_text("epoch,loss\n1,2\n")
    with pytest.raises(UserError, match=r"is not a metrics file of this library .*'epoch'"):
        MetricsWriter(tmp_path, start_step=5, tensorboard=False)
    with MetricsWriter(tmp_path / "w", tensorboard=False) as w:
        with pytest.raises(UserError, match=r"reserved"):
            w.write(1, {"step": 1.0})
        with pytest.raises(UserError, match=r"metric 'a' has the value 'x'"):
            w.write(1, {"a": "x"})
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nothing")
