"""The layers' hand-written backward passes against JAX's own autodiff of the plain expressions."""

import re

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


def _dot_results_in_memory_order(f, *args) -> list[tuple[int, ...]]:
    """The result shapes of the ``dot`` instructions of ``f``'s compiled program, dimensions in memory order
    (major to minor, read from each layout)."""
    shapes = []
    for m in re.finditer(r"= f32\[([\d,]+)\]\{([\d,]+)\} dot\(", jax.jit(f).lower(*args).compile().as_text()):
        dims, minor_to_major = [[int(d) for d in g.split(",")] for g in m.groups()]
        shapes.append(tuple(dims[i] for i in reversed(minor_to_major)))
    return shapes


@pytest.mark.parametrize("k_shape,kept", [((64, 12), True), ((64, 32), True), ((64, 33), False), ((64, 64), False),
                                          ((2, 64, 12), True), ((2, 64, 64), False)])
def test_narrowing_layers_form_the_weight_gradient_as_g_transposed_x(k_shape, kept, monkeypatch):
    """On CPU in float32 a layer with out <= in / 2 computes its weight gradient as the ``[out, in]`` product
    ``g^T x`` (the wide activation read in its stored order), kept from XLA's folding of the transpose into the dot;
    other layers, 16-bit kernels and ``MTDISTILL_XLA_CPU_TUNING=0`` leave the dot to XLA. Same gradients."""
    from mtdistill_jax.nn.layers import kernel_grad_kept_out_in, narrow_kernel_grads_kept
    from mtdistill_jax.xla_cpu import TUNING_ENV

    kx, kk = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (*k_shape[:-2], 96, k_shape[-2]))
    k = jax.random.normal(kk, k_shape)

    def grads():
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(matmul(x, k))), argnums=(0, 1))

    monkeypatch.delenv(TUNING_ENV, raising=False)
    on_cpu = jax.default_backend() == "cpu"
    assert kernel_grad_kept_out_in(k) == (kept and on_cpu)
    assert not kernel_grad_kept_out_in(k.astype(jnp.bfloat16))
    with narrow_kernel_grads_kept(False):
        assert not kernel_grad_kept_out_in(k)
        assert not list(equations(jax.make_jaxpr(grads())(x, k), "optimization_barrier"))
    dx, dk = grads()(x, k)
    barriers = list(equations(jax.make_jaxpr(grads())(x, k), "optimization_barrier"))
    assert len(barriers) == (1 if kept and on_cpu else 0)
    out_in = (*k_shape[:-2], k_shape[-1], k_shape[-2])
    if kept and on_cpu:  # the compiled weight-gradient dot writes [..., out, in] in memory order
        shapes = _dot_results_in_memory_order(grads(), x, k)
        assert out_in in shapes and k_shape not in shapes, shapes
    monkeypatch.setenv(TUNING_ENV, "0")
    assert not kernel_grad_kept_out_in(k)
    assert not list(equations(jax.make_jaxpr(grads())(x, k), "optimization_barrier"))
    if kept and on_cpu:  # without the barrier XLA folds the transpose: the dot writes [..., in, out]
        shapes = _dot_results_in_memory_order(grads(), x, k)
        assert k_shape in shapes and out_in not in shapes, shapes
    plain = jax.grad(lambda x, k: jnp.sum(jnp.sin(x @ k)), argnums=(0, 1))(x, k)
    for a, b in zip((dx, dk), plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


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
    plain reduction's within float32 round-off (the backward is LayerNorm's closed form, normalize_rows);
    MTDISTILL_XLA_CPU_TUNING=0 and non-float32 inputs take the reduction."""
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
    if jax.default_backend() == "cpu":  # the matmul path has no reduction left, forward or backward
        monkeypatch.delenv(TUNING_ENV)
        jaxpr = jax.make_jaxpr(value_and_grads)()
        assert list(equations(jaxpr, "dot_general")) and not list(equations(jaxpr, "reduce_sum"))
        monkeypatch.setenv(TUNING_ENV, "0")
        # a fresh function: make_jaxpr caches traces per function, and the setting is read while tracing
        assert list(equations(jax.make_jaxpr(lambda: value_and_grads())(), "reduce_sum"))


@pytest.mark.parametrize("g_shape,shape,by_matmul", [
    ((1024, 96), (96,), True),  # a dense layer's bias
    ((3, 4, 7, 96), (96,), True),  # a bias over batch and time axes
    ((5, 4, 7, 96), (5, 1, 1, 96), True),  # an ensemble's per-member bias
    ((5, 28, 96), (1, 96), True),  # kept leading axes of size 1
    ((3, 4, 5), (4, 1), False),  # the last axis summed: a reduction
    ((3, 4, 5), (3, 1, 5), True),  # a member-like leading axis kept
    ((3, 4, 5), (4, 5), False),  # a kept axis after a summed one: a reduction
    ((4, 5), (4, 5), False),  # nothing to sum
    ((0, 5), (5,), False),  # no rows: zeros
])
def test_sum_to_matches_the_reduction_and_uses_the_matmul_where_it_can(g_shape, shape, by_matmul, monkeypatch):
    """sum_to sums a gradient to a broadcast operand's shape; on CPU in float32 the row sums of a bias-like
    shape are a product with ones (a dot_general, no reduce_sum), elsewhere (and with MTDISTILL_XLA_CPU_TUNING=0)
    a reduction; both equal numpy's float64 sum within float32 round-off."""
    from mtdistill_jax.nn.layers import sum_to
    from mtdistill_jax.xla_cpu import TUNING_ENV

    g = jax.random.normal(jax.random.key(1), g_shape)
    full = (1,) * (len(g_shape) - len(shape)) + shape
    axes = tuple(i for i, (a, b) in enumerate(zip(full, g_shape, strict=True)) if a == 1 and b != 1)
    expected = np.asarray(g, np.float64).sum(axis=axes).reshape(shape)
    for tuning in ("1", "0"):
        monkeypatch.setenv(TUNING_ENV, tuning)
        out = jax.jit(sum_to, static_argnums=1)(g, shape)
        assert out.shape == shape
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=2e-5 * np.sqrt(g.size))
        prims = {e.primitive.name for e in jax.make_jaxpr(lambda g: sum_to(g, shape))(g).eqns}
        if by_matmul and tuning == "1" and jax.default_backend() == "cpu":
            assert "dot_general" in prims and "reduce_sum" not in prims, prims
        else:
            assert "dot_general" not in prims, prims
    with pytest.raises(ValueError, match="does not broadcast"):
        sum_to(g, (2,) + g_shape[1:])
    with pytest.raises(ValueError, match="more axes"):
        sum_to(g, (1,) + g_shape)


