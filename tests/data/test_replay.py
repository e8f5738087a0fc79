"""Replay buffer: whole episodes in a ring, sampled exactly as the offline sampler samples the same episodes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtdistill_jax.data.offline import OfflineData, OfflineSampler, init_cursor
from mtdistill_jax.data.replay import ReplayBuffer
from mtdistill_jax.errors import UserError

T, M, O, A, B, H = 6, 3, 4, 2, 16, 2


def _block(rng, b):
    """M random episodes (official frame layout, frame 0 of action/reward = 0) with tasks 10*b + env."""
    obs = rng.normal(size=(M, T + 1, O)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(M, T + 1, A)).astype(np.float32)
    reward = rng.uniform(0, 1, size=(M, T + 1)).astype(np.float32)
    action[:, 0], reward[:, 0] = 0, 0
    return OfflineData(obs=obs, action=action, reward=reward, task=(10 * b + np.arange(M)).astype(np.int32))


def _write(buf, state, block, steps=T):
    state = buf.start(state, block.obs[:, 0], block.task)
    for t in range(1, steps + 1):
        state = buf.add(state, block.action[:, t], block.reward[:, t], block.obs[:, t])
    return state


def _same_batches(buf, state, episodes, key):
    data = OfflineData(*(np.concatenate([getattr(e, f) for e in episodes]) for f in ("obs", "action", "reward",
                                                                                       "task")))
    ref = OfflineSampler(B, H)
    for i in range(3):
        got, want = buf.sample_at(state, key, i), ref.sample_at(jax.device_put(data), key, i)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_samples_as_the_offline_sampler_and_wraps():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(2 * M * T + T - 1, episode_length=T, num_envs=M, batch_size=B, horizon=H, obs_dim=O,
                       action_dim=A)
    assert buf.capacity == 2 * M  # rounded down to whole blocks of M episodes
    key = init_cursor(jax.random.key(1)).key
    blocks = [_block(rng, b) for b in range(4)]
    s = buf.init(jax.random.key(1))
    s = _write(buf, s, blocks[0], steps=T - 1)
    assert int(buf.num_sampleable(s)) == 0  # an episode is sampleable once its last frame is written
    s = buf.add(s, blocks[0].action[:, T], blocks[0].reward[:, T], blocks[0].obs[:, T])
    assert int(buf.num_sampleable(s)) == M
    _same_batches(buf, s, blocks[:1], key)
    s = _write(buf, s, blocks[1], steps=2)  # half-written block: not sampled
    assert int(buf.num_sampleable(s)) == M
    _same_batches(buf, s, blocks[:1], key)
    s = _write(buf, s, blocks[1])
    _same_batches(buf, s, blocks[:2], key)
    s = _write(buf, s, blocks[2])  # the ring is full: block 2 overwrote block 0
    assert int(buf.num_sampleable(s)) == 2 * M
    _same_batches(buf, s, blocks[1:3], key)
    s = _write(buf, s, blocks[3], steps=1)  # block 3 is overwriting block 1: only block 2 is sampled
    assert int(buf.num_sampleable(s)) == M
    _same_batches(buf, s, blocks[2:3], key)

    # sample() walks the stream; windows never leave an episode (frame s..s+H with s <= T-H)
    batch, s2 = buf.sample(s)
    assert int(s2.cursor.count) == 1 and batch.obs.shape == (H + 1, B, O) and batch.reward.shape == (H, B, 1)
    assert set(np.asarray(batch.task).tolist()) <= set(blocks[2].task.tolist())


def test_jit_and_scan():
    """start/add/sample are pure: a whole episode written inside lax.scan under jit gives the eager state."""
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(10 * M * T, episode_length=T, num_envs=M, batch_size=B, horizon=H, obs_dim=O, action_dim=A)
    block = _block(rng, 0)

    @jax.jit
    def episode(state, block):
        state = buf.start(state, block.obs[:, 0], block.task)

        def step(st, t):
            return buf.add(st, block.action[:, t], block.reward[:, t], block.obs[:, t]), None

        state, _ = jax.lax.scan(step, state, jnp.arange(1, T + 1))
        return buf.sample(state)

    batch, state = episode(buf.init(jax.random.key(2)), jax.device_put(block))
    eager = _write(buf, buf.init(jax.random.key(2)), block)
    for g, w in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(eager.replace(
            cursor=eager.cursor.replace(count=eager.cursor.count + 1))), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    ref, _ = buf.sample(eager)
    np.testing.assert_array_equal(np.asarray(batch.obs), np.asarray(ref.obs))


def test_capacity_holds_two_blocks():
    """A full ring whose oldest block is being overwritten still has a complete block to sample."""
    buf = ReplayBuffer(M * T, episode_length=T, num_envs=M, batch_size=B, horizon=H, obs_dim=O, action_dim=A)
    assert buf.capacity == 2 * M


def test_bad_sizes():
    with pytest.raises(UserError, match="too short for horizon 3"):
        ReplayBuffer(1000, episode_length=3, num_envs=1, batch_size=4, horizon=3, obs_dim=2, action_dim=1)
    with pytest.raises(UserError, match="must be >= 1"):
        ReplayBuffer(1000, episode_length=10, num_envs=0, batch_size=4, horizon=3, obs_dim=2, action_dim=1)
