"""Data collection in MJX (mtdistill_jax/evaluate/collect.py, launch/collect.py): episodes in the official frame
layout, returns equal to the written rewards, determinism per seed, appending with another seed, the planner and
the prior, one-line errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from launch_util import launch
from refdata import reference_dir

from mtdistill_jax.checkpoint.export import load_agent
from mtdistill_jax.configs.tasks import MT30
from mtdistill_jax.configs.train import get_config
from mtdistill_jax.data.native import open_dataset
from mtdistill_jax.errors import UserError
from mtdistill_jax.evaluate.collect import collect
from mtdistill_jax.nn.world_model import action_masks

# one xdist worker for the module: its collections share one compiled rollout program (the evaluator keeps it)
pytestmark = pytest.mark.xdist_group("collect")
STUDENT = reference_dir() / "paper_student_fp16.pt"
TASKS = ["walker-walk", "cup-catch"]
T = 10


@pytest.fixture(scope="module")
def agent():
    if not STUDENT.is_file():
        pytest.skip(f"{STUDENT} not found")
    a = load_agent(STUDENT)
    config = get_config(a.config.model_size, a.config.task_set)
    with config.unlocked():
        config.model = a.config
    return a.params, config


def run(agent, out, seed=0, policy="prior", tasks=TASKS, episodes=3, round_episodes=2, **kw):
    params, config = agent
    return collect(params, config, out, tasks, episodes, policy=policy, episode_length=T, seed=seed,
                   round_episodes=round_episodes, chunk=5, source="student", progress=False, **kw)


def test_collected_episodes_are_official_frames_and_match_the_returns(agent, tmp_path):
    result = run(agent, tmp_path / "d", noise=0.3)
    data = open_dataset(tmp_path / "d")
    eps = data.to_episodes()
    assert data.num_episodes == 6 and eps.obs.shape == (6, T + 1, 24) and eps.action.shape == (6, T + 1, 6)
    ids = [MT30.task_id(t) for t in TASKS]
    assert sorted(eps.task.tolist()) == sorted([ids[0]] * 3 + [ids[1]] * 3)
    for filler in (eps.action[:, 0], eps.reward[:, 0]):  # frame 0: filler (NaN officially; the format may zero it)
        assert np.all(np.isnan(filler) | (filler == 0))
    a = eps.action[:, 1:]
    assert np.isfinite(a).all() and np.abs(a).max() <= 1.0
    masks = action_masks("mt30")[eps.task]  # padded action dims stay exactly 0, noise included
    assert np.all(a[~np.broadcast_to(masks[:, None, :].astype(bool), a.shape)] == 0)
    # each episode's written rewards sum to the return the rollout reported (rounds in order, task-major rows)
    by_task = {t: np.sort(eps.reward[eps.task == i, 1:].sum(1)) for t, i in zip(TASKS, ids, strict=True)}
    for k, t in enumerate(TASKS):
        np.testing.assert_allclose(by_task[t], np.sort(result.returns[k]), rtol=1e-5, atol=1e-5)


def test_same_seed_same_data_other_seed_appends(agent, tmp_path):
    run(agent, tmp_path / "a", seed=3, noise=0.3)  # the program of the test above (compiled once)
    run(agent, tmp_path / "b", seed=3, noise=0.3)
    a, b = open_dataset(tmp_path / "a").to_episodes(), open_dataset(tmp_path / "b").to_episodes()
    for x, y in zip(jax.tree_util.tree_leaves(a.__dict__), jax.tree_util.tree_leaves(b.__dict__), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(UserError, match="already holds episodes collected from student with seed 3"):
        run(agent, tmp_path / "a", seed=3, noise=0.3)
    run(agent, tmp_path / "a", seed=4, noise=0.3)
    c = open_dataset(tmp_path / "a").to_episodes()
    assert c.num_episodes == 12 and not np.array_equal(c.obs[6:], a.obs)


def test_interrupted_collection_resumes_after_the_rounds_on_disk(agent, tmp_path, monkeypatch):
    from mtdistill_jax.evaluate import collect as collect_module

    real, calls = collect_module.transitions_to_episodes, []

    def crash_in_round_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*args)

    monkeypatch.setattr(collect_module, "transitions_to_episodes", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run(agent, tmp_path / "r", seed=5, noise=0.3)
    assert open_dataset(tmp_path / "r").num_episodes == 4  # round 1 (2 tasks x 2 episodes) is on disk
    monkeypatch.setattr(collect_module, "transitions_to_episodes", real)
    resumed = run(agent, tmp_path / "r", seed=5, noise=0.3)
    whole = run(agent, tmp_path / "w", seed=5, noise=0.3)
    a, b = open_dataset(tmp_path / "r").to_episodes(), open_dataset(tmp_path / "w").to_episodes()
    for x, y in zip(jax.tree_util.tree_leaves(a.__dict__), jax.tree_util.tree_leaves(b.__dict__), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(resumed.returns, whole.returns, rtol=1e-6, atol=1e-6)


def test_planner_policy(agent, tmp_path):
    result = run(agent, tmp_path / "p", policy="planner", tasks=["walker-walk"], episodes=1, round_episodes=None)
    eps = open_dataset(tmp_path / "p").to_episodes()
    assert eps.num_episodes == 1 and result.mode == "planner/sample"
    np.testing.assert_allclose(eps.reward[0, 1:].sum(), result.returns[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra,pattern", [
    (["--tasks=walker-wlak"], r"error: --tasks: unknown tasks \['walker-wlak'\] for mt30; valid: .*"),
    (["--policy=prior", "--mode=elite"],
     r"error: --tasks: mode must be one of \('sample', 'mean'\) for the prior, got 'elite'"),
], ids=["unknown-task", "prior-elite"])
def test_bad_flags_are_one_line(tmp_path, extra, pattern):
    import re

    if not STUDENT.is_file():
        pytest.skip(f"{STUDENT} not found")
    r = launch("collect.py", [f"--agent={STUDENT}", f"--out={tmp_path}/d", *extra], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(pattern, r.stderr.strip()), r.stderr
