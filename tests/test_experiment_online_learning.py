"""experiments/online_learning.py: arguments, the launch command and the report from a run's files (synthetic
metrics and evaluations; the run itself is launch/train.py's online path, tested elsewhere)."""

import json
import subprocess
import sys
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
    # several tasks: one program; counts are env steps of all envs together, so multiples of their number
    args = exp.parse_args(["--task=cartpole-balance, walker-walk", "--out=x", "--envs_per_task=3", "--steps=600",
                           "--log_every=60", "--save_every=120", "--eval_every=300"])
    assert args.tasks == ["cartpole-balance", "walker-walk"] and args.results.endswith(
        "online_cartpole-balance+walker-walk_0k")
    assert "--config.tasks=cartpole-balance,walker-walk" in exp.train_command(args)
    for bad in (["--steps=600", "--log_every=500"], ["--task=walker-walk,walker-walk"]):
        with pytest.raises(SystemExit):
            exp.parse_args(["--task=cartpole-balance,walker-walk", "--out=x", "--envs_per_task=3", "--steps=600",
                            "--log_every=60", "--save_every=120", "--eval_every=300", *bad])


def test_train_output_is_logged(exp, tmp_path):
    log = tmp_path / "train.log"
    log.write_text("I1130 online.py:373] compiled the online chunk in 46.0 s\n")
    exp.run_logged([sys.executable, "-c", "print('compiled the online chunk in 61.5 s')"], log)
    assert exp.read_compile_seconds(tmp_path) == [46.0, 61.5]
    with pytest.raises(subprocess.CalledProcessError):
        exp.run_logged([sys.executable, "-c", "raise SystemExit(3)"], log)


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
    cartpole = summary["per_task"]["cartpole-balance"]
    assert cartpole["evaluations"] == [{"step": 4000, "returns": [700.0, 900.0], "mean": 800.0}]
    assert cartpole["best_eval"] == 800.0 and cartpole["official"]["100000"] == [997.9, 997.0, 998.4]
    assert cartpole["last_train_return"] == 500.0 and summary["compile_seconds"] == []
    assert json.loads((res / "results.json").read_text())["env_steps_planned"] == 8000
    text = (res / "README.md").read_text()
    assert "Partial: the run has done 5,000 of 8,000" in text and "| 4,000 | 800.0 | 700, 900 |" in text
    assert (res / "curve.png").stat().st_size > 10_000 and (res / "metrics.csv").is_file()


def test_report_of_several_tasks(exp, tmp_path):
    """Per-task curves from ``train/<task>/episode_return`` and per-task evaluations of one run."""
    tasks = ["cartpole-balance", "finger-spin", "pendulum-swingup"]
    work, res = tmp_path / "run", tmp_path / "results"
    w = MetricsWriter(str(work))
    for step in (1200, 2400, 3600):
        w.write(step, {"perf/env_steps_per_second": step / 1200, "perf/updates_per_second": 1.0,
                       "train/updates": float(step), "train/episode_return": 1.0,
                       **{f"train/{t}/episode_return": step / 10 + i for i, t in enumerate(tasks)}})
    w.close()
    (work / "eval").mkdir()
    EvalResult(tasks=tasks, returns=np.array([[10.0, 30.0], [400.0, 600.0], [0.0, 2.0]]), mode="sample",
               seconds=1.0, compile_seconds=0.0, plan_calls=0).save(str(work / "eval" / "step_000003600.json"))
    (work / "train.log").write_text("compiled the online chunk in 200.5 s\n")
    args = exp.parse_args([f"--task={','.join(tasks)}", f"--out={work}", f"--results={res}", "--steps=3600",
                           "--envs_per_task=4", "--log_every=1200", "--save_every=1200", "--eval_every=3600",
                           "--eval_episodes=2"])
    summary = exp.report(args)
    assert summary["tasks"] == tasks and summary["compile_seconds"] == [200.5]
    assert [summary["per_task"][t]["last_train_return"] for t in tasks] == [360.0, 361.0, 362.0]
    assert [summary["per_task"][t]["best_eval"] for t in tasks] == [20.0, 500.0, 1.0]
    assert summary["per_task"]["pendulum-swingup"]["official"] == {}  # TD-MPC2 published no curve for it
    assert summary["per_task"]["finger-spin"]["official"]["100000"] == [919.6, 937.3, 985.6]
    text = (res / "README.md").read_text()
    assert "Partial" not in text and "## finger-spin" in text and "| 3,600 | 500.0 | 400, 600 |" in text
    assert "compile of the fused program: 200 s" in text and "(12 in all)" in text and "3,600 (1,200 per task)" in text
    assert (res / "curve.png").stat().st_size > 10_000
