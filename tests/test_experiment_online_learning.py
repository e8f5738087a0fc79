"""experiments/online_learning.py: arguments, the launch command and the report from a run's files (synthetic
metrics and evaluations; the run itself is launch/train.py's online path, tested elsewhere)."""

import json
from pathlib import Path

import numpy as np
import pytest
from refdata import load_experiment

from mtdistill_jax.evaluate import EvalResult
from mtdistill_jax.metrics import MetricsWriter


@pytest.fixture(scope="module")
def exp():
    return load_experiment("online_learning")


def test_arguments_and_command(exp):
    args = exp.parse_args(["--task=cartpole-balance", "--out=runs/x", "--steps=2000", "--envs_per_task=2"])
    cmd = exp.train_command(args, Path("."))
    assert cmd[1:3] == ["launch/train.py", "--config=mtdistill_jax/configs/online.py"]
    assert "--config.online.envs_per_task=2" in cmd and "--config.steps=2000" in cmd and "--workdir=runs/x" in cmd
    assert args.results.endswith("online_cartpole-balance_2k")
    with pytest.raises(SystemExit):
        exp.parse_args(["--task=cartpole-balance", "--out=x", "--stages=train,plot"])
    with pytest.raises(SystemExit):
        exp.parse_args(["--task=cartpole-balance", "--out=x", "--steps=0"])


def test_report_from_a_run(exp, tmp_path):
    work, res = tmp_path / "run", tmp_path / "results"
    w = MetricsWriter(str(work))
    w.write(1000, {"perf/env_steps_per_second": 900.0, "perf/updates_per_second": 0.0, "train/updates": 0.0,
                   "train/episode_return": 250.0})
    for step, rate in ((2000, 1.0), (3000, 4.0), (4000, 3.0), (5000, 5.0)):  # 2000: the pretraining window
        w.write(step, {"perf/env_steps_per_second": rate, "perf/updates_per_second": rate,
                       "train/updates": float(step), "train/episode_return": step / 10})
    w.close()
    (work / "eval").mkdir()
    EvalResult(tasks=["cartpole-balance"], returns=np.array([[700.0, 900.0]]), mode="sample",
               seconds=1.0, compile_seconds=0.0, plan_calls=0).save(str(work / "eval" / "step_000004000.json"))
    args = exp.parse_args(["--task=cartpole-balance", f"--out={work}", f"--results={res}", "--steps=8000",
                           "--eval_every=4000", "--eval_episodes=2"])
    summary = exp.report(args)
    assert summary["env_steps_done"] == 5000 and summary["updates"] == 5000
    assert summary["env_steps_per_second"] == 4.0  # median of 4, 3, 5 (the pretraining window left out)
    assert summary["evaluations"] == [{"step": 4000, "returns": [700.0, 900.0], "mean": 800.0}]
    assert summary["best_eval"] == 800.0 and summary["official"]["100000"] == [997.9, 997.0, 998.4]
    assert json.loads((res / "results.json").read_text())["env_steps_planned"] == 8000
    text = (res / "README.md").read_text()
    assert "Partial: the run has done 5,000 of 8,000" in text and "| 4,000 | 800.0 | 700, 900 |" in text
    assert (res / "curve.png").stat().st_size > 10_000 and (res / "metrics.csv").is_file()