@pytest.mark.parametrize("x_shape,p_shape", [((6, 7, 96), (96,)), ((5, 6, 7, 96), (5, 1, 1, 96))])
def test_add_bias_and_scale_shift_gradients_match_autodiff(x_shape, p_shape):
    """The bias and LayerNorm-affine ops with the sum_to backward give the values and gradients of plain
    autodiff of ``x + b`` and ``x * s + b`` within float32 round-off, cotangents in the primals' dtypes."""
    from mtdistill_jax.nn.layers import add_bias, scale_shift

    k = jax.random.split(jax.random.key(2), 4)
    x, s, b = jax.random.normal(k[0], x_shape), jax.random.normal(k[1], p_shape), jax.random.normal(k[2], p_shape)
    g = jax.random.normal(k[3], x_shape)
    for ours, plain, args in ((add_bias, lambda x, b: x + b, (x, b)),
                              (scale_shift, lambda x, s, b: x * s + b, (x, s, b))):
        y, vjp = jax.jit(lambda *a, f=ours: jax.vjp(f, *a))(*args)
        y_ref, vjp_ref = jax.vjp(plain, *args)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6)
        for a, r in zip(vjp(g), vjp_ref(g), strict=True):
            assert a.shape == r.shape and a.dtype == r.dtype
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-5, atol=2e-5 * np.sqrt(np.prod(x_shape)))
    # a bf16 activation with float32 parameters: the activation's cotangent comes back in bf16
    xb = x.astype(jnp.bfloat16)
    dx, ds, db = jax.grad(lambda x, s, b: scale_shift(x, s, b).astype(jnp.float32).sum(), argnums=(0, 1, 2))(xb, s, b)
    assert dx.dtype == jnp.bfloat16 and ds.dtype == db.dtype == jnp.float32


