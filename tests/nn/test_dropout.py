"""The hash-keyed dropout of the Q ensemble (``mtdistill_jax.nn.layers.dropout``): rate, scaling, randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtdistill_jax.nn.layers import EnsembleMLP, dropout, dropout_bits


def test_bits_are_uniform_bit_balanced_and_uncorrelated_between_neighbours():
    bits = np.asarray(dropout_bits(jax.random.key(3), (4, 256, 384)), dtype=np.uint64)  # 393,216 words
    n = bits.size
    # every bit position is set about half of the time (5 sigma of a fair coin)
    for b in range(32):
        frac = float(np.mean((bits >> b) & 1))
        assert abs(frac - 0.5) < 5 * 0.5 / np.sqrt(n), (b, frac)
    # the top byte is uniform over 256 values: chi-square with 255 dof, far below its 99.99 % point (~355)
    counts = np.bincount((bits >> 24).astype(np.int64).ravel(), minlength=256)
    chi2 = float(np.sum((counts - n / 256) ** 2 / (n / 256)))
    assert chi2 < 360, chi2
    # neighbouring indices (along rows and along features) are not correlated
    u = bits.astype(np.float64) / 2**32 - 0.5
    for a, b in ((u[..., 1:], u[..., :-1]), (u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        assert abs(corr) < 5 / np.sqrt(a.size), corr


def test_bits_depend_on_the_key_and_are_reproducible():
    a = np.asarray(dropout_bits(jax.random.key(0), (1000,)))
    np.testing.assert_array_equal(a, np.asarray(dropout_bits(jax.random.key(0), (1000,))))
    for other in (jax.random.key(1), jax.random.fold_in(jax.random.key(0), 1)):
        b = np.asarray(dropout_bits(other, (1000,)))
        assert np.mean(a == b) < 0.01
    # the same key with another shape reads the same stream by flat index
    np.testing.assert_array_equal(np.asarray(dropout_bits(jax.random.key(0), (10, 100))).ravel(), a)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_dropout_zeroes_at_the_rate_and_scales_the_rest(rate):
    x = jnp.full((5, 3, 256, 128), 2.0)
    y = np.asarray(jax.jit(dropout, static_argnums=1)(x, rate, jax.random.key(7)))
    dropped = float(np.mean(y == 0))
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / y.size), dropped
    np.testing.assert_allclose(y[y != 0], 2.0 / (1 - rate), rtol=1e-6)
    # the gradient passes the same mask
    g = np.asarray(jax.grad(lambda x: jnp.sum(dropout(x, rate, jax.random.key(7))))(x))
    np.testing.assert_array_equal(g == 0, y == 0)


def test_dropout_rate_zero_is_the_identity_and_bad_rates_are_refused():
    x = jnp.arange(6.0)
    assert dropout(x, 0.0, jax.random.key(0)) is x
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout rate"):
            dropout(x, bad, jax.random.key(0))


def test_ensemble_members_draw_different_masks_and_eval_mode_needs_no_key():
    mlp = EnsembleMLP(members=5, hidden=(64, 64), out=3, dropout=0.3, zero_init_out=False)
    x = jax.random.normal(jax.random.key(0), (32, 16))
    params = mlp.init(jax.random.key(1), x)["params"]

    def train(p, key):
        return np.asarray(mlp.apply({"params": p}, x, False, rngs={"dropout": key}))

    a, b = train(params, jax.random.key(2)), train(params, jax.random.key(3))
    assert a.shape == (5, 32, 3) and not np.allclose(a, b)
    # every member reads the same input but draws its own mask: with the members' weights made equal, their
    # outputs still differ in train mode, and agree in eval mode
    same = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p[:1], p.shape), params)
    out = train(same, jax.random.key(2))
    assert not any(np.allclose(out[0], out[m]) for m in range(1, 5))
    out_eval = np.asarray(mlp.apply({"params": same}, x, True))  # eval mode: no key, identical members
    for m in range(1, 5):
        np.testing.assert_allclose(out_eval[0], out_eval[m], rtol=1e-6, atol=1e-6)
