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
    # first call 12.0 s, of which one call (0.2 s) ran: 11.8 s compile
    assert ("| update MT30 1M, B 256, H 3 | 300.0 (290-320) | 200.0 (195-210) | 1.50 | 0.4 / 12.0 (11.8) | 13 / 10 |"
            in text)
    assert "## 2 thread(s)" in text and "within 5.0e-06 relative" in text and "same top-64 elites: True" in text
    assert "glibc allocator as is" in text
    # the peaks measured again at the end: '% peak' against the higher of the two, per framework
    res = {**res, "rows": [row], "matmul_gflops_end": {"jax": 200.0, "torch": 40.0}, "malloc_tuned": True,
           "malloc_arena_max": 1}
    text = co.table([res], "python benchmarks/compare_official.py --quick")
    assert "jax 100 / 200 GFLOP/s, torch 50 / 40" in text and "| 1.50 | 0.4 / 12.0 (11.8) | 13 / 5 |" in text
    assert "tune_malloc, both sides; one arena)" in text


def test_gpu_arguments():
    """``--device=gpu``: one setting with every core for the host side, planning rows up to 300 envs, its own table
    file; ``--threads`` is refused there; the new row options are checked."""
    args = co.parse_args(["--tdmpc2_repo=x", "--device=gpu", "--teacher_bf16", "--eval_episodes=10"])
    assert (args.device, args.threads, args.act_envs) == ("gpu", [os.cpu_count()], [1, 30, 300])
    assert args.teacher_bf16 and args.eval_episodes == 10 and args.out.endswith("compare_official_gpu.md")
    args = co.parse_args(["--tdmpc2_repo=x"])
    assert (args.device, args.act_envs, args.teacher_bf16, args.eval_episodes) == ("cpu", [1, 30], False, 1)
    assert args.out.endswith("benchmarks/results/compare_official_cpu.md")
    assert co.parse_args(["--tdmpc2_repo=x", "--act_envs=1,300"]).act_envs == [1, 300]
    for bad in (["--device=gpu", "--threads=1"], ["--device=tpu"], ["--act_envs=0"], ["--act_envs=a"],
                ["--act_envs="], ["--eval_episodes=0"]):
        with pytest.raises(SystemExit):
            co.parse_args(["--tdmpc2_repo=x", *bad])


def test_report_table_on_gpu():
    """The GPU table: the device named, both dtypes' matmul throughput, and a bf16-teacher row's share of the bf16
    peak (the float32 rows' of the float32 peak)."""
    row = {"row": "update MT30 1M, B 256, H 3", "flops": 2e9, "peak": "float32",
           "official": {"median_ms": 20.0, "p10_ms": 19.0, "p90_ms": 21.0, "first_s": 0.4},
           "ours": {"median_ms": 4.0, "p10_ms": 3.9, "p90_ms": 4.1, "first_s": 12.0}}
    distill = {"row": "distill step, teacher 317M in bf16 + student 1M, B 256", "flops": 4e12, "peak": "bfloat16",
               "official": {"median_ms": 100.0, "p10_ms": 99.0, "p90_ms": 101.0, "first_s": 1.0},
               "ours": {"median_ms": 40.0, "p10_ms": 39.0, "p90_ms": 41.0, "first_s": 30.0}}
    res = {"threads": 16, "device": "gpu", "device_name": "NVIDIA H200", "jax": "0.x", "torch": "2.x",
           "matmul_n": 8192, "matmul_gflops": {"jax": 50000.0, "torch": 40000.0},
           "matmul_gflops_bf16": {"jax": 500000.0, "torch": 400000.0},
           "loadavg_start": (0.1, 0, 0), "loadavg_end": (0.2, 0, 0), "rows": [row, distill], "xla_flags": "",
           "checks": {"values": {"values_max_abs": 3e-6, "values_abs_range": [0.001, 0.5], "same_elites": True}}}
    text = co.table([res], "cmd")
    assert text.startswith("# Ours vs the official PyTorch TD-MPC2, same run, GPU")
    assert "GPU: NVIDIA H200; CPU: " in text and "## GPU" in text and "thread(s)" not in text
    assert "float32 matmul (8192^2): jax 50000 GFLOP/s, torch 40000 GFLOP/s; bf16: jax 500000, torch 400000" in text
    # 2 GFLOP in 20 ms = 100 GFLOP/s of torch's 40,000 float32 (0.25 %), in 4 ms = 500 of jax's 50,000 (1 %)
    assert "| 20.0 (19-21) | 4.0 (4-4) | 5.00 | 0.4 / 12.0 (12.0) | 0 / 1 |" in text
    # 4 TFLOP in 100 ms = 40 TFLOP/s of torch's 400 bf16 (10 %), in 40 ms = 100 of jax's 500 (20 %)
    assert "| distill step, teacher 317M in bf16 + student 1M, B 256 | 100.0 (99-101) | 40.0 (39-41) | 2.50 | " \
           "1.0 / 30.0 (30.0) | 10 / 20 |" in text


