"""Batched evaluation: returns, scores and outputs (short episodes and a small planner to stay fast)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.evaluate import EvalResult, evaluate, save_videos, write_outputs
from mtdistill_jax.nn.world_model import init_params, make_world_model

TASKS = ["pendulum-swingup", "cartpole-balance"]


@pytest.fixture(scope="module")
def setup():
    config = get_smoke_config()
    params = init_params(make_world_model(config.model), jax.random.key(0))
    return config, params


def test_evaluate_returns_and_outputs(setup, tmp_path):
    config, params = setup
    r = evaluate(params, config, TASKS, episodes=2, seed=3, chunk=5, episode_length=20, progress=False, record=True)
    assert r.returns.shape == (2, 2) and r.tasks == TASKS and r.plan_calls == 20 * 4
    # cartpole-balance pays ~1 per control step while the pole is up: 20 agent steps x 2 => close to 40
    assert 10 < r.returns[1].min() <= 40 + 1e-4
    assert np.all(r.returns >= 0) and np.all(r.returns <= 40 + 1e-4)
    np.testing.assert_allclose(r.normalized, r.returns.mean(1) / 10)
    assert r.normalized_score == pytest.approx(float(np.mean(r.returns.mean(1) / 10)))
    again = evaluate(params, config, TASKS, episodes=2, seed=3, chunk=10, episode_length=20, progress=False)
    np.testing.assert_array_equal(again.returns, r.returns)  # chunking does not change the rollout
    other = evaluate(params, config, TASKS, episodes=2, seed=4, chunk=10, episode_length=20, progress=False)
    assert not np.array_equal(other.returns, r.returns)

    paths = write_outputs(r, str(tmp_path), "x", command="python launch/evaluate.py ...")
    d = json.loads(Path(paths["json"]).read_text())
    assert d["episodes_per_task"] == 2 and d["normalized_score"] == pytest.approx(r.normalized_score)
    assert [t["name"] for t in d["tasks"]] == TASKS and len(d["tasks"][0]["returns"]) == 2
    assert Path(paths["csv"]).read_text().startswith("task,mean,std,normalized,ep0,ep1")
    assert "python launch/evaluate.py" in Path(paths["md"]).read_text()
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the recorded first episode of each task, as a video
    traj = r.trajectories["pendulum-swingup"]
    assert traj["qpos"].shape == (21, 1)  # reset state + 20 steps
    assert again.trajectories is None
    from mtdistill_jax.envs.render import frame_is_blank

    out = save_videos(r, str(tmp_path), tasks=["pendulum-swingup"])
    assert Path(out["pendulum-swingup"]).stat().st_size > 1000
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(out["pendulum-swingup"])
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    assert len(frames) == 21 and not frame_is_blank(frames[0])


def test_bad_input(setup):
    config, params = setup
    with pytest.raises(ValueError, match="unknown tasks.*walker-walk"):
        evaluate(params, config, ["walker-wlak"], episodes=1, progress=False)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        evaluate(params, config, TASKS, episodes=0, progress=False)
    with pytest.raises(ValueError, match="chunk 7 must divide"):
        evaluate(params, config, TASKS, episodes=1, chunk=7, progress=False)


def test_table_format():
    r = EvalResult(tasks=["a", "b"], returns=np.array([[100.0, 300.0], [0.0, 0.0]]), mode="sample", seconds=1.0,
                   compile_seconds=1.0, plan_calls=10)
    assert r.normalized_score == pytest.approx(10.0)
    assert "| a | 200.0 ± 100.0 | 20.00 |" in r.table()