@pytest.mark.parametrize("x_shape,p_shape,fused", [
    ((7, 384), (384,), True),  # a dense layer
    ((2, 3, 256, 64), (2, 1, 1, 64), True),  # an ensemble's per-member parameters
    ((3, 5, 64), (1, 1, 64), True),  # leading axes of size 1
    ((3, 5, 64), (5, 64), False),  # per-row parameters: the composition
    ((3, 3, 8), (3, 8), False),  # per-row parameters whose first axis matches the members': the composition
    ((3, 3, 5, 8), (3, 1, 8), False),  # fewer axes than x: broadcast along axis 1, the composition
])
def test_layer_norm_mish_matches_the_composition(x_shape, p_shape, fused, monkeypatch):
    """layer_norm_mish gives mish(layer_norm(...))'s values and gradients (x, scale, bias) within float32
    round-off; on CPU in float32, with per-feature parameters, through its own backward (no reduction in it);
    otherwise (and with MTDISTILL_XLA_CPU_TUNING=0) it is the composition."""
    from mtdistill_jax.math import mish
    from mtdistill_jax.nn.layers import layer_norm, layer_norm_mish
    from mtdistill_jax.xla_cpu import TUNING_ENV

    k = jax.random.split(jax.random.key(3), 4)
    x = 1.0 + 2.0 * jax.random.normal(k[0], x_shape)
    scale, bias = 1.0 + jax.random.normal(k[1], p_shape), jax.random.normal(k[2], p_shape)
    g = jax.random.normal(k[3], x_shape)

    def takes_its_own_backward():  # Mish not applied at the top level: inside _layer_norm_mish's custom vjp
        top = jax.make_jaxpr(lambda *a: layer_norm_mish(*a))(x, scale, bias).eqns  # fresh: traces are cached
        own = not any(e.primitive.name == "custom_jvp_call" for e in top)
        if own:  # and the backward has no reduction
            jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(layer_norm_mish, *a)[1](g))(x, scale, bias)
            assert not list(equations(jaxpr, "reduce_sum"))
        return own

    monkeypatch.delenv(TUNING_ENV, raising=False)
    y, vjp = jax.jit(lambda *a: jax.vjp(layer_norm_mish, *a))(x, scale, bias)
    y_ref, vjp_ref = jax.vjp(lambda x, s, b: mish(layer_norm(x, s, b)), x, scale, bias)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
    rows = np.prod(x_shape[:-1])
    for a, r, tol in zip(vjp(g), vjp_ref(g), (2e-5, 2e-5 * np.sqrt(rows), 2e-5 * np.sqrt(rows)), strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-5, atol=tol)
    assert takes_its_own_backward() == (fused and jax.default_backend() == "cpu")
    monkeypatch.setenv(TUNING_ENV, "0")
    assert not takes_its_own_backward()


