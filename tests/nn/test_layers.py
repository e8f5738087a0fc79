"""The layers' hand-written backward passes against JAX's own autodiff of the plain expressions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_util import equations

from mtdistill_jax.nn.layers import matmul


@pytest.mark.parametrize("x_shape,k_shape,spec", [
    ((7, 5), (5, 3), "ri,io->ro"),
    ((2, 4, 6, 5), (5, 3), "abci,io->abco"),
    ((4, 6, 5), (4, 5, 3), "mri,mio->mro"),
    ((4, 2, 3, 5), (4, 5, 3), "mabi,mio->mabo"),
])
def test_matmul_values_and_gradients_match_autodiff(x_shape, k_shape, spec):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    k = jax.random.normal(kk, k_shape)
    out_shape = jnp.einsum(spec, x, k).shape
    w = jax.random.normal(kg, out_shape)

    def loss(f):
        return lambda x, k: jnp.sum(jnp.sin(f(x, k)) * w)

    ours = jax.grad(loss(matmul), argnums=(0, 1))(x, k)
    plain = jax.grad(loss(lambda x, k: jnp.einsum(spec, x, k)), argnums=(0, 1))(x, k)
    np.testing.assert_allclose(np.asarray(matmul(x, k)), np.asarray(jnp.einsum(spec, x, k)), rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, plain, strict=False):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # second order (the backward is itself differentiable)
    hv = jax.grad(lambda x: jnp.sum(jax.grad(loss(matmul), argnums=1)(x, k) ** 2))(x)
    hv_plain = jax.grad(lambda x: jnp.sum(jax.grad(loss(lambda x, k: jnp.einsum(spec, x, k)), argnums=1)(x, k) ** 2))(x)
    np.testing.assert_allclose(np.asarray(hv), np.asarray(hv_plain), rtol=1e-4, atol=1e-4)


def test_matmul_mixed_dtypes_give_cotangents_in_the_inputs_dtypes():
    x = jnp.ones((4, 3), jnp.float32)
    k = jnp.ones((3, 2), jnp.bfloat16)
    dx, dk = jax.grad(lambda x, k: jnp.sum(matmul(x, k)), argnums=(0, 1))(x, k)
    assert dx.dtype == jnp.float32 and dk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dk, np.float32), np.full((3, 2), 4.0))


@pytest.mark.parametrize("x_shape,k_shape", [((7, 33), (33, 5)), ((3, 7, 33), (3, 33, 5))])
def test_bf16_matmul_accumulates_in_float32_forward_and_backward(x_shape, k_shape):
    rng = np.random.default_rng(1)
    x32 = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
    k32 = jnp.asarray(rng.normal(size=k_shape).astype(np.float32))
    x, k = x32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16)

    def loss(x, k):
        return jnp.sum(matmul(x, k).astype(jnp.float32) ** 2)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x, k)
    dots = list(equations(jaxpr, "dot_general"))
    assert len(dots) == 3  # forward, dx, dk
    for e in dots:
        assert [str(v.aval.dtype) for v in e.invars] == ["bfloat16", "bfloat16"]
        assert e.params["preferred_element_type"] == jnp.float32 and e.outvars[0].aval.dtype == jnp.float32
    y = matmul(x, k)
    assert y.dtype == jnp.bfloat16
    # one rounding of the float32 sum of exact bf16 products: within half a bf16 ulp of the float64 product
    ref = np.einsum("mri,mio->mro" if len(k_shape) == 3 else "ri,io->ro",
                    np.asarray(x, np.float64), np.asarray(k, np.float64))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2.0**-8, atol=1e-6)
    dx, dk = jax.grad(loss, argnums=(0, 1))(x, k)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    # float32 operands keep the plain dot (no preferred type, as before)
    e32 = list(equations(jax.make_jaxpr(matmul)(x32, k32), "dot_general"))
    assert e32 and all(e.params["preferred_element_type"] in (None, jnp.float32) for e in e32)


@pytest.mark.parametrize("shape", [(7, 384), (2, 3, 256)])
def test_layer_norm_row_means_by_matmul_match_the_reduction(shape, monkeypatch):
    """On CPU in float32, layer_norm's row means are matrix-vector products: values and gradients equal the
    plain reduction's within float32 round-off; MTDISTILL_XLA_CPU_TUNING=0 and non-float32 inputs take the
    reduction."""
    from mtdistill_jax.nn.layers import layer_norm, row_means_by_matmul
    from mtdistill_jax.xla_cpu import TUNING_ENV

    k = jax.random.split(jax.random.key(0), 4)
    x = 3.0 + 2.0 * jax.random.normal(k[0], shape)
    scale, bias = 1.0 + jax.random.normal(k[1], shape[-1:]), jax.random.normal(k[2], shape[-1:])
    g = jax.random.normal(k[3], shape)

    def value_and_grads():
        y, vjp = jax.vjp(layer_norm, x, scale, bias)
        return (y, *vjp(g))

    monkeypatch.delenv(TUNING_ENV, raising=False)
    assert row_means_by_matmul(x) == (jax.default_backend() == "cpu")
    assert not row_means_by_matmul(x.astype(jnp.bfloat16))
    by_matmul = value_and_grads()
    monkeypatch.setenv(TUNING_ENV, "0")
    assert not row_means_by_matmul(x)
    by_reduction = value_and_grads()
    for a, b in zip(by_matmul, by_reduction, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    y = np.asarray(by_matmul[0])
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_allclose(y, np.asarray(expected), rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":  # the matmul path has no reduction left in its jaxpr
        monkeypatch.delenv(TUNING_ENV)
        prims = {e.primitive.name for e in jax.make_jaxpr(layer_norm)(x, scale, bias).eqns}
        assert "dot_general" in prims and "reduce_sum" not in prims, prims
