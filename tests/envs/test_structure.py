"""Tasks sharing one physics structure are stepped by one vmapped MJX program, with the same results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mujoco import mjx

from mtdistill_jax import envs
from mtdistill_jax.envs.multitask import MultiTaskEnv
from mtdistill_jax.envs.structure import Structure, group_by_structure, same_structure

# interleaved on purpose: the structures' rows are a permutation of the task-major rows (cheap tasks: the
# heavier structures, finger with its render-only difference and cheetah with its settling, were compared with
# the per-task programs out of CI: equal states, observations within 3e-8, rewards within 1.2e-7)
MIXED = ["cartpole-balance", "pendulum-swingup", "cartpole-swingup-sparse", "pendulum-spin"]


@pytest.fixture(scope="module")
def pair():
    shared = MultiTaskEnv(MIXED, num_envs_per_task=2, episode_length=3)
    apart = MultiTaskEnv(MIXED, num_envs_per_task=2, episode_length=3, share_physics=False)
    return shared, apart


def test_structures_of_a_mixed_task_list(pair):
    shared, apart = pair
    assert shared.structure_groups == [[0, 2], [1, 3]]
    assert apart.structure_groups == [[g] for g in range(4)]
    cartpole, pendulum = shared.structures
    assert cartpole.names == ("cartpole-balance", "cartpole-swingup-sparse") and cartpole.num_rows == 4
    assert cartpole.varying_fields == pendulum.varying_fields == 0
    # a one-task structure's state is the vmapped task's own (checkpoints of earlier versions load)
    widths = [p.obs.shape for p in jax.eval_shape(apart.reset, jax.random.key(0)).physics]
    assert widths == [(2, 5), (2, 3), (2, 5), (2, 3)]
    turn = Structure([envs.make("finger-turn-easy"), envs.make("finger-turn-hard")], copies=1)
    assert turn.varying_fields == 0  # they differ only in the target site's (render-only) size
    fs = Structure([envs.make("finger-spin"), envs.make("finger-turn-easy")], copies=3)
    assert fs.varying_fields == 1 and fs.obs_width == 12  # spin's hinge damping, one row per copy; obs 9 and 12
    damping = np.asarray(fs.model.dof_damping)
    assert damping.shape == (6, 3) and np.all(damping[:3, 2] != damping[3:, 2])
    assert not same_structure(envs.make("reacher-easy"), envs.make("reacher-three-easy"))  # a link more
    with pytest.raises(ValueError, match="does not share"):
        Structure([envs.make("pendulum-swingup"), envs.make("cartpole-balance")], copies=1)


def test_shared_physics_steps_like_one_program_per_task(pair):
    shared, apart = pair
    a, b = jax.jit(shared.reset)(jax.random.key(3)), jax.jit(apart.reset)(jax.random.key(3))
    actions = jax.random.uniform(jax.random.key(4), (7, shared.num_envs, shared.action_pad), minval=-1, maxval=1)
    step_a, step_b = jax.jit(shared.step), jax.jit(apart.step)

    def same(x, y):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)

    for t in range(7):  # two auto-resets (episodes of 3 steps)
        for f in ("obs", "final_obs", "reward", "done", "first", "step", "task"):
            same(getattr(a, f), getattr(b, f))
        np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
        for row in range(shared.num_envs):
            ra, rb = shared.render_state(a, row), apart.render_state(b, row)
            same(ra["qpos"], rb["qpos"])
            same(ra["qvel"], rb["qvel"])
            for k in ra["info"]:
                same(ra["info"][k], rb["info"][k])
        a, b = step_a(a, actions[t]), step_b(b, actions[t])
    assert np.asarray(a.step).tolist() == [1] * 8


def test_one_physics_trace_per_structure(pair, monkeypatch):
    shared, apart = pair
    calls = []
    step = mjx.step
    monkeypatch.setattr(mjx, "step", lambda m, d: calls.append(1) or step(m, d))
    s = jax.eval_shape(shared.reset, jax.random.key(0))
    action = jnp.zeros((shared.num_envs, shared.action_pad))
    jax.make_jaxpr(shared.step)(s, action)
    assert len(calls) == 2  # one control-step trace per structure (action repeat is a scan)
    calls.clear()
    jax.make_jaxpr(apart.step)(jax.eval_shape(apart.reset, jax.random.key(0)), action)
    assert len(calls) == 4


@pytest.mark.slow
def test_mt30_has_eleven_physics_structures():
    names = envs.task_names()
    groups = group_by_structure([envs.make(n) for n in names])
    assert [[names[i] for i in g] for g in groups] == [
        ["walker-stand", "walker-walk", "walker-run", "walker-walk-backwards", "walker-run-backwards"],
        ["cheetah-run", "cheetah-run-backwards", "cheetah-run-front", "cheetah-run-back", "cheetah-jump"],
        ["reacher-easy", "reacher-hard"], ["acrobot-swingup"], ["pendulum-swingup", "pendulum-spin"],
        ["cartpole-balance", "cartpole-balance-sparse", "cartpole-swingup", "cartpole-swingup-sparse"],
        ["cup-catch", "cup-spin"], ["finger-spin", "finger-turn-easy", "finger-turn-hard"], ["fish-swim"],
        ["hopper-stand", "hopper-hop", "hopper-hop-backwards"], ["reacher-three-easy", "reacher-three-hard"]]


def test_state_from_physics_row_by_row_is_each_tasks_own(pair):
    """Physics states given row by row (tests/envs/test_parity.py replays the official episodes so, finger-spin's
    hinge damping and all) give each row its own task's forwarded state and observation."""
    s = pair[0].structures[0]
    assert s.names == ("cartpole-balance", "cartpole-swingup-sparse") and s.num_rows == 4
    rng = np.random.default_rng(0)
    nq, nv = s.rep.mj_model.nq, s.rep.mj_model.nv
    qpos, qvel, time = rng.uniform(-1, 1, (4, nq)), rng.normal(size=(4, nv)), np.arange(4) * 0.02
    state = jax.jit(s.state_from_physics)(qpos, qvel, time=time)
    for k, task in enumerate(s.envs):
        rows = slice(2 * k, 2 * k + 2)
        own = jax.jit(jax.vmap(task.state_from_physics))(qpos[rows], qvel[rows], None, time[rows])
        for got, want in ((state.obs, own.obs), (state.data.qacc, own.data.qacc), (state.data.time, time[rows])):
            np.testing.assert_allclose(np.asarray(got[rows]), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.asarray(state.info["step"]).tolist() == [0] * 4
    with pytest.raises(ValueError, match="4 rows"):
        s.state_from_physics(qpos[:3], qvel[:3])
