"""Our MJX MT30 tasks against episodes recorded from the official TD-MPC2 environments.

For every ``envs/<task>_seed<k>.npz`` under ``MTDISTILL_REFERENCE_DIR``:
1. the observation computed at each recorded state equals the recorded one (touch keys excepted: dm_control
   computes them one physics substep earlier, so they are checked after stepping, in 2.);
2. one step from each recorded state with the recorded action gives the recorded reward, next state and
   next observation (touch included);
3. observation/action dims equal the official ones.
Tolerances (per task, in TOLERANCES) are what MJX (float32) holds against MuJoCo C (float64).
"""

from __future__ import annotations

import numpy as np
import pytest
from parity import get_env, load_episode, obs_key_slices, replay
from refdata import env_episode_files, env_index

from mtdistill_jax.configs import MT30

FILES = env_episode_files()
if not FILES:
    pytest.skip("no reference episodes", allow_module_level=True)

OBS_ATOL = 1e-4
DEFAULT = dict(reward_step=0.02, reward_mean=0.005, state=1e-3, obs=1e-3)
TOLERANCES: dict[str, dict] = {}  # per-task overrides, each with a reason


def _task_of(path) -> str:
    return path.name.rsplit("_seed", 1)[0]


_cache: dict = {}


def _replayed(path):
    if path not in _cache:
        ep = load_episode(path)
        _cache.clear()
        _cache[path] = (ep, replay(_task_of(path), ep))
    return _cache[path]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_observation_at_recorded_states(path):
    ep, out = _replayed(path)
    for key, sl in obs_key_slices(ep).items():
        if key == "touch":
            continue
        np.testing.assert_allclose(out["obs"][:, sl], ep["obs"][:, sl], atol=OBS_ATOL, rtol=0, err_msg=key)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_step_from_recorded_states(path):
    task = _task_of(path)
    tol = {**DEFAULT, **TOLERANCES.get(task, {})}
    ep, out = _replayed(path)
    err = np.abs(out["step_reward"] - ep["reward"])
    assert err.max() <= tol["reward_step"], f"worst reward error {err.max():.4g} at step {err.argmax()}"
    assert err.mean() <= tol["reward_mean"], f"mean reward error {err.mean():.4g}"
    np.testing.assert_allclose(out["step_qpos"], ep["qpos"][1:], atol=tol["state"], rtol=0, err_msg="qpos")
    np.testing.assert_allclose(out["step_qvel"], ep["qvel"][1:], atol=tol["state"] * 10, rtol=0, err_msg="qvel")
    np.testing.assert_allclose(out["step_obs"], ep["obs"][1:], atol=tol["obs"], rtol=0, err_msg="obs")


@pytest.mark.parametrize("task", sorted({_task_of(p) for p in FILES}))
def test_dims_equal_official(task):
    env = get_env(task)
    i = MT30.task_id(task)
    facts = env_index().get("tasks", {}).get(task, {})
    assert env.observation_size == MT30.obs_dims[i] == facts.get("obs_dim", MT30.obs_dims[i])
    assert env.action_size == MT30.action_dims[i] == facts.get("action_dim", MT30.action_dims[i])
    if facts:
        assert env.n_sub_steps == facts["n_sub_steps"]
        assert np.isclose(env.dt, facts["control_timestep"]) and np.isclose(env.sim_dt, facts["physics_timestep"])