@pytest.mark.parametrize("x_shape,k_shape,b_shape,p_shape", [
    ((7, 96), (96, 64), (64,), (64,)),  # a dense layer
    ((2, 3, 5, 96), (2, 96, 64), (2, 1, 1, 64), (2, 1, 1, 64)),  # an ensemble's members
])
def test_linear_layer_norm_mish_centred_matches_the_layer(x_shape, k_shape, b_shape, p_shape, monkeypatch):
    """A hidden layer gives mish(layer_norm(x @ kernel + bias))'s values and gradients (all five inputs) within
    float32 round-off, with its weights centred (inside centred_hidden_layers) or not, on rows whose means are
    large against their spread. Centred, on CPU in float32, its forward takes one row mean of the activation
    (the variance's) where the uncentred layer takes two; with MTDISTILL_XLA_CPU_TUNING=0 neither (reductions)."""
    from mtdistill_jax.math import mish
    from mtdistill_jax.nn.layers import centred_hidden_layers, layer_norm, linear_layer_norm_mish
    from mtdistill_jax.xla_cpu import TUNING_ENV

    k = jax.random.split(jax.random.key(5), 6)
    x = 0.5 + jax.random.normal(k[0], x_shape)
    kernel = 0.3 + 0.1 * jax.random.normal(k[1], k_shape)  # rows of the product have means ~ 0.3 * 0.5 * in
    bias, scale = 3.0 + jax.random.normal(k[2], b_shape), 1.0 + jax.random.normal(k[3], p_shape)
    ln_bias = jax.random.normal(k[4], p_shape)
    out_shape = x_shape[:-1] + k_shape[-1:]
    g = jax.random.normal(k[5], out_shape)
    args = (x, kernel, bias, scale, ln_bias)

    def reference(x, kernel, bias, scale, ln_bias):
        y = jnp.einsum("...i,io->...o" if kernel.ndim == 2 else "m...i,mio->m...o", x, kernel,
                       precision=jax.lax.Precision.HIGHEST)
        return mish(layer_norm(y + bias, scale, ln_bias))

    def activation_row_means(centred: bool) -> int:
        with centred_hidden_layers(centred):
            jaxpr = jax.make_jaxpr(lambda *a: linear_layer_norm_mish(*a))(*args)  # fresh: traces are cached
        return sum(1 for e in equations(jaxpr, "dot_general")
                   if e.invars[0].aval.shape == out_shape and e.invars[1].aval.shape[-1] == 1)

    monkeypatch.delenv(TUNING_ENV, raising=False)
    y_ref, vjp_ref = jax.vjp(reference, *args)
    rows = np.prod(x_shape[:-1])
    for centred in (False, True):
        with centred_hidden_layers(centred):
            y, vjp = jax.vjp(linear_layer_norm_mish, *args)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=2e-5, atol=2e-5)
        for a, r in zip(vjp(g), vjp_ref(g), strict=True):
            assert a.shape == r.shape and a.dtype == r.dtype
            scale_of = float(np.max(np.abs(np.asarray(r))))
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4,
                                       atol=2e-5 * np.sqrt(rows) * max(scale_of, 1.0))
    if jax.default_backend() == "cpu":
        assert (activation_row_means(False), activation_row_means(True)) == (2, 1)
    monkeypatch.setenv(TUNING_ENV, "0")
    assert (activation_row_means(False), activation_row_means(True)) == (0, 0)
    with centred_hidden_layers():
        np.testing.assert_allclose(np.asarray(linear_layer_norm_mish(*args)), np.asarray(y_ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("x_shape,k_shape,b_shape,p_shape", [
    ((7, 96), (96, 64), (64,), (64,)),  # a dense layer
    ((2, 3, 5, 96), (2, 96, 64), (2, 1, 1, 64), (2, 1, 1, 64)),  # an ensemble's members
])
def test_bf16_hidden_layers_normalise_the_float32_product(x_shape, k_shape, b_shape, p_shape):
    """In bf16 compute a hidden layer is the float32 layer of its bf16 inputs, rounded once to bf16 at its output
    (the product accumulated and normalised in float32, as torch's autocast does); centred, within one more bf16
    rounding, of the centred kernel. Its only bf16 arithmetic is the matmul of the bf16 operands."""
    from mtdistill_jax.math import mish
    from mtdistill_jax.nn.layers import centred_affine, centred_hidden_layers, layer_norm, linear_layer_norm_mish

    k = jax.random.split(jax.random.key(6), 5)
    args32 = (0.5 + jax.random.normal(k[0], x_shape), 0.3 + 0.1 * jax.random.normal(k[1], k_shape),
              3.0 + jax.random.normal(k[2], b_shape), 1.0 + jax.random.normal(k[3], p_shape),
              jax.random.normal(k[4], p_shape))
    args = tuple(a.astype(jnp.bfloat16) for a in args32)
    x, kernel, bias, scale, ln_bias = (a.astype(jnp.float32) for a in args)  # the bf16 values, exactly
    spec = "...i,io->...o" if kernel.ndim == 2 else "m...i,mio->m...o"
    y = jnp.einsum(spec, x, kernel, precision=jax.lax.Precision.HIGHEST)
    expected = np.asarray(mish(layer_norm(y + bias, scale, ln_bias)))
    rounded = np.asarray(jnp.asarray(expected).astype(jnp.bfloat16).astype(jnp.float32))
    kernel_means = {}
    for centred in (False, True):
        with centred_hidden_layers(centred):  # fresh functions: traces are cached per function, not per context
            out = jax.jit(lambda *a: linear_layer_norm_mish(*a))(*args)
            jaxpr = jax.make_jaxpr(lambda *a: linear_layer_norm_mish(*a))(*args)
        kernel_means[centred] = sum(1 for e in equations(jaxpr, "dot_general")
                                    if e.invars[0].aval.shape == k_shape and e.invars[1].aval.shape[-1] == 1)
        assert out.dtype == jnp.bfloat16
        err = np.abs(np.asarray(out.astype(jnp.float32)) - expected)
        tol = 2.0 ** -8 * (np.abs(expected) + 0.05)  # one bf16 rounding of the output
        if centred:  # and one of the centred kernel: |x| @ (2^-9 |kc|) on the product, over its rows' spread
            kc, _ = centred_affine(kernel, bias)
            moved = jnp.einsum(spec, jnp.abs(x), 2.0 ** -9 * jnp.abs(kc))
            spread = jnp.std(y + bias, axis=-1, keepdims=True)
            tol = tol + np.asarray(1.1 * jnp.abs(scale) * moved / spread)  # 1.1: Mish's steepest slope
        assert np.all(err <= tol), (centred, float(np.max(err / (np.abs(expected) + 0.05))))
        if not centred:  # exactly the float32 layer, rounded once
            assert np.mean(np.asarray(out.astype(jnp.float32)) == rounded) > 0.99
        bf16_ops = {e.primitive.name for e in equations(jaxpr, None)
                    if any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in e.outvars)}
        assert bf16_ops <= {"convert_element_type", "reshape", "broadcast_in_dim", "pjit"}, bf16_ops
        dots = [tuple(v.aval.dtype for v in e.invars) for e in equations(jaxpr, "dot_general")
                if e.invars[0].aval.shape == x_shape]
        assert dots == [(jnp.bfloat16, jnp.bfloat16)], dots
    if jax.default_backend() == "cpu":  # centred: the kernel's column means, taken once (float32 on CPU)
        assert kernel_means == {False: 0, True: 1}, kernel_means


@pytest.mark.parametrize("act", ["mish", "simnorm"])
def test_bf16_normed_linear_is_the_float32_layer_rounded_once(act):
    """A NormedLinear (the encoder's and dynamics' SimNorm output layers, or a Mish layer) in bf16 compute gives the
    float32 layer of its bf16 inputs and parameters, rounded to bf16 at its output."""
    from mtdistill_jax.checkpoint import transforms
    from mtdistill_jax.nn.layers import NormedLinear

    layer = NormedLinear(64, act=act)
    x = 0.5 + jax.random.normal(jax.random.key(7), (9, 96))
    params = layer.init(jax.random.key(8), x)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(9), p.shape), params)
    p16, x16 = transforms.to_compute(params, "bfloat16", xp=jnp), x.astype(jnp.bfloat16)
    out = layer.apply({"params": p16}, x16)
    assert out.dtype == jnp.bfloat16
    expected = layer.apply({"params": jax.tree.map(lambda p: p.astype(jnp.float32), p16)}, x16.astype(jnp.float32))
    expected = np.asarray(expected)
    err = np.abs(np.asarray(out.astype(jnp.float32)) - expected)
    assert np.all(err <= 2.0 ** -8 * (np.abs(expected) + 1e-3)), float(np.max(err))


