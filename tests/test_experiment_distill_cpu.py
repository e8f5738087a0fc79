"""experiments/distill_cpu.py: arguments, run configs and the report (statistics, CSV, PNG, Markdown) from the files
its stages write, on synthetic results (the stages themselves are the library's collect/evaluate/train/convert,
tested elsewhere; the whole experiment runs for hours)."""

import csv
import json

import numpy as np
import pytest
from refdata import load_experiment

from mtdistill_jax.evaluate import EvalResult

TASKS = ["cartpole-balance", "reacher-easy"]


@pytest.fixture(scope="module")
def exp():
    return load_experiment("distill_cpu")


def _result(returns, seed):
    returns = np.asarray(returns, np.float64)
    return EvalResult(tasks=TASKS, returns=returns, mode="prior/mean", seconds=1.0, compile_seconds=0.0,
                      plan_calls=1, seeds=(seed,), episode_length=500)


def test_args_and_configs(exp, tmp_path):
    args = exp.parse_args([f"--out={tmp_path}", "--steps=30", "--batch=16", "--seeds=0,2"])
    assert args.arms == list(exp.ARMS) and args.seeds == [0, 2] and args.tasks == list(exp.TASKS)
    with pytest.raises(SystemExit):
        exp.parse_args([f"--out={tmp_path}", "--arms=scratch,nope"])
    scratch = exp.train_config(args, "scratch", 2)
    assert (scratch.steps, scratch.seed, scratch.train.batch_size) == (30, 3, 16) and "distill" not in scratch
    both = exp.train_config(args, "reward_policy", 0)
    assert (both.distill.d_coef, both.distill.policy_weight, both.distill.reward_weight) == (0.45, 1.0, 1.0)
    assert both.model.model_size == 1 and both.seed == 1
    assert exp.train_config(args, "reward", 0).distill.policy_weight == 0.0


def test_resume_refuses_other_settings(exp, tmp_path):
    args = exp.parse_args([f"--out={tmp_path}", "--steps=30"])
    exp.check_same_args(args, tmp_path)
    exp.check_same_args(exp.parse_args([f"--out={tmp_path}", "--steps=30", "--seeds=0,1,2,3"]), tmp_path)
    with pytest.raises(SystemExit, match=r"other settings --steps=30 \(now 40\)"):
        exp.check_same_args(exp.parse_args([f"--out={tmp_path}", "--steps=40"]), tmp_path)


def test_report_statistics_and_files(exp, tmp_path):
    out, res = tmp_path / "out", tmp_path / "res"
    args = exp.parse_args([f"--out={out}", f"--results={res}", f"--tasks={','.join(TASKS)}", "--seeds=0,1,2",
                           "--eval_episodes=2", "--teacher=teacher.pt", "--stages=report"])
    # per seed: scratch returns r, the reward arm r + 100 * (1 + seed) on the first task, the teacher 900
    base = {s: [[100.0 + s, 120.0 + s], [50.0, 70.0]] for s in args.seeds}
    for s in args.seeds:
        (out / "final").mkdir(parents=True, exist_ok=True)
        (out / "teacher").mkdir(parents=True, exist_ok=True)
        _result(base[s], exp.run_seed(s)).save(out / "final" / f"scratch_s{s}_prior.json")
        better = np.array(base[s]) + [[100.0 * (1 + s)] * 2, [0.0, 0.0]]
        _result(better, exp.run_seed(s)).save(out / "final" / f"reward_s{s}_prior.json")
        _result([[900.0, 900.0], [900.0, 900.0]], exp.run_seed(s)).save(out / "teacher" / f"prior_s{s}.json")
        run = out / "runs" / f"scratch_s{s}"
        run.mkdir(parents=True)
        with open(run / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train/total_loss", "eval/score", *[f"eval/{t}/return" for t in TASKS]])
            w.writerow([5, 1.0, "", "", ""])
            w.writerow([10, 0.5, 4.0 + s, 40.0, 40.0])
            w.writerow([20, 0.4, 8.0 + s, 80.0, 80.0])
    exp.stage_report(args, out)
    rep = json.loads((res / "results.json").read_text())

    scratch = rep["arms"]["scratch"]
    # per seed: task means (110 + s, 60) / 10 -> score (17 + s/10) / 2 ... checked against a direct computation
    seed_scores = [np.mean([(110 + s) / 10, 6.0]) for s in args.seeds]
    assert scratch["score"] == pytest.approx(np.mean(seed_scores))
    assert scratch["score_se"] == pytest.approx(np.std(seed_scores, ddof=1) / np.sqrt(3))
    assert scratch["tasks"]["reacher-easy"] == {"mean": pytest.approx(6.0), "se": pytest.approx(0.0)}
    paired = rep["paired_vs_scratch"]["reward"]
    diffs = [100 * (1 + s) / 10 / 2 for s in args.seeds]  # +100(1+s) on one task of two, normalized /10
    assert paired["mean_diff"] == pytest.approx(np.mean(diffs)) and paired["wins"] == 3
    assert paired["se_diff"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert paired["t"] == pytest.approx(np.mean(diffs) / (np.std(diffs, ddof=1) / np.sqrt(3)))
    assert 0 < paired["p"] < 0.2
    assert rep["teacher"]["score"] == pytest.approx(90.0)
    assert rep["curves"]["scratch"]["1"] == [[10, 5.0], [20, 9.0]]  # rows without an evaluation are skipped

    rows = list(csv.DictReader((res / "scores.csv").read_text().splitlines()))
    assert [r["agent"] for r in rows] == ["teacher"] * 3 + ["scratch"] * 3 + ["reward"] * 3
    assert float(rows[3]["cartpole-balance"]) == pytest.approx(11.0)
    assert (res / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (res / "README.md").read_text()
    assert "| teacher (ceiling) | 3 |" in md and "(b) distilled" in md and "paired over seeds [0, 1, 2]" in md
    assert ("python experiments/distill_cpu.py --out=runs/distill_cpu --teacher=teacher.pt "
            "--tasks=cartpole-balance,reacher-easy --eval_episodes=2\n") in md


def test_paired_episodes_of_quantized_students(exp):
    """Each dtype minus float16, episode by episode over all seeds: mean, SE, p and identical episodes."""
    base = {s: np.array([[100.0 + s, 300.0], [50.0, 70.0 + 10 * s]]) for s in (0, 1, 2)}
    shift = {s: np.array([[-10.0 * s, 0.0], [0.0, -20.0]]) for s in (0, 1, 2)}
    a = [_result(base[s] + shift[s], exp.run_seed(s)) for s in (0, 1, 2)]
    b = [_result(base[s], exp.run_seed(s)) for s in (0, 1, 2)]
    got = exp._paired_episodes(a, b)
    d = np.concatenate([shift[s] for s in (0, 1, 2)], axis=1).ravel() / 10  # normalized: return / 10
    assert got["episodes"] == 12 and got["identical"] == int((d == 0).sum()) == 7
    assert got["mean_diff"] == pytest.approx(d.mean()) and got["se_diff"] == pytest.approx(d.std(ddof=1) / np.sqrt(12))
    assert 0 < got["p"] < 0.1
    assert exp._paired_episodes(b, b) == {"mean_diff": 0.0, "se_diff": 0.0, "p": 1.0, "episodes": 12, "identical": 12}
