"""`make demo` end to end (quick planner budget): imports the paper student, plans for all MT30 tasks and
evaluates it on 3 MJX tasks. Run as `make demo` runs it: a fresh `python -m mtdistill_jax.demo` process."""

import subprocess
import sys

import pytest
from launch_util import subprocess_env
from refdata import REPO, reference_dir

from mtdistill_jax import demo


@pytest.mark.slow
def test_demo_runs_on_paper_student():
    if not (reference_dir() / "paper_student_fp16.pt").is_file():
        pytest.skip("paper student not available")
    env = {**subprocess_env(), "PYTHONPATH": str(REPO)}  # one CPU device, as `make demo` has; the suite's LLVM -O0
    r = subprocess.run([sys.executable, "-m", "mtdistill_jax.demo", "--quick", "--reference_dir", str(reference_dir())],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "1,426,427 learnable params" in out and "release key format" in out
    assert "mean reward-prediction error over 30 tasks" in out
    # the paper student predicts the rewards of real official transitions well
    err = float(out.split("mean reward-prediction error over 30 tasks (random-action data): ")[1].split()[0])
    assert err < 0.1
    assert out.count(" a = [") == 30
    assert "| cartpole-balance |" in out and "MT30 normalized score" in out


def test_demo_missing_checkpoint(tmp_path, capsys):
    assert demo.main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
