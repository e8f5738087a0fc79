"""The official offline-dataset chunk reader and the sub-trajectory sampler."""

import jax
import numpy as np
import pytest
from refdata import reference_dir

from mtdistill_jax.checkpoint.torch_pickle import CheckpointFormatError
from mtdistill_jax.data.offline import OfflineData, OfflineSampler
from mtdistill_jax.data.tdmpc2_format import Episodes, load_chunk

CHUNK = reference_dir() / "mt30_tiny_chunk.pt"


@pytest.fixture(scope="module")
def episodes():
    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    return load_chunk(CHUNK)


def test_chunk_contents(episodes):
    assert episodes.obs.shape == (10, 501, 24) and episodes.action.shape == (10, 501, 6)
    np.testing.assert_array_equal(episodes.task, [0, 0, 7, 7, 8, 8, 12, 12, 29, 29])
    # undiscounted returns listed in the reference README (frame 0 is filler)
    returns = episodes.reward[:, 1:].sum(axis=1)
    np.testing.assert_allclose(returns, [115.95, 134.68, 0, 0, 325.91, 392.66, 835, 0, 152.05, 162.94], atol=0.01)
    assert np.isnan(episodes.action[:, 0]).all() and np.isnan(episodes.reward[:, 0]).all()


def test_sampler_alignment_and_cursor(episodes):
    H, B = 3, 64
    sampler = OfflineSampler(batch_size=B, horizon=H, obs_pad=24, action_pad=6)
    data = sampler.load(episodes)
    state = sampler.init(jax.random.key(0))
    sample = jax.jit(sampler.sample)
    batch, s1 = sample(data, state)
    assert batch.obs.shape == (H + 1, B, 24) and batch.action.shape == (H, B, 6) and batch.reward.shape == (H, B, 1)
    assert int(s1.count) == 1
    assert np.isfinite(np.asarray(batch.action)).all() and np.isfinite(np.asarray(batch.reward)).all()
    obs, act, rew, task = (np.asarray(x) for x in (batch.obs, batch.action, batch.reward, batch.task))
    for b in range(B):  # find each window in the data and check the official alignment
        eps = np.flatnonzero(episodes.task == task[b])
        found = False
        for e in eps:
            starts = np.flatnonzero((episodes.obs[e, :-H] == obs[0, b]).all(-1))
            for s in starts:
                if (episodes.obs[e, s:s + H + 1] == obs[:, b]).all():
                    np.testing.assert_array_equal(episodes.action[e, s + 1:s + H + 1], act[:, b])
                    np.testing.assert_array_equal(episodes.reward[e, s + 1:s + H + 1], rew[:, b, 0])
                    found = True
        assert found, b
    # batch i depends only on (key, i): the same cursor gives the same batch, the next one another
    again, _ = sample(data, state)
    np.testing.assert_array_equal(np.asarray(again.obs), obs)
    at = jax.jit(sampler.sample_at)(data, state.key, 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, at, batch)
    nxt, _ = sample(data, s1)
    assert not np.array_equal(np.asarray(nxt.obs), obs)


def _tile(episodes, n):
    """``n`` times as many episodes (same frames), as a host Episodes."""
    return Episodes(*(np.concatenate([getattr(episodes, k)] * n) for k in ("obs", "action", "reward", "task")))


def test_compiled_sampler_does_not_grow_with_the_dataset(episodes):
    """The episodes are an argument of the compiled sampler, never a constant baked into its program: the
    program of ``jit(sample)`` (StableHLO and HLO text) for 10 and for 40 episodes has the same size (only
    shapes differ, and 10/40 have as many digits) and is small next to the data (a 0.5 MB chunk baked in as
    a constant made a ~1.9 M-character program). The optimised executable is not compared: its text depends
    on whether it came from the persistent compilation cache."""
    sampler = OfflineSampler(batch_size=64, horizon=3, obs_pad=24, action_pad=6)
    state = sampler.init(jax.random.key(0))
    sizes = {}
    for n in (1, 4):
        data = sampler.load(_tile(episodes, n))
        assert isinstance(data, OfflineData) and data.num_episodes == 10 * n
        lowered = jax.jit(sampler.sample).lower(data, state)
        sizes[n] = (len(lowered.as_text()), len(lowered.as_text(dialect="hlo")))
    assert sizes[1] == sizes[4], sizes
    data_bytes = episodes.obs.nbytes + episodes.action.nbytes + episodes.reward.nbytes  # 0.6 MB
    assert max(sizes[1]) < 100_000 and max(sizes[1]) < data_bytes // 10, (sizes, data_bytes)


def test_bad_input(episodes, tmp_path):
    with pytest.raises(ValueError, match="obs width is 24, the task set pads to 39"):
        OfflineSampler(8, 3, obs_pad=39).load(episodes)
    short = Episodes(episodes.obs[:, :4], episodes.action[:, :4], episodes.reward[:, :4], episodes.task)
    with pytest.raises(ValueError, match="horizon 3 needs at least 5"):
        OfflineSampler(8, 3).load(short)
    with pytest.raises(ValueError, match="horizon 3 needs at least 5"):  # data built by hand: at trace time
        sampler = OfflineSampler(8, 3)
        sampler.sample(OfflineData(*(np.asarray(x) for x in (short.obs, short.action, short.reward, short.task))),
                       sampler.init(jax.random.key(0)))
    with pytest.raises(TypeError, match="no longer holds the episodes"):
        OfflineSampler(episodes, 8, 3)
    (tmp_path / "x.pt").write_bytes(CHUNK.read_bytes()[:5000])
    with pytest.raises(CheckpointFormatError):
        load_chunk(tmp_path / "x.pt")
