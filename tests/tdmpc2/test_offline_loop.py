"""Offline loop: K updates per dispatch in one compiled program whose size does not depend on the dataset;
the same per-step batches and keys as one update per dispatch; chunk boundaries do not change the run; the
mesh path."""

import chex
import jax
import numpy as np
import pytest
from refdata import reference_dir

from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.data.offline import OfflineSampler
from mtdistill_jax.data.tdmpc2_format import Episodes, load_chunk
from mtdistill_jax.nn.world_model import make_world_model
from mtdistill_jax.tdmpc2.offline import chunk_end, compile_train_chunk, make_train_chunk, train_offline
from mtdistill_jax.tdmpc2.train import init_training_state, make_update_fn

CHUNK = reference_dir() / "mt30_tiny_chunk.pt"
STEPS = 5
# A scanned update and a standalone jitted one are different XLA programs (fusion, op order): float32
# round-off, which Adam amplifies for near-zero gradients (a weight moves ~lr * sign(g) per step, lr = 3e-4).
# As in tests/test_parallel.py we allow 5e-5 on weights after a few steps (a sixth of one Adam step), and
# rtol 1e-4 on the per-step losses (another batch or key changes them by far more).
TOL = 5e-5


@pytest.fixture(scope="module")
def episodes():
    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    return load_chunk(CHUNK)


def _config(k):
    c = get_smoke_config()
    c.steps = STEPS
    c.train.steps_per_dispatch = k
    return c


def _assert_bit_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_chunk_end_schedule():
    # K=4, log 10, save 6, total 13: chunks end at every multiple of any of them and at the total
    ends, s = [], 0
    while s < 13:
        s = chunk_end(s, 13, 4, 10, 6)
        ends.append(s)
    assert ends == [4, 6, 8, 10, 12, 13]


def test_one_program_for_every_chunk_length_and_dataset_size(episodes):
    """The chunk length is a traced argument (one compilation for 1, 2 or 3 updates) and the episodes an
    argument: the lowered train chunk for 10 and 40 episodes has the same size."""
    config = _config(3)
    sampler = OfflineSampler(8, config.train.horizon, 24, 6)
    chunk = make_train_chunk(make_update_fn(make_world_model(config.model), config), sampler)
    tiled = Episodes(*(np.concatenate([getattr(episodes, k)] * 4) for k in ("obs", "action", "reward", "task")))
    key = jax.random.key(0)
    state, ds = init_training_state(config, key), sampler.init(key)
    sizes = [len(jax.jit(chunk).lower(state, sampler.load(e), ds, key, np.int32(1)).as_text())
             for e in (episodes, tiled)]
    assert sizes[0] == sizes[1], sizes
    compiled = compile_train_chunk(chunk)
    data = sampler.load(episodes)
    for n in (1, 2, 3):
        state, ds, key, m = compiled(state, data, ds, key, np.int32(n))
    assert int(state.step) == 6 and int(ds.count) == 6
    assert compiled._cache_size() == 1
    assert set(m.total) == set(m.last) and all(np.isfinite(float(v)) for v in m.total.values())


@pytest.fixture(scope="module")
def per_step(episodes, tmp_path_factory):
    """K=1: one update per dispatch (through the chunk program), metrics of every step."""
    seen = []
    result = train_offline(_config(1), episodes, str(tmp_path_factory.mktemp("k1")), save_every=100,
                           on_step=lambda step, m: seen.append({k: float(v) for k, v in m.items()}))
    return result, seen


def test_chunking_does_not_change_the_run(episodes, per_step, tmp_path):
    """K=1 and K=3 run the same compiled body over the same (key, cursor) stream: bit-identical."""
    k3 = train_offline(_config(3), episodes, str(tmp_path), save_every=100)
    k1, _ = per_step
    assert k3.step == k1.step == STEPS
    _assert_bit_equal(k3.state, k1.state)
    _assert_bit_equal(k3.data_state, k1.data_state)
    np.testing.assert_array_equal(jax.random.key_data(k3.rng), jax.random.key_data(k1.rng))


def test_same_batches_and_keys_as_a_host_loop(episodes, per_step):
    """The scanned loop draws exactly what the former host loop (one jit(sample) + one jit(update) per step)
    drew: the same per-step losses and, up to round-off, the same weights."""
    config = _config(1)
    update = jax.jit(make_update_fn(make_world_model(config.model), config))
    sampler = OfflineSampler(config.train.batch_size, config.train.horizon, 24, 6)
    data = sampler.load(episodes)
    k_init, k_data, rng = jax.random.split(jax.random.key(config.seed), 3)
    state, ds = init_training_state(config, k_init), sampler.init(k_data)
    sample = jax.jit(sampler.sample)
    losses = []
    for _ in range(STEPS):
        rng, k = jax.random.split(rng)
        batch, ds = sample(data, ds)
        state, m = update(state, batch, k)
        losses.append({k: float(v) for k, v in m.items()})
    result, seen = per_step
    assert len(seen) == STEPS
    for i, (a, b) in enumerate(zip(losses, seen, strict=True)):
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=f"step {i + 1} {name}")
    _assert_bit_equal(result.data_state, ds)
    np.testing.assert_array_equal(jax.random.key_data(result.rng), jax.random.key_data(rng))
    chex.assert_trees_all_close(result.state.params, state.params, atol=TOL, rtol=0)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
def test_mesh_run(episodes, per_step, tmp_path):
    from mtdistill_jax.parallel import make_mesh

    seen = []
    result = train_offline(_config(3), episodes, str(tmp_path), save_every=100, mesh=make_mesh(2),
                           on_step=lambda step, m: seen.append((step, float(m["train/total_loss"]))))
    assert [s for s, _ in seen] == [3, 5] and result.step == STEPS
    leaf = jax.tree_util.tree_leaves(result.state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
    _, single = per_step
    for step, loss in seen:
        np.testing.assert_allclose(loss, single[step - 1]["train/total_loss"], rtol=1e-4, err_msg=str(step))
    chex.assert_trees_all_close(result.state.params, per_step[0].state.params, atol=TOL, rtol=0)
