"""symlog/symexp/two-hot/soft-CE/policy math against the official outputs (math_io.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_util import equations
from refdata import reference_dir

from mtdistill_jax import math as tm

# Elementwise float32 functions of float32 inputs: a few operations, each within half an ulp, so atol = rtol =
# 1e-5 (~100 ulps relative) holds for any input of the same kind; the inputs span 1e-7 to 1e10 (README sec. 2).
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    p = reference_dir() / "math_io.npz"
    if not p.is_file():
        pytest.skip(f"no {p}")
    return dict(np.load(p))


def close(a, b, atol=ATOL, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), b, atol=atol, rtol=rtol)


def test_symlog_symexp(ref):
    close(tm.symlog(ref["symlog_x"]), ref["symlog_y"])
    close(tm.symexp(ref["symexp_x"]), ref["symexp_y"])


def test_two_hot(ref):
    nb, lo, hi = int(ref["num_bins"]), float(ref["vmin"]), float(ref["vmax"])
    y = np.asarray(tm.two_hot(ref["two_hot_x"], nb, lo, hi))
    close(y, ref["two_hot_y"])
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    close(tm.bin_centres(nb, lo, hi), ref["bins"])


def test_two_hot_inv_and_soft_ce(ref):
    nb, lo, hi = int(ref["num_bins"]), float(ref["vmin"]), float(ref["vmax"])
    close(tm.two_hot_inv(ref["two_hot_inv_logits"], nb, lo, hi), ref["two_hot_inv_y"], rtol=1e-5)
    close(tm.soft_ce(ref["soft_ce_pred"], ref["soft_ce_target"], nb, lo, hi), ref["soft_ce_y"])


def test_policy_math(ref):
    close(tm.log_std(ref["log_std_x"], -10.0, 2.0), ref["log_std_y"])
    close(tm.gaussian_logprob(ref["gauss_eps"], ref["gauss_log_std"]), ref["gauss_logprob"])
    pi = ref["gauss_mu"] + ref["gauss_eps"] * np.exp(ref["gauss_log_std"])
    mu, a, lp = tm.squash(ref["gauss_mu"], pi, ref["gauss_logprob"])
    close(mu, ref["squash_mu_out"])
    close(a, ref["squash_pi_out"])
    # a sum over 6 dims of terms up to ~25 in size, minus log(1 - tanh^2 + 1e-6) near saturation: 1e-4 absolute
    close(lp, ref["squash_logprob_out"], atol=1e-4)


def test_simnorm(ref):
    y = np.asarray(tm.simnorm(ref["simnorm_x"], 8))
    close(y, ref["simnorm_y"])
    np.testing.assert_allclose(y.reshape(4, -1, 8).sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        tm.simnorm(np.zeros((2, 12), np.float32), 8)


def test_two_hot_round_trip_inside_support():
    x = np.linspace(-500, 500, 41, dtype=np.float32)[:, None]
    logits = np.log(np.asarray(tm.two_hot(x, 101, -10.0, 10.0)) + 1e-30)
    np.testing.assert_allclose(np.asarray(tm.two_hot_inv(logits, 101, -10.0, 10.0)), x, rtol=1e-4, atol=1e-4)


def test_mish_matches_the_textbook_form_in_float64():
    """The one-exp Mish and its closed-form derivative against x tanh(softplus(x)) computed in float64."""
    import jax
    import jax.numpy as jnp

    xs = np.concatenate([np.linspace(-100, 100, 20001), [-1e4, -30, -20.5, 19.99, 20.0, 20.01, 44.5, 90, 1e4]])
    x64 = xs.astype(np.float32).astype(np.float64)  # the float32 inputs, exactly
    sp = np.logaddexp(x64, 0.0)
    ref = x64 * np.tanh(sp)
    dref = np.tanh(sp) + x64 * (1 - np.tanh(sp) ** 2) * np.exp(-np.logaddexp(0.0, -x64))  # x sigmoid(x)
    x32 = jnp.asarray(xs, jnp.float32)
    y = np.asarray(tm.mish(x32), np.float64)
    dy = np.asarray(jax.vmap(jax.grad(tm.mish))(x32), np.float64)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dy))
    big = np.abs(ref) > 1e-30
    np.testing.assert_array_less(np.abs(y - ref)[big] / np.abs(ref[big]), 5e-7)
    np.testing.assert_array_less(np.abs(dy - dref), 5e-7)
    # forward-mode agrees with reverse-mode
    _, t = jax.jvp(tm.mish, (x32,), (jnp.ones_like(x32),))
    np.testing.assert_array_equal(np.asarray(t), np.asarray(dy, np.float32))


RANDOM_SHAPES = [(), (7,), (5, 6), (3, 256, 6), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", RANDOM_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_draws_are_jax_randoms_values(shape, dtype):
    """tm.normal / tm.uniform give jax.random's arrays bit for bit (the planner's and the update's streams)."""
    key = jax.random.key(3)
    np.testing.assert_array_equal(tm.normal(key, shape, dtype), jax.random.normal(key, shape, dtype))
    np.testing.assert_array_equal(tm.uniform(key, shape, dtype, -1.0, 1.0),
                                  jax.random.uniform(key, shape, dtype, -1.0, 1.0))


def test_draws_are_jax_randoms_values_under_jit_vmap_and_other_settings():
    keys = jax.random.split(jax.random.key(5), 4)
    ours = jax.jit(jax.vmap(lambda k: tm.normal(k, (3, 9, 2))))(keys)
    np.testing.assert_array_equal(ours, jax.vmap(lambda k: jax.random.normal(k, (3, 9, 2)))(keys))
    with jax.threefry_partitionable(False):  # jax's other threefry numbering: a flat iota
        np.testing.assert_array_equal(tm.normal(keys[0], (4, 5, 3)), jax.random.normal(keys[0], (4, 5, 3)))
    for key in (jax.random.key(1, impl="rbg"), jax.random.key(1, impl="unsafe_rbg"), jax.random.PRNGKey(1)):
        np.testing.assert_array_equal(tm.normal(key, (4, 5, 3)), jax.random.normal(key, (4, 5, 3)))
    lo, hi = jnp.array([-1.0, 0.0, 2.0]), jnp.array([1.0, 0.5, 3.0])  # array bounds broadcast against the shape
    np.testing.assert_array_equal(tm.uniform(keys[1], (4, 3), jnp.float32, lo, hi),
                                  jax.random.uniform(keys[1], (4, 3), jnp.float32, lo, hi))


def test_multi_dimensional_threefry_draws_are_one_vector():
    """What makes the compile shorter: the random bits of a [3, 4, 5] draw are generated as 60 values."""
    def bits_shapes(fn, key):
        return [tuple(e.outvars[0].aval.shape) for e in equations(jax.make_jaxpr(fn)(key), "random_bits")]

    key = jax.random.key(0)
    assert bits_shapes(lambda k: tm.normal(k, (3, 4, 5)), key) == [(60,)]
    assert bits_shapes(lambda k: tm.uniform(k, (3, 4)), key) == [(12,)]
    assert bits_shapes(lambda k: jax.random.normal(k, (3, 4, 5)), key) == [(3, 4, 5)]  # what it replaces
    assert bits_shapes(lambda k: tm.normal(k, (3, 4, 5)), jax.random.key(0, impl="rbg")) == [(3, 4, 5)]
