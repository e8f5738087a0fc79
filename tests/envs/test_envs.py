"""Registry, vectorised episodes with auto-reset, the multi-task env, scores, rendering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtdistill_jax import envs
from mtdistill_jax.configs import MT30
from mtdistill_jax.envs.multitask import MultiTaskEnv
from mtdistill_jax.envs.score import normalized_score
from mtdistill_jax.envs.wrappers import VectorEnv

CHEAP = ["pendulum-swingup", "cartpole-balance"]


def test_registry_names_and_errors():
    assert envs.task_names() == MT30.tasks
    with pytest.raises(KeyError, match="valid: walker-stand, walker-walk"):
        envs.make("walker-fly")
    with pytest.raises(KeyError, match="Meta-World.*offline only"):
        envs.make("mw-assembly")
    with pytest.raises(ValueError, match="impl must be one of"):
        envs.make("pendulum-swingup", impl="numpy")
    from mtdistill_jax.envs.registry import DEFAULT_IMPL, default_impl

    assert set(DEFAULT_IMPL["cpu"]) == set(MT30.tasks)
    assert envs.make("pendulum-swingup").impl == default_impl("pendulum-swingup", "cpu") == "jax"


def test_warp_impl_stays_selectable_and_agrees_on_a_contact_free_task():
    a = envs.make("pendulum-swingup", impl="warp")
    b = envs.make("pendulum-swingup", impl="jax")
    assert a.impl == "warp" and a.episode_length == 500
    s_a, s_b = jax.jit(a.reset)(jax.random.key(0)), jax.jit(b.reset)(jax.random.key(0))
    s_a, s_b = jax.jit(a.step)(s_a, jnp.ones(1)), jax.jit(b.step)(s_b, jnp.ones(1))
    np.testing.assert_allclose(np.asarray(s_a.obs), np.asarray(s_b.obs), atol=1e-5)
    np.testing.assert_allclose(float(s_a.reward), float(s_b.reward), atol=1e-6)


@pytest.mark.parametrize("name", ["walker-walk", "cheetah-run", "reacher-easy", "reacher-three-easy",
                                  "acrobot-swingup", "pendulum-swingup", "cartpole-swingup", "cup-catch",
                                  "finger-spin", "fish-swim", "hopper-hop"])
def test_reset_shape_is_a_full_resets_shape(name):
    """``reset_shape`` skips the reset's physics (``finish_reset``) when it traces: the State it gives has the
    structure, shapes and dtypes of a full reset's, for one task of each of MT30's 11 physics families."""
    env = envs.make(name)
    full = jax.eval_shape(env.reset, jax.random.key(0))
    shape = env.reset_shape
    assert jax.tree_util.tree_structure(shape) == jax.tree_util.tree_structure(full)
    for a, b in zip(jax.tree_util.tree_leaves(shape), jax.tree_util.tree_leaves(full), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert env.observation_size == MT30.obs_dims[MT30.task_id(name)]


def test_reset_randomisation_distributions():
    env = envs.make("pendulum-swingup")
    s = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(0), 512))
    angle = np.asarray(s.data.qpos[:, 0])
    assert angle.min() >= -np.pi and angle.max() < np.pi and angle.std() > 1.5  # U[-pi, pi): std 1.81
    assert np.all(np.asarray(s.data.qvel) == 0)
    env = envs.make("cartpole-balance")
    s = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(1), 512))
    slider, hinge = np.asarray(s.data.qpos[:, 0]), np.asarray(s.data.qpos[:, 1])
    assert np.abs(slider).max() <= 0.1 and np.abs(hinge).max() <= 0.034 and slider.std() > 0.05
    assert 0.007 < np.asarray(s.data.qvel).std() < 0.013  # 0.01 * N(0, 1)


def test_vector_env_fixed_length_episodes_auto_reset():
    venv = VectorEnv(envs.make("pendulum-swingup"), num_envs=3, episode_length=4)
    step = jax.jit(venv.step)
    vs = jax.jit(venv.reset)(jax.random.key(0))
    first = np.asarray(vs.obs)
    dones = []
    for t in range(8):
        vs = step(vs, jnp.ones((3, 1)))
        dones.append(bool(vs.done[0]))
        assert vs.reward.shape == (3,) and np.all(np.isfinite(np.asarray(vs.obs)))
        assert vs.first.shape == vs.step.shape == (3,)
        np.testing.assert_array_equal(np.asarray(vs.step), [(t + 1) % 4] * 3)  # per-env episode step
        np.testing.assert_array_equal(np.asarray(vs.first), [t % 4 == 3] * 3)  # obs starts a new episode
        if t == 3:
            assert not np.allclose(np.asarray(vs.obs), np.asarray(vs.final_obs))
            assert not np.allclose(np.asarray(vs.obs), first)  # fresh random initial states
    assert dones == [False, False, False, True] * 2
    with pytest.raises(ValueError, match="num_envs"):
        VectorEnv(envs.make("pendulum-swingup"), 0)


@pytest.fixture(scope="module")
def mt_env():
    return MultiTaskEnv(CHEAP, num_envs_per_task=2, episode_length=5)


def test_multitask_padding_task_ids_and_masks(mt_env):
    s = jax.jit(mt_env.reset)(jax.random.key(0))
    obs = np.asarray(s.obs)
    assert obs.shape == (4, 24) and obs.dtype == np.float32
    assert np.all(obs[:2, 3:] == 0) and np.all(obs[2:, 5:] == 0)
    assert np.any(obs[:2, :3] != 0) and np.any(obs[2:, :5] != 0)
    np.testing.assert_array_equal(np.asarray(s.task), [7, 7, 8, 8])
    np.testing.assert_array_equal(np.asarray(mt_env.action_masks).sum(-1), [1, 1, 1, 1])


def test_multitask_ignores_padded_actions_and_is_jittable(mt_env):
    step = jax.jit(mt_env.step)
    s0 = jax.jit(mt_env.reset)(jax.random.key(1))
    a = jnp.zeros((4, 6)).at[:, 0].set(0.5)
    s1 = step(s0, a)
    s2 = step(s0, a.at[:, 1:].set(0.9))  # garbage in the padded action entries
    np.testing.assert_array_equal(np.asarray(s1.obs), np.asarray(s2.obs))
    np.testing.assert_array_equal(np.asarray(s1.reward), np.asarray(s2.reward))
    s = s1
    for _ in range(4):
        s = step(s, a)
    assert np.all(np.asarray(s.done)) and np.all(np.isfinite(np.asarray(s.obs)))
    with pytest.raises(ValueError, match=r"action must be \[4, 6\]"):
        mt_env.step(s0, jnp.zeros((4, 1)))


def test_multitask_first_flags_episode_steps_and_render_states(mt_env):
    s = jax.jit(mt_env.reset)(jax.random.key(2))
    assert np.all(np.asarray(s.first)) and np.all(np.asarray(s.step) == 0)
    step = jax.jit(mt_env.step)
    a = jnp.zeros((4, 6))
    firsts, steps = [], []
    for _ in range(7):
        s = step(s, a)
        firsts.append(np.asarray(s.first).tolist())
        steps.append(np.asarray(s.step).tolist())
    assert firsts == [[False] * 4] * 4 + [[True] * 4] + [[False] * 4] * 2  # auto-reset after 5 steps, per env
    assert steps == [[t] * 4 for t in (1, 2, 3, 4, 0, 1, 2)]
    r = mt_env.render_state(s, 2)  # row 2: the first copy of the second task
    assert set(r) == {"qpos", "qvel", "act", "info"} and r["qpos"].shape == (2,)  # cartpole: slider + hinge
    per_task = mt_env.task_render_states(s)
    assert [x["qpos"].shape for x in per_task] == [(1,), (2,)]
    np.testing.assert_array_equal(np.asarray(per_task[1]["qpos"]), np.asarray(r["qpos"]))


def test_multitask_episode_length_from_task_set():
    env = MultiTaskEnv(["pendulum-swingup"], auto_reset=False)
    assert env.episode_length == MT30.episode_lengths[MT30.task_id("pendulum-swingup")] == 500


def test_multitask_rejects_bad_task_lists():
    from mtdistill_jax.errors import UserError

    with pytest.raises(KeyError, match="valid"):  # UnknownNameError: a ValueError and a KeyError
        MultiTaskEnv(["pendulum-swingup", "nope"])
    with pytest.raises(ValueError, match="valid"):
        MultiTaskEnv(["pendulum-swingup", "nope"])
    with pytest.raises(UserError, match="distinct"):
        MultiTaskEnv(["pendulum-swingup", "pendulum-swingup"])
    with pytest.raises(UserError, match="empty"):
        MultiTaskEnv([])
    with pytest.raises(UserError, match="list of task names"):
        MultiTaskEnv("pendulum-swingup")
    with pytest.raises(UserError, match="num_envs_per_task"):
        MultiTaskEnv(["pendulum-swingup"], num_envs_per_task=0)
    with pytest.raises(ValueError, match="impls names tasks"):
        MultiTaskEnv(["pendulum-swingup"], impls={"cartpole-balance": "jax"})


def test_normalized_score():
    assert normalized_score({"a": [1000.0, 800.0], "b": [0.0]}) == pytest.approx((90 + 0) / 2)
    with pytest.raises(ValueError):
        normalized_score({})
    with pytest.raises(ValueError, match="success rate"):
        normalized_score({"mw-reach": [1.0]})


RENDER_SCRIPT = """
import sys
import numpy as np, jax
from mtdistill_jax import envs
from mtdistill_jax.envs.render import frame_is_blank, render_frames, rollout, save_video
env = envs.make("cartpole-swingup")
traj = rollout(env, jax.random.key(0), steps=5)
assert traj.obs.shape == (6, 5), traj.obs.shape
frames = render_frames(env, traj, height=64, width=96)
assert len(frames) == 6 and frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
assert not frame_is_blank(frames[0])
print(save_video(frames, sys.argv[1] + "/ep.mp4", fps=1 / env.dt))
"""


def test_render_frames_and_video(tmp_path):
    """Rendering and the video file, in a fresh process: under ``pytest -n 2`` EGL has failed to load GL
    (``gladLoadGL error``) in a worker that had run the structure tests before; a fresh process keeps this test
    about rendering."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RENDER_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ep.mp4")
    assert (tmp_path / "ep.mp4").stat().st_size > 1000