def test_centred_hidden_layers_is_scoped():
    """The context sets the choice for the traces inside it only, nested contexts included."""
    from mtdistill_jax.nn.layers import _CENTRED, centred_hidden_layers

    assert not _CENTRED.get()
    with centred_hidden_layers():
        assert _CENTRED.get()
        with centred_hidden_layers(False):
            assert not _CENTRED.get()
        assert _CENTRED.get()
    assert not _CENTRED.get()
    with pytest.raises(RuntimeError), centred_hidden_layers():
        raise RuntimeError
    assert not _CENTRED.get()


def test_a_layers_forward_and_backward_move_few_activation_sized_arrays_on_cpu(monkeypatch):
    """A Q-ensemble layer's tail (matmul, LayerNorm, Mish) forward and backward in one program: its elementwise
    kernels read and write at most 14 arrays of the activation's size in all (13.1 with this library and jax
    0.10.2; 20.1 with Mish's derivative as two divides re-read by LayerNorm's three backward kernels, and the
    forward's exp kept in memory). On CPU those kernels run at the memory bandwidth, so these bytes are their
    time. XLA's fusion decisions may change with its version: the bound is this library's, measured."""
    from benchmarks.common import fusion_bytes
    from mtdistill_jax.nn.layers import layer_norm_mish
    from mtdistill_jax.xla_cpu import TUNING_ENV

    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's fusion decisions")
    monkeypatch.delenv(TUNING_ENV, raising=False)
    k = jax.random.split(jax.random.key(0), 2)
    x, w = jax.random.normal(k[0], (2, 256, 384)), jax.random.normal(k[1], (2, 384, 384))
    s, b = jnp.ones((2, 1, 384)), jnp.zeros((2, 1, 384))

    def step(x, w, s, b):
        y, vjp = jax.vjp(lambda x, w, s, b: layer_norm_mish(matmul(x, w), s, b), x, w, s, b)
        return y, vjp(y)

    moved = sum(fusion_bytes(jax.jit(step).lower(x, w, s, b).compile().as_text()).values())
    assert moved <= 14 * x.size * 4, moved / (x.size * 4)


