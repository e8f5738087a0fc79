"""`make demo` end to end (quick planner budget): imports the paper student and plans for all MT30 tasks."""

import pytest
from refdata import reference_dir

from mtdistill_jax import demo


def test_demo_runs_on_paper_student(capsys):
    if not (reference_dir() / "paper_student_fp16.pt").is_file():
        pytest.skip("paper student not available")
    assert demo.main(["--quick", "--reference_dir", str(reference_dir())]) == 0
    out = capsys.readouterr().out
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
