"""Data-parallel update over an 8-device CPU mesh equals the single-device update."""

import chex
import jax
import numpy as np
import pytest

from mtdistill_jax.configs import get_smoke_config
from mtdistill_jax.parallel import make_mesh, shard_batch
from mtdistill_jax.tdmpc2.train import Learner

if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)", allow_module_level=True)

import tdmpc2.test_train as tt  # noqa: E402

# The all-reduce sums gradients in another order than one device does: float32 round-off, which Adam
# amplifies for near-zero gradients (its early steps move a weight by ~lr * sign(g), lr = 3e-4). Measured
# max |diff| after 3 updates: 2e-5; we allow 5e-5 (a sixth of one Adam step).
TOL = 5e-5


def test_mesh_update_equals_single_device():
    cfg = get_smoke_config()
    cfg.train.batch_size = 16
    single = Learner(cfg, donate=False)
    sharded = Learner(cfg, mesh=make_mesh(8), donate=False)
    s1 = single.init(jax.random.key(0))
    s8 = sharded.init(jax.random.key(0))
    for i in range(3):
        batch = tt.make_batch(i, B=16)
        s1, m1 = single.update(s1, batch, jax.random.key(10 + i))
        s8, m8 = sharded.update(s8, batch, jax.random.key(10 + i))
    chex.assert_trees_all_close(s1.params, s8.params, atol=TOL, rtol=0)
    chex.assert_trees_all_close(s1.target_q_params, s8.target_q_params, atol=TOL, rtol=0)
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    leaf = jax.tree_util.tree_leaves(s8.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_batch_is_sharded_and_must_divide():
    mesh = make_mesh(8)
    b = shard_batch(tt.make_batch(0, B=16), mesh)
    assert b.obs.sharding.shard_shape(b.obs.shape) == (4, 2, 24)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        shard_batch(tt.make_batch(0, B=12), mesh)


def test_compile_step_shards_leading_args_and_replicates_the_rest():
    """``compile_step``: given specs for the leading arguments, later (optional) arguments and the output
    replicated; one jit per argument count, each with ``lower``; plain ``jax.jit`` without a mesh."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from mtdistill_jax.parallel import DATA_AXIS, compile_step

    def step(state, x, extra=None):
        y = state + jnp.sum(x)
        return y if extra is None else y * extra, x * 2

    mesh = make_mesh(8)
    fn = compile_step(step, mesh, in_specs=(None, P(DATA_AXIS)), out_specs=(None, P(DATA_AXIS)))
    x = np.arange(16, dtype=np.float32)
    y, x2 = fn(jnp.ones(()), x)
    assert float(y) == 121.0 and y.sharding.is_fully_replicated and len(y.sharding.device_set) == 8
    assert x2.sharding.shard_shape(x2.shape) == (2,)
    y3, _ = fn(jnp.ones(()), x, jnp.float32(2.0))
    assert float(y3) == 242.0 and y3.sharding.is_fully_replicated
    (s_state, s_x, s_extra), _ = fn.lower(jnp.ones(()), x, jnp.float32(2.0)).compile().input_shardings
    assert s_x.shard_shape(x.shape) == (2,) and s_state.is_fully_replicated and s_extra.is_fully_replicated
    plain = compile_step(step)
    assert float(plain(jnp.ones(()), x)[0]) == 121.0 and hasattr(plain, "lower")