def test_report_table_of_the_evaluation_row_alone():
    """``--parts=eval``: the row, and of the equality checks only the planner values that row's planner ran."""
    ev = {"row": "evaluation, 30 tasks x 1 episode, 10 agent steps (1M planner)", "agent_steps": 300,
          "official": {"median_ms": 90000.0, "p10_ms": 89000.0, "p90_ms": 91000.0, "first_s": 80.0,
                       "agent_steps_per_s": 300 / 90},
          "ours": {"median_ms": 60000.0, "p10_ms": 59000.0, "p90_ms": 61000.0, "first_s": 600.0,
                   "agent_steps_per_s": 5.0}}
    res = {"threads": 1, "jax": "0.x", "torch": "2.x", "matmul_gflops": {"jax": 100.0, "torch": 50.0},
           "loadavg_start": (0.1, 0, 0), "loadavg_end": (0.2, 0, 0), "rows": [ev], "xla_flags": "--f",
           "eval_xla_flags": "--f",
           "checks": {"values": {"values_max_abs": 3e-6, "values_abs_range": [0.001, 0.5], "same_elites": True}}}
    text = co.table([res], "cmd")
    assert "| 90,000.0 (89,000-91,000) | 60,000.0 (59,000-61,000) | 1.50 | 80.0 / 600.0 (540.0) |" in text
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


def test_gpu_needs_cuda(official):
    """``--device=gpu`` on a machine whose torch sees no CUDA device: a clear message, not a CUDA traceback."""
    if official.torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        co.Official(official.root.parent, "cuda")


def test_bf16_teacher_distillation_row_runs(official):
    """The bf16-teacher distillation row (the GPU script's): both sides step with the teacher's forward in bf16."""
    r = co.time_distill(official, 1, repeats=2, batch_size=8, teacher_bf16=True)
    assert r["row"] == "distill step, teacher 1M in bf16 + student 1M, B 8" and r["peak"] == "bfloat16"
    assert r["official"]["median_ms"] > 0 and r["ours"]["median_ms"] > 0 and r["flops"] > 0


def test_budget_mismatch_and_official_episode_arguments():
    args = co.parse_args(["--tdmpc2_repo=x"])
    assert (args.time_budget_s, args.on_mismatch, args.eval_official_episodes) == (0.0, "stop", 1)
    args = co.parse_args(["--tdmpc2_repo=x", "--eval_episodes=10", "--time_budget_s=200", "--on_mismatch=report"])
    assert (args.time_budget_s, args.on_mismatch, args.eval_official_episodes) == (200.0, "report", 10)
    assert co.parse_args(["--tdmpc2_repo=x", "--eval_episodes=10", "--eval_official_episodes=1"]
                         ).eval_official_episodes == 1
    for bad in (["--time_budget_s=-1"], ["--on_mismatch=ignore"], ["--eval_official_episodes=0"]):
        with pytest.raises(SystemExit):
            co.parse_args(["--tdmpc2_repo=x", *bad])


