"""The official offline-dataset chunk reader and the sub-trajectory sampler."""

import jax
import numpy as np
import pytest
from refdata import reference_dir

from mtdistill_jax.checkpoint.torch_pickle import CheckpointFormatError
from mtdistill_jax.data.offline import OfflineSampler
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
    sampler = OfflineSampler(episodes, batch_size=B, horizon=H, obs_pad=24, action_pad=6)
    state = sampler.init(jax.random.key(0))
    sample = jax.jit(sampler.sample)
    batch, s1 = sample(state)
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
    again, _ = sample(state)
    np.testing.assert_array_equal(np.asarray(again.obs), obs)
    nxt, _ = sample(s1)
    assert not np.array_equal(np.asarray(nxt.obs), obs)


def test_bad_input(episodes, tmp_path):
    with pytest.raises(ValueError, match="obs width is 24, the task set pads to 39"):
        OfflineSampler(episodes, 8, 3, obs_pad=39)
    short = Episodes(episodes.obs[:, :4], episodes.action[:, :4], episodes.reward[:, :4], episodes.task)
    with pytest.raises(ValueError, match="horizon 3 needs at least 5"):
        OfflineSampler(short, 8, 3)
    (tmp_path / "x.pt").write_bytes(CHUNK.read_bytes()[:5000])
    with pytest.raises(CheckpointFormatError):
        load_chunk(tmp_path / "x.pt")
