"""benchmarks/compare_official.py: its arguments and messages always; its equality checks against the official
PyTorch TD-MPC2 when ``MTDISTILL_TDMPC2_REPO`` names a checkout of it (and torch + tensordict are installed:
``pip install -e '.[official]'``), skipped with that message otherwise."""

import os
import subprocess
import sys

import pytest

from benchmarks import compare_official as co

REPO_ENV = "MTDISTILL_TDMPC2_REPO"


def test_without_a_checkout_it_says_what_to_give(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/compare_official.py", "--quick"], capture_output=True,
                         text=True, cwd=co.REPO, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--tdmpc2_repo=PATH is required" in out.stderr and "nicklashansen/tdmpc2" in out.stderr
    with pytest.raises(SystemExit, match="is not a TD-MPC2 checkout: missing tdmpc2/tdmpc2.py"):
        co.main([f"--tdmpc2_repo={tmp_path}"])


def test_arguments():
    args = co.parse_args(["--tdmpc2_repo=x", "--quick"])
    assert (args.threads, args.repeats, args.act30_repeats, args.sizes, args.teachers) == ([2], 6, 3, [1, 5], [5])
    args = co.parse_args(["--tdmpc2_repo=x", "--threads=1", "--sizes=5", "--repeats=4"])
    assert (args.threads, args.repeats, args.act30_repeats, args.sizes) == ([1], 4, 20, [5])
    assert (args.eval_steps, len(args.eval_tasks), args.eval_repeats) == (10, 30, 2)
    assert co.parse_args(["--tdmpc2_repo=x", "--quick"]).eval_steps == 0  # --quick: no evaluation row
    args = co.parse_args(["--tdmpc2_repo=x", "--eval_steps=20", "--eval_tasks=walker-walk,cup-catch"])
    assert (args.eval_steps, args.eval_tasks) == (20, ["walker-walk", "cup-catch"])
    assert co.parse_args(["--tdmpc2_repo=x"]).parts == ["main", "eval"]
    assert co.parse_args(["--tdmpc2_repo=x", "--parts=eval"]).parts == ["eval"]
    for bad in (["--sizes=2"], ["--teachers=3"], ["--threads=0"], ["--repeats=1"], ["--sizes=a"],
                ["--eval_steps=3"], ["--eval_steps=-10"], ["--eval_tasks=walker-fly"], ["--eval_repeats=1"],
                ["--parts=update"], ["--parts="], ["--parts=eval", "--eval_steps=0"], ["--parts=eval", "--quick"]):
        with pytest.raises(SystemExit):
            co.parse_args(["--tdmpc2_repo=x", *bad])


def test_report_table():
    row = {"row": "update MT30 1M, B 256, H 3", "flops": 2e9,
           "official": {"median_ms": 300.0, "p10_ms": 290.0, "p90_ms": 320.0, "first_s": 0.4},
           "ours": {"median_ms": 200.0, "p10_ms": 195.0, "p90_ms": 210.0, "first_s": 12.0}}
    res = {"threads": 2, "jax": "0.x", "torch": "2.x", "matmul_gflops": {"jax": 100.0, "torch": 50.0},
           "loadavg_start": (0.1, 0, 0), "loadavg_end": (1.9, 0, 0), "rows": [row],
           "checks": {"update": {"td_targets_max_abs": 1e-6, "params_after_max_abs": 8e-6, "grad_norm_rel": 2e-6,
                                 "pi_loss_rel": 5e-6},
                      "values": {"values_max_abs": 3e-6, "values_abs_range": [0.001, 0.5], "same_elites": True}}}
    ev = {"row": "evaluation, 30 tasks x 1 episode, 10 agent steps (1M planner)", "flops": 9e12, "agent_steps": 300,
          "official": {"median_ms": 60000.0, "p10_ms": 59000.0, "p90_ms": 61000.0, "first_s": 61.0,
                       "agent_steps_per_s": 5.0},
          "ours": {"median_ms": 40000.0, "p10_ms": 39000.0, "p90_ms": 41000.0, "first_s": 400.0,
                   "agent_steps_per_s": 7.5}}
    res = {**res, "rows": [row, ev], "eval_xla_flags": "--xla_cpu_use_fusion_emitters=false"}
    text = co.table([res], "python benchmarks/compare_official.py --quick")
    assert "| evaluation, 30 tasks x 1 episode, 10 agent steps (1M planner) | 60,000.0 (59,000-61,000) | " in text
    assert "official 5.00 agent steps/s" in text and "ours 7.50" in text and "runs 300 agent steps" in text
    # speed-up 300 / 200; % peak: 2 GFLOP in 0.3 s = 6.7 GFLOP/s of torch's 50, in 0.2 s = 10 of jax's 100
    assert "| update MT30 1M, B 256, H 3 | 300.0 (290-320) | 200.0 (195-210) | 1.50 | 0.4 / 12.0 | 13 / 10 |" in text
    assert "## 2 thread(s)" in text and "within 5.0e-06 relative" in text and "same top-64 elites: True" in text


def test_report_table_of_the_evaluation_row_alone():
    """``--parts=eval``: the row, and of the equality checks only the planner values that row's planner ran."""
    ev = {"row": "evaluation, 30 tasks x 1 episode, 10 agent steps (1M planner)", "agent_steps": 300,
          "official": {"median_ms": 90000.0, "p10_ms": 89000.0, "p90_ms": 91000.0, "first_s": 80.0,
                       "agent_steps_per_s": 3.3},
          "ours": {"median_ms": 60000.0, "p10_ms": 59000.0, "p90_ms": 61000.0, "first_s": 600.0,
                   "agent_steps_per_s": 5.0}}
    res = {"threads": 1, "jax": "0.x", "torch": "2.x", "matmul_gflops": {"jax": 100.0, "torch": 50.0},
           "loadavg_start": (0.1, 0, 0), "loadavg_end": (0.2, 0, 0), "rows": [ev], "xla_flags": "--f",
           "eval_xla_flags": "--f",
           "checks": {"values": {"values_max_abs": 3e-6, "values_abs_range": [0.001, 0.5], "same_elites": True}}}
    text = co.table([res], "cmd")
    assert "| 90,000.0 (89,000-91,000) | 60,000.0 (59,000-61,000) | 1.50 | 80.0 / 600.0 |" in text
    assert ("Equality before timing (size 1, dropout 0, same weights and draws): planner values of 512 samples "
            "within 3.0e-06 (|value| 0.001-0.5), same top-64 elites: True.") in text
    assert "TD targets" not in text


def test_a_torch_compile_row_that_fails_is_reported_not_raised():
    assert not co.parse_args(["--tdmpc2_repo=x"]).torch_compile
    assert co.parse_args(["--tdmpc2_repo=x", "--torch_compile"]).torch_compile
    name = co.update_row_name(1, 256, 3, True)
    assert name == "update MT30 1M, B 256, H 3, official torch.compile"

    def fails():
        raise RuntimeError("backend='inductor' raised:\nmore detail")

    r = co.compile_row(name, fails)
    assert r == {"row": name, "error": "RuntimeError: backend='inductor' raised:"}
    ok = {"row": name, "official": {}, "ours": {}}
    assert co.compile_row(name, lambda: ok) is ok
    res = {"threads": 1, "jax": "0.x", "torch": "2.x", "matmul_gflops": {"jax": 100.0, "torch": 50.0},
           "loadavg_start": (0.1, 0, 0), "loadavg_end": (0.2, 0, 0), "rows": [r],
           "checks": {"update": {"td_targets_max_abs": 1e-6, "params_after_max_abs": 8e-6, "grad_norm_rel": 2e-6},
                      "values": {"values_max_abs": 3e-6, "values_abs_range": [0.001, 0.5], "same_elites": True}}}
    text = co.table([res], "cmd")
    assert f"| {name} | fails: RuntimeError: backend='inductor' raised: | | | | |" in text


@pytest.fixture(scope="module")
def official():
    path = os.environ.get(REPO_ENV)
    if not path:
        pytest.skip(f"set {REPO_ENV} to a checkout of github.com/nicklashansen/tdmpc2 (tested at "
                    f"{co.TESTED_COMMIT}) and pip install -e '.[official]' to check against the official code")
    pytest.importorskip("tensordict", reason="pip install -e '.[official]'")
    return co.load_official(path)


def test_update_equals_the_official_one(official):
    out = co.check_update(official, size=1, batch_size=8)
    assert out["td_targets_max_abs"] <= co.TD_ATOL and out["params_after_max_abs"] <= co.PARAM_ATOL


def test_distillation_step_equals_the_two_pass_official_one(official):
    out = co.check_update(official, size=1, batch_size=8, teacher_size=1)
    assert out["distill_loss_rel"] <= co.SCALAR_RTOL and out["params_after_max_abs"] <= co.PARAM_ATOL


def test_planner_values_equal_the_official_ones(official):
    out = co.check_values(official, size=1, task_id=13)
    assert out["values_max_abs"] <= co.VALUE_ATOL and out["same_elites"]


def test_a_difference_is_caught(official, monkeypatch):
    """Official weights that differ from ours in the reward head's output bias (every other bin: a shift of all
    bins would leave the softmax as it is): the reward loss disagrees."""
    make = co.Official.agent

    def shifted(self, *args, **kw):
        agent = make(self, *args, **kw)
        bias = dict(agent.model._reward.named_parameters())
        name = sorted(k for k in bias if k.endswith("bias"))[-1]  # the output layer (no LayerNorm after)
        with self.torch.no_grad():
            bias[name][::2].add_(0.5)
        return agent

    monkeypatch.setattr(co.Official, "agent", shifted)
    with pytest.raises(co.MismatchError, match="update step, size 1: .*reward_loss"):
        co.check_update(official, size=1, batch_size=8)