def test_report_table_with_skipped_rows_a_failed_check_and_fewer_official_episodes():
    """A row not started within the time budget is listed as skipped; a failed equality check (``--on_mismatch=
    report``) is stated and its check left out; an evaluation row whose official side ran 1 episode per task where
    ours ran 10 compares agent steps per second, each side's '% peak' from its own steps."""
    skipped = {"row": "update MT30 5M, B 256, H 3", "skipped": "not started: the run's time budget (200 s) was spent"}
    ev = {"row": "evaluation, 30 tasks x 10 episodes; official x 1 episode, one env after another, 10 agent steps "
                 "(1M planner)", "flops": 3000 * 1e9, "agent_steps": 3000,
          "official": {"median_ms": 10000.0, "p10_ms": 9900.0, "p90_ms": 10100.0, "first_s": 10.0,
                       "agent_steps": 300, "agent_steps_per_s": 30.0, "flops": 300 * 1e9},
          "ours": {"median_ms": 1000.0, "p10_ms": 990.0, "p90_ms": 1010.0, "first_s": 100.0, "agent_steps": 3000,
                   "agent_steps_per_s": 3000.0, "flops": 3000 * 1e9}}
    res = {"threads": 16, "device": "gpu", "device_name": "NVIDIA H200", "jax": "0.x", "torch": "2.x",
           "matmul_n": 8192, "matmul_gflops": {"jax": 50000.0, "torch": 40000.0}, "loadavg_start": (0.1, 0, 0),
           "loadavg_end": (0.2, 0, 0), "rows": [skipped, ev], "xla_flags": "", "eval_xla_flags": "",
           "checks": {"update": None, "values": {"values_max_abs": 3e-6, "values_abs_range": [0.001, 0.5],
                                                 "same_elites": True}},
           "mismatches": ["update step, size 1: TD targets differ by 2.00e-05 (> 1e-05)"]}
    text = co.table([res], "cmd")
    assert "| update MT30 5M, B 256, H 3 | not started: the run's time budget (200 s) was spent | | | | |" in text
    assert ("**Equality checks FAILED** (the rows above were timed anyway, `--on_mismatch=report`): update step, "
            "size 1: TD targets differ by 2.00e-05 (> 1e-05).") in text
    assert "TD targets within" not in text and "planner values of 512 samples within 3.0e-06" in text
    # speed-up 3000 / 30 agent steps/s = 100 (the calls' times alone would say 10); % peak: 300 GFLOP in 10 s of
    # torch's 40,000 GFLOP/s = 0.075 %, 3000 GFLOP in 1 s of jax's 50,000 = 6 %
    assert "| 10,000.0 (9,900-10,100) | 1,000.0 (990-1,010) | 100.00 | 10.0 / 100.0 (99.0) | 0 / 6 |" in text
    assert "runs 300 / 3000 (official / ours; speed-up: the ratio of agent steps per second) agent steps" in text
    assert co.table_row(ev, res) in text.splitlines()


def test_a_spent_budget_skips_rows_and_report_keeps_timing(official, monkeypatch, tmp_path):
    """``measure`` with a budget spent before the first row: the equality checks run, every row is listed as
    skipped; with ``--on_mismatch=report`` a failing check (planner values, tolerance 0) is recorded, not raised,
    and with the default ``stop`` it raises."""
    monkeypatch.setattr(co, "VALUE_ATOL", 0.0)
    argv = [f"--tdmpc2_repo={official.root.parent}", "--threads=1", "--sizes=1", "--teachers=1", "--act_envs=1",
            "--no-bf16", "--time_budget_s=1e-9", "--on_mismatch=report", f"--child_json={tmp_path / 'r.json'}"]
    res = co.measure(co.parse_args(argv))
    assert [r["row"] for r in res["rows"]] == [co.update_row_name(1, co.BATCH, 3, False),
                                               co.act_row_name(1, 1, co.our_config(1, co.BATCH), False, False),
                                               co.distill_row_name(1, False, 1, co.BATCH)]
    assert all("time budget" in r["skipped"] for r in res["rows"])
    assert res["checks"]["values"] is None and res["checks"]["update"]["td_targets_max_abs"] < co.TD_ATOL
    assert len(res["mismatches"]) == 1 and res["mismatches"][0].startswith("planner values, size 1")
    with pytest.raises(co.MismatchError, match="planner values"):
        co.measure(co.parse_args([a for a in argv if not a.startswith("--on_mismatch")]))


def test_update_row_threads_its_donated_state(official):
    """The update row donates our state and threads it through the calls, as training does (a call on a donated,
    deleted state would raise), and counts the program's FLOPs before the first donation."""
    r = co.time_update(official, 1, repeats=2, batch_size=8)
    assert r["row"] == "update MT30 1M, B 8, H 3" and r["flops"] > 0
    assert r["official"]["median_ms"] > 0 and r["ours"]["median_ms"] > 0 and r["ours"]["n"] == 2