@pytest.mark.parametrize("shape,dtype,by_matmul", [
    ((384, 128), jnp.float32, True),
    ((2, 230, 384), jnp.float32, True),
    ((12,), jnp.float32, True),  # 4 rows
    ((101,), jnp.float32, False),  # odd: no rows
    ((3, 5), jnp.float32, False),
    ((64,), jnp.bfloat16, False),  # float32 only
    ((0, 4), jnp.float32, False),  # empty: 0
])
def test_squared_norm_matches_the_sum_of_squares_and_uses_the_matmul_where_it_can(shape, dtype, by_matmul,
                                                                                  monkeypatch):
    """squared_norm is sum(x ** 2) within float32 round-off; on CPU in float32 with an even number of elements it
    is one dot_general (no reduction), elsewhere (and with MTDISTILL_XLA_CPU_TUNING=0) a reduction."""
    from mtdistill_jax.nn.layers import squared_norm
    from mtdistill_jax.xla_cpu import TUNING_ENV

    x = (jax.random.normal(jax.random.key(2), shape) * 3.0).astype(dtype)
    expected = float(np.sum(np.square(np.asarray(x, np.float64))))
    for tuning in ("1", "0"):
        monkeypatch.setenv(TUNING_ENV, tuning)
        out = jax.jit(lambda x: squared_norm(x))(x)  # a fresh function: traced again with this setting
        assert out.shape == () and out.dtype == dtype
        rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(float(out), expected, rtol=rtol)
        prims = {e.primitive.name for e in jax.make_jaxpr(lambda x: squared_norm(x))(x).eqns}
        if by_matmul and tuning == "1" and jax.default_backend() == "cpu":
            assert "dot_general" in prims and "reduce_sum" not in prims, prims
            hlo = jax.jit(lambda x: squared_norm(x)).lower(x).compile().as_text()
            assert " dot(" in hlo and "reduce-window" not in hlo, hlo  # XLA kept the product
            x_type = f"{x.dtype.name.replace('float', 'f')}[{','.join(map(str, shape))}]"
            on_x = [ln for ln in hlo.splitlines() if f"= {x_type}" in ln]
            assert all(" parameter(" in ln or " bitcast(" in ln for ln in on_x), on_x  # nothing computed at x's shape
        else:
            assert "dot_general" not in prims, prims
