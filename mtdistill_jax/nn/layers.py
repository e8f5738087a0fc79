"""Building blocks of the TD-MPC2 networks (official ``common/layers.py``) in Flax linen.

Parameter names mirror the official state dict so the importer is a rename plus a transpose:
``kernel`` [in, out] (torch ``weight`` [out, in] transposed), ``bias``, ``ln_scale`` (``ln.weight``) and
``ln_bias`` (``ln.bias``). Ensembles carry the member index as a leading axis on every parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtdistill_jax.math import mish, mish_derivative_parts, simnorm
from mtdistill_jax.xla_cpu import TUNING_ENV

LN_EPS = 1e-5  # torch.nn.LayerNorm default (Flax's default is 1e-6)
INIT_STD = 0.02  # official weight_init: trunc_normal_(std=0.02) with bounds +-2 (absolute), i.e. ~N(0, 0.02^2)


@jax.custom_vjp
def matmul(x, kernel):
    """``x @ kernel`` for a ``kernel [in, out]``, or per member for an ensemble ``kernel [members, in, out]``
    with ``x [members, ..., in]``; the same values as ``jnp.matmul``, with a backward laid out for XLA:CPU.

    With autodiff's own transpose, the weight-gradient dot asks XLA for the output gradient in transposed
    (out, rows) order, and XLA fuses the whole LayerNorm/Mish backward that produces that gradient into the
    transposing copy, recomputing it element by element in strided order; on CPU that copy costs more than
    the matmul (57 ms of a 785 ms 5M update for the first Q layer alone). Here the weight gradient is computed
    as ``g^T x`` (the gradient read in its stored order) and the small ``[out, in]`` result is transposed.
    Where that product is kept in that order (:func:`kernel_grad_kept_out_in`), XLA is stopped from folding
    the transpose back into the dot.
    """
    if kernel.ndim == 2:
        return _dot("...i,io->...o", x, kernel) if _low(x, kernel) else x @ kernel
    return _dot("m...i,mio->m...o", x, kernel)


def _low(a, b) -> bool:
    """Whether ``a`` and ``b`` meet in a 16-bit float dtype (bf16/fp16 compute)."""
    return jnp.dtype(jnp.result_type(a, b)).itemsize < 4


def _dot(spec: str, a, b, rounded: bool = True):
    """``einsum(spec, a, b)``; with 16-bit operands, products accumulated in float32 and the result rounded once
    to the operands' dtype (``rounded``) or kept in float32. XLA:CPU otherwise upcasts a bf16-output dot's
    operands to float32 and runs a float32 dot; a float32-accumulating bf16 dot can reach the CPU's bf16 units
    (YNNPACK's single-dot path)."""
    if not _low(a, b):
        return jnp.einsum(spec, a, b)
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(a, b)) if rounded else out


def matmul_float32(x, kernel):
    """:func:`matmul`'s product (same kernel layouts) for 16-bit operands, accumulated and returned in float32
    (not rounded to the operands' dtype): the input of a hidden layer's LayerNorm in 16-bit compute, which
    :func:`linear_layer_norm_mish` normalises in float32 as torch's autocast does."""
    if not _low(x, kernel):
        raise ValueError(f"matmul_float32 is for 16-bit operands, got {jnp.result_type(x, kernel)}")
    return _dot("...i,io->...o" if kernel.ndim == 2 else "m...i,mio->m...o", x, kernel, rounded=False)


def _affine(x, kernel, bias):
    """``x @ kernel + bias`` as a hidden layer forms it before its LayerNorm: with 16-bit operands the float32
    product (:func:`matmul_float32`) plus the bias in float32, else :func:`matmul` and :func:`add_bias` in the
    operands' dtype."""
    if _low(x, kernel):
        return add_bias(matmul_float32(x, kernel), bias.astype(jnp.float32))
    return add_bias(matmul(x, kernel), bias)


def _matmul_fwd(x, kernel):
    return matmul(x, kernel), (x, kernel)


def kernel_grad_kept_out_in(kernel) -> bool:
    """Whether :func:`matmul`'s backward keeps the weight gradient's ``[out, in]`` product (``g^T x``) from XLA's
    algebraic simplifier, which folds the transpose that follows into the dot and makes it ``x^T g``: where the
    layer narrows at least by half (2 out <= in), in float32 on CPU, unless ``MTDISTILL_XLA_CPU_TUNING=0``.

    The matmul library packs a dot operand whose contracted axis is its leading one (``x`` in ``x^T g``,
    ``g`` in ``g^T x``) at a cost that grows with that operand's size, so the smaller of the two should be the
    one read across: in the 1M update on one core (benchmarks/README.md, "What bounds the updates on CPU") the three
    narrowing layers' weight gradients (the policy's 384 -> 12, the two-hot heads' 384 -> 101) took 1.79 ms
    this way against 3.65 ms folded. Square and widening layers keep the folded form, and so does a layer that
    narrows less than by half (the 5M update's first Q layer, 582 -> 512, got slower as ``g^T x``). On other
    backends the dot takes either operand transposed at no cost and the barrier would only block fusion. Off
    while tracing inside ``narrow_kernel_grads_kept(False)`` (for benchmarks)."""
    return (_NARROW_KEPT.get() and kernel.dtype == jnp.float32 and 2 * kernel.shape[-1] <= kernel.shape[-2]
            and jax.default_backend() == "cpu" and os.environ.get(TUNING_ENV, "1") != "0")


_NARROW_KEPT = contextvars.ContextVar("mtdistill_narrow_kernel_grads_kept", default=True)


@contextlib.contextmanager
def narrow_kernel_grads_kept(enabled: bool = True):
    """While tracing inside this context, :func:`kernel_grad_kept_out_in` holds (where its other conditions do)
    or not: a trace-time choice, for comparing the two forms of a narrowing layer's weight gradient
    (``benchmarks/update_step.py --narrow_grads``). Same values either way."""
    token = _NARROW_KEPT.set(bool(enabled))
    try:
        yield
    finally:
        _NARROW_KEPT.reset(token)


def _matmul_bwd(res, g):
    x, kernel = res
    if kernel.ndim == 2:
        dx = _dot("...o,io->...i", g, kernel) if _low(g, kernel) else g @ kernel.T
        dk = _dot("ro,ri->oi", g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
    else:
        m = kernel.shape[0]
        dx = _dot("m...o,mio->m...i", g, kernel)
        dk = _dot("mro,mri->moi", g.reshape(m, -1, g.shape[-1]), x.reshape(m, -1, x.shape[-1]))
    if kernel_grad_kept_out_in(kernel):
        dk = jax.lax.optimization_barrier(dk)
    dk = jnp.swapaxes(dk, -1, -2)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)  # cotangents in the primals' dtypes (mixed inputs)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _mix32(x):
    """A 32-bit integer finaliser (xor-shift / multiply, the "lowbias32" constants): every input bit flips each
    output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_bits(key, shape) -> jax.Array:
    """Uniform uint32 words of ``shape`` for dropout masks: two words drawn from ``key`` (threefry, as every
    draw) key a counter-based hash of each element's flat index, ``mix(mix(index ^ k0) + k1)``.

    Threefry for every element costs ~10 ns per word on XLA:CPU (16 ms of a 190 ms 1M update went to the Q
    ensemble's dropout masks); the hash costs ~0.5 ns. Different keys give independent-looking streams, and the
    keep test ``bits >= round(rate * 2^32)`` resolves the rate to 2^-32 (``jax.random.bernoulli``: 2^-23).
    """
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"dropout_bits: {size} elements do not fit 32-bit indices (shape {shape})")
    k = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _mix32(_mix32(index ^ k[0]) + k[1])


def dropout(x, rate: float, key):
    """Inverted dropout (train mode): zero each element with probability ``rate``, scale the rest by
    1 / (1 - rate), as ``torch.nn.Dropout``; masks from :func:`dropout_bits`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    keep = dropout_bits(key, x.shape) >= jnp.uint32(round(rate * 2**32))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def row_means_by_matmul(x) -> bool:
    """Whether :func:`layer_norm` takes its row means as matrix-vector products: float32 on the CPU backend,
    unless ``MTDISTILL_XLA_CPU_TUNING=0``.

    XLA:CPU rewrites a row sum of more than 32 elements into a 32-wide reduce-window and a reduce (its
    tree-reduction pass), separate kernels in the forward pass and again in the backward pass. A product with a
    1/D column goes to the matmul library instead, and its gradient is a broadcast: the 1M update on 1 core is
    6 % faster (192 vs 205 ms and 230 vs 245 ms, two in-process A/B runs of 30 interleaved steps)."""
    return x.dtype == jnp.float32 and jax.default_backend() == "cpu" and os.environ.get(TUNING_ENV, "1") != "0"


def layer_norm(x, scale, bias, eps: float = LN_EPS):
    """LayerNorm over the last axis with the biased variance, as torch computes it."""
    if row_means_by_matmul(x):
        xhat = normalize_rows(x, eps)
    else:
        c = x - jnp.mean(x, axis=-1, keepdims=True)
        xhat = c * jax.lax.rsqrt(jnp.mean(jnp.square(c), axis=-1, keepdims=True) + eps)
    return scale_shift(xhat, scale, bias)


def _row_mean(y):
    """Means over the last axis, kept as a size-1 axis, as a product with a 1/D column (the matmul library)."""
    col = jnp.full((y.shape[-1], 1), 1.0 / y.shape[-1], y.dtype)
    return jnp.matmul(y, col, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize_rows(x, eps: float = LN_EPS):
    """``(x - mean) / sqrt(var + eps)`` over the last axis (LayerNorm without its affine part), every row mean,
    forward and backward, a matrix-vector product (:func:`row_means_by_matmul`).

    The backward is LayerNorm's closed form ``r * (g - mean(g) - xhat * mean(g * xhat))`` with
    ``r = 1 / sqrt(var + eps)``; autodiff of the forward would sum the gradient over each row twice (the
    transposes of the broadcast mean and of the broadcast ``r``), reductions that XLA:CPU rewrites into
    reduce-window and reduce kernels.
    """
    return _normalize_rows_fwd(x, eps)[0]


def _normalize_rows_fwd(x, eps, centred: bool = False):
    c = x if centred else x - _row_mean(x)
    r = jax.lax.rsqrt(_row_mean(jnp.square(c)) + eps)
    xhat = c * r
    return xhat, (xhat, r)


def _normalize_rows_bwd(eps, res, g):
    xhat, r = res
    return (r * (g - _row_mean(g) - xhat * _row_mean(g * xhat)),)


normalize_rows.defvjp(_normalize_rows_fwd, _normalize_rows_bwd)


def layer_norm_mish(x, scale, bias, eps: float = LN_EPS):
    """``mish(layer_norm(x, scale, bias))``, the tail of every hidden layer; where :func:`row_means_by_matmul`
    holds and the parameters are per feature (``[h]``, or an ensemble's ``[members, 1, ..., 1, h]``), with one
    backward for the three (:func:`_layer_norm_mish`), else as that composition."""
    if _fused_layer_norm_mish(x, scale, bias):
        return _layer_norm_mish(x, scale, bias, eps, False)
    return mish(layer_norm(x, scale, bias, eps))


def _fused_layer_norm_mish(x, scale, bias) -> bool:
    """Whether :func:`layer_norm_mish` of ``x`` (an array or a ``jax.ShapeDtypeStruct``) takes
    :func:`_layer_norm_mish`."""
    return (row_means_by_matmul(x) and _per_member_features(scale, x) and bias.shape == scale.shape
            and scale.dtype == bias.dtype == x.dtype)


def linear_layer_norm_mish(x, kernel, bias, scale, ln_bias, eps: float = LN_EPS, select=None):
    """``mish(layer_norm(x @ kernel + bias, scale, ln_bias))`` (:func:`matmul`'s kernel layouts; ``bias``
    broadcast to the product as :func:`add_bias` does), a hidden layer without dropout. ``select(kernel, bias)``
    (optional) gives the weights to apply, e.g. an ensemble's members, reshaped for broadcasting.

    Inside :func:`centred_hidden_layers`, where :func:`layer_norm_mish` takes its fused path, the product is
    formed with the kernel's and the bias's columns less their means over the output features
    (:func:`centred_affine`, before ``select``: each member's centred weights are the same whichever members are
    selected): each row of the product is then already centred (LayerNorm is invariant to a shift of its input's
    rows), so the forward pass neither materialises ``x @ kernel + bias`` nor takes its row means, only the
    variance's. The gradients are LayerNorm's (:func:`_layer_norm_mish`, whose input gradient has zero row
    means), the means being constants to autodiff, so values and gradients equal the uncentred layer's within
    float32 round-off (``tests/nn/test_layers.py``).

    With 16-bit operands (bf16 compute), the product accumulates in float32 and stays there
    (:func:`matmul_float32`): the bias, LayerNorm and Mish run in float32 and only the layer's output is rounded
    to the operands' dtype, as torch's autocast runs ``layer_norm`` in float32. So the float32 fused path (and,
    inside :func:`centred_hidden_layers`, the centring, done in float32 before the kernel is rounded back) applies
    to bf16 compute too; rounding the product to bf16 and normalising in bf16 planned 12 % slower than float32
    on the 2-core Xeon (``benchmarks/plan.py``; benchmarks/README.md, "bf16 compute against torch's bf16 autocast")."""
    select = select or (lambda k, b: (k, b))
    k, b = jax.eval_shape(select, kernel, bias)  # the selected weights' shapes and dtypes, nothing traced
    wide = _low(x, k)
    if wide:  # 16-bit compute: the product in float32, the LayerNorm and Mish in float32, the output rounded
        scale, ln_bias = scale.astype(jnp.float32), ln_bias.astype(jnp.float32)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + k.shape[-1:], jnp.float32 if wide else jnp.result_type(x, k))
    centre = (_CENTRED.get() and _fused_layer_norm_mish(out, scale, ln_bias)
              and (wide or k.dtype == b.dtype == out.dtype))
    if centre and wide:  # centred in float32, then the kernel rounded to its dtype (its columns' means ~ 0)
        kc, bc = centred_affine(kernel.astype(jnp.float32), bias.astype(jnp.float32))
        k, b = select(kc.astype(kernel.dtype), bc)
    else:
        k, b = select(*centred_affine(kernel, bias)) if centre else select(kernel, bias)
    y = _affine(x, k, b)
    y = _layer_norm_mish(y, scale, ln_bias, eps, True) if centre else layer_norm_mish(y, scale, ln_bias, eps)
    return y.astype(jnp.result_type(x, k)) if wide else y


_CENTRED = contextvars.ContextVar("mtdistill_centred_hidden_layers", default=False)


@contextlib.contextmanager
def centred_hidden_layers(enabled: bool = True):
    """While tracing inside this context, hidden layers without dropout (:func:`linear_layer_norm_mish`, where
    its fused path applies: float32 products on CPU, bf16 compute's included) centre their weights instead of
    their activations.

    The centred weights cost a pass over every kernel per program; each use of a layer then saves a pass over
    its activations. That pays in the planner, whose loop runs every layer 6 times on 512 rows per environment
    while XLA computes the centred weights once, outside the loop (1 core of the 2-core Xeon, 1M model,
    ``benchmarks/plan.py --layers centred,plain``: plan for 1 env 108.5 -> 99.7 ms, for 30 envs 3.84 -> 3.45 s);
    not in the update, which reads every kernel about
    as often as it runs it (5M update 1-2 % slower, 1M unchanged), so it is off outside this context. A
    trace-time choice, like ``jax.default_matmul_precision``: both ways compute the same values (in bf16 compute,
    within one bf16 rounding of the centred kernel)."""
    token = _CENTRED.set(bool(enabled))
    try:
        yield
    finally:
        _CENTRED.reset(token)


def centred_affine(kernel, bias):
    """``kernel`` ``[..., in, out]`` and ``bias`` ``[..., out]`` less their means over ``out`` (the means
    under ``stop_gradient``): ``x @ kernel + bias`` less its row means, as one product. The kernel's means are a
    product with a ``1/out`` column (the matmul library, one read of the kernel)."""
    kernel_mean = jax.lax.stop_gradient(_row_mean(kernel))
    bias_mean = jax.lax.stop_gradient(jnp.mean(bias, axis=-1, keepdims=True))
    return kernel - kernel_mean, bias - bias_mean


def _per_member_features(w, x) -> bool:
    """Whether ``w`` is ``[h]``, or ``[1 or members, 1, ..., 1, h]`` with as many axes as ``x [members, ..., h]``
    (any other shape broadcasts along other axes than the ones :func:`_weighted_row_mean` reads)."""
    if w.ndim not in (1, x.ndim) or x.ndim < 1 or w.shape[-1] != x.shape[-1]:
        return False
    lead = w.shape[:-1]
    return all(d == 1 for d in lead[1:]) and (not lead or lead[0] in (1, x.shape[0]))


def _weighted_row_mean(y, w):
    """``mean(y * w, axis=-1, keepdims=True)`` for per-feature weights ``w`` (see :func:`_per_member_features`)
    as a matrix-vector product with the column ``w / h`` (one per member), without materialising ``y * w``."""
    h = y.shape[-1]
    if w.ndim == 1 or all(d == 1 for d in w.shape[:-1]):
        return jnp.matmul(y, (w.reshape(h) / h)[:, None], precision=jax.lax.Precision.HIGHEST)
    m = w.shape[0]
    out = jnp.matmul(y.reshape(m, -1, h), (w.reshape(m, h) / h)[:, :, None], precision=jax.lax.Precision.HIGHEST)
    return out.reshape(y.shape[:-1] + (1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_mish(x, scale, bias, eps, centred):
    """``mish(normalize_rows(x) * scale + bias)`` with a closed-form backward that keeps two arrays of the
    activation's size from the forward pass (``xhat`` and the per-row ``r``) and materialises two in the backward
    (``gz``, the gradient at Mish's input, and ``gz * xhat``); every row mean and parameter sum is a matrix
    product. Composed from :func:`mish`'s, :func:`scale_shift`'s and :func:`normalize_rows`' own backward
    passes, XLA:CPU kept Mish's derivative as two saved arrays and re-read them, with the output gradient and the
    pre-normalisation activation, in each of the three LayerNorm backward kernels. Same values and gradients
    within float32 round-off (``tests/nn/test_layers.py``). ``centred``: ``x``'s rows have zero means already
    (:func:`linear_layer_norm_mish`), so the forward pass does not subtract them; the gradient is the same
    closed form, LayerNorm's with respect to its input before centring."""
    return _layer_norm_mish_fwd(x, scale, bias, eps, centred)[0]


def _layer_norm_mish_fwd(x, scale, bias, eps, centred):
    xhat, (_, r) = _normalize_rows_fwd(x, eps, centred)
    return mish(xhat * scale + bias), (xhat, r, scale, bias)


def _layer_norm_mish_bwd(eps, centred, res, g):
    xhat, r, scale, bias = res
    p, q = mish_derivative_parts(xhat * scale + bias)
    gz = g * p / q
    gzx = gz * xhat
    # LayerNorm's closed form r * (gx - mean(gx) - xhat * mean(gx * xhat)) at gx = gz * scale
    dx = r * (gz * scale - _weighted_row_mean(gz, scale) - xhat * _weighted_row_mean(gzx, scale))
    return dx, sum_to(gzx, scale.shape), sum_to(gz, bias.shape)


_layer_norm_mish.defvjp(_layer_norm_mish_fwd, _layer_norm_mish_bwd)


def column_sums_by_matmul(g) -> bool:
    """Whether :func:`sum_to` takes sums over rows as products with ones: where :func:`row_means_by_matmul`
    holds (float32 on CPU, unless ``MTDISTILL_XLA_CPU_TUNING=0``)."""
    return row_means_by_matmul(g)


def sum_to(g, shape):
    """``g`` summed over the axes along which an operand of ``shape`` was broadcast to ``g.shape`` (numpy's
    right-aligned broadcasting): the gradient of a bias or scale of that shape.

    Where :func:`column_sums_by_matmul` holds (float32 on CPU) and the axes kept, other than the last, lead
    (``[h]``, or an ensemble's ``[members, 1, ..., 1, h]``), the sum is a product with a column of ones, which
    goes to the matmul library; otherwise it is a reduction, which XLA:CPU's tree-reduction pass turns into a
    32-wide reduce-window and a reduce: two generated kernels per gradient, and in the 5M update on 2 cores the
    reduce-windows of the bias and LayerNorm gradients took 42 of 370 profiled ms.
    """
    shape = tuple(shape)
    if len(shape) > g.ndim:
        raise ValueError(f"sum_to: shape {shape} has more axes than the gradient {g.shape}")
    full = (1,) * (g.ndim - len(shape)) + shape
    for a, b in zip(full, g.shape, strict=True):
        if a not in (1, b):
            raise ValueError(f"sum_to: shape {shape} does not broadcast to {g.shape}")
    axes = tuple(i for i, (a, b) in enumerate(zip(full, g.shape, strict=True)) if a == 1 and b != 1)
    if not axes:
        return g.reshape(shape)
    keep = [i for i in range(g.ndim - 1) if i not in axes]
    if g.size and column_sums_by_matmul(g) and g.ndim - 1 not in axes and keep == list(range(len(keep))):
        k, h = math.prod(g.shape[:len(keep)]), g.shape[-1]
        rows = g.size // (k * h)
        g3 = g.reshape(k, rows, h)
        if k == 1:
            out = jnp.matmul(jnp.ones((rows,), g.dtype), g3[0], precision=jax.lax.Precision.HIGHEST)
        else:
            out = jnp.einsum("kr,krh->kh", jnp.ones((k, rows), g.dtype), g3, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(shape)
    return jnp.sum(g, axis=axes).reshape(shape)


SQUARED_NORM_ROWS = 16  # the most rows squared_norm splits x into (see there)


def squared_norm(x) -> jax.Array:
    """``sum(x ** 2)`` (a scalar). Where :func:`column_sums_by_matmul` holds and ``x``'s size has an even divisor
    ``r``, the largest power of two up to 16, it is the trace of the ``[r, r]`` product of ``x`` split into
    ``r`` rows with itself (one call of the matmul library, which reads ``x`` once); otherwise a reduction of
    ``x ** 2``. XLA:CPU compiles that reduction into kernels of ``x``'s shape (the square, then its
    tree-reduction pass's 32-wide reduce-window and a reduce), so a global gradient norm over a model's leaves
    cost a few kernels per distinct leaf shape, and a pass writing and one reading back each squared gradient.
    (A product of ``x`` with itself as vectors is rewritten by XLA into that same reduction.) Measured on one
    core of the 2-core Xeon, ``[2, 384, 384]``: 16 rows 0.21 ms, relative error 1.6e-8 (float64 reference);
    the reduction 0.46 ms, 7.8e-8; 2 rows 0.77 ms, 3.3e-5 (long sequential sums)."""
    rows = math.gcd(x.size, SQUARED_NORM_ROWS)
    if x.size and rows >= 2 and column_sums_by_matmul(x):
        split = x.reshape(rows, -1)
        gram = jax.lax.dot_general(split, split, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
        return jnp.trace(gram)
    return jnp.sum(jnp.square(x))


@jax.custom_vjp
def add_bias(x, bias):
    """``x + bias`` (``bias`` broadcast to ``x``); its gradient's sums over rows are :func:`sum_to`'s."""
    return x + bias


def _add_bias_fwd(x, bias):
    return x + bias, (x, bias)  # only their shapes and dtypes are read: XLA drops the buffers


def _add_bias_bwd(res, g):
    x, bias = res
    return sum_to(g, x.shape).astype(x.dtype), sum_to(g, bias.shape).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def scale_shift(x, scale, bias):
    """``x * scale + bias`` (LayerNorm's affine part, parameters broadcast to ``x``); the parameters' gradients
    are :func:`sum_to`'s."""
    return x * scale + bias


def _scale_shift_fwd(x, scale, bias):
    return x * scale + bias, (x, scale, bias)


def _scale_shift_bwd(res, g):
    x, scale, bias = res
    return (sum_to(g * scale, x.shape).astype(x.dtype), sum_to(g * x, scale.shape).astype(scale.dtype),
            sum_to(g, bias.shape).astype(bias.dtype))


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


def _activation(name: str, simnorm_dim: int):
    if name == "mish":
        return mish
    if name == "simnorm":
        return lambda x: simnorm(x, simnorm_dim)
    raise ValueError(f"unknown activation {name!r}; valid: mish, simnorm")


class NormedLinear(nn.Module):
    """Linear -> (Dropout) -> LayerNorm(eps 1e-5) -> activation (Mish or SimNorm)."""

    features: int
    act: str = "mish"
    simnorm_dim: int = 8
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kernel = self.param("kernel", nn.initializers.normal(INIT_STD), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        ln_scale = self.param("ln_scale", nn.initializers.ones, (self.features,))
        ln_bias = self.param("ln_bias", nn.initializers.zeros, (self.features,))
        dropping = self.dropout > 0 and not deterministic
        if self.act == "mish" and not dropping:
            return linear_layer_norm_mish(x, kernel, bias, ln_scale, ln_bias)
        out_dtype = jnp.result_type(x, kernel)
        y = _affine(x, kernel, bias)
        if _low(x, kernel):  # as linear_layer_norm_mish: normalised and activated in float32, then rounded
            ln_scale, ln_bias = ln_scale.astype(jnp.float32), ln_bias.astype(jnp.float32)
        if dropping:
            y = dropout(y, self.dropout, self.make_rng("dropout"))
        if self.act == "mish":
            return layer_norm_mish(y, ln_scale, ln_bias).astype(out_dtype)
        return _activation(self.act, self.simnorm_dim)(layer_norm(y, ln_scale, ln_bias)).astype(out_dtype)


class Linear(nn.Module):
    """Plain affine output layer (``zero_init`` for the reward and Q heads, as the official init does)."""

    features: int
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_init else nn.initializers.normal(INIT_STD)
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return add_bias(matmul(x, kernel), bias)


class MLP(nn.Module):
    """Official ``layers.mlp``: NormedLinear hidden layers (dropout on the first only), then an output layer.

    ``out_act='simnorm'`` makes the output a NormedLinear with SimNorm (encoder, dynamics); ``None`` makes it
    a plain Linear (reward, policy). Sub-modules are named ``layer0``, ``layer1``, ... as torch's indices.
    """

    hidden: Sequence[int]
    out: int
    out_act: str | None = None
    simnorm_dim: int = 8
    dropout: float = 0.0
    zero_init_out: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        for i, h in enumerate(self.hidden):
            x = NormedLinear(h, dropout=self.dropout if i == 0 else 0.0, name=f"layer{i}")(x, deterministic)
        name = f"layer{len(self.hidden)}"
        if self.out_act is None:
            return Linear(self.out, zero_init=self.zero_init_out, name=name)(x)
        return NormedLinear(self.out, act=self.out_act, simnorm_dim=self.simnorm_dim, name=name)(x)


class EnsembleLinear(nn.Module):
    """``members`` affine maps with parameters ``kernel [members, in, out]`` and ``bias [members, out]``.

    ``shared_input=True`` maps ``x [..., in]`` (one input for every member) to ``[members, ..., out]``;
    otherwise ``x`` is already ``[members, ..., in]``. With ``normed=True`` it is a NormedLinear (optional
    dropout, LayerNorm with per-member ``ln_scale``/``ln_bias``, Mish).
    """

    members: int
    features: int
    shared_input: bool = False
    normed: bool = True
    dropout: float = 0.0
    zero_init: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool = True, heads=None):
        """``heads`` (int array [k]): evaluate only those members (output ``[k, ..., out]``), e.g. the 2 heads a
        Q average or minimum reads; the parameters stay whole."""
        m, h = self.members, self.features
        init = nn.initializers.zeros if self.zero_init else nn.initializers.normal(INIT_STD)
        kernel = self.param("kernel", init, (m, x.shape[-1], h))
        bias = self.param("bias", nn.initializers.zeros, (m, h))
        pick = (lambda p: p) if heads is None else (lambda p: jnp.take(p, heads, axis=0))
        m = m if heads is None else jnp.shape(heads)[0]
        if self.shared_input:
            # One batched matmul over members on the broadcast input (as torch.vmap does), not a single
            # contraction over (members x out): the latter's backward transposes the [members, .., out]
            # gradient into an (in x members*out) layout, which costs more than the matmul itself on CPU.
            x = jnp.broadcast_to(x, (m,) + x.shape)
        bshape = (m,) + (1,) * (x.ndim - 2) + (h,)

        def select(kernel, bias):
            return pick(kernel), pick(bias).reshape(bshape)

        if not self.normed:
            k, b = select(kernel, bias)
            return add_bias(matmul(x, k), b)
        ln_scale = pick(self.param("ln_scale", nn.initializers.ones, (self.members, h))).reshape(bshape)
        ln_bias = pick(self.param("ln_bias", nn.initializers.zeros, (self.members, h))).reshape(bshape)
        if self.dropout > 0 and not deterministic:
            k, b = select(kernel, bias)
            x = dropout(add_bias(matmul(x, k), b), self.dropout, self.make_rng("dropout"))
            return layer_norm_mish(x, ln_scale, ln_bias)
        return linear_layer_norm_mish(x, kernel, bias, ln_scale, ln_bias, select=select)


class EnsembleMLP(nn.Module):
    """``members`` independent MLPs (the Q-ensemble) evaluated together; parameters lead with the member axis.

    Input ``x [..., in]`` is shared by every member; the output is ``[members, ..., out]``. Dropout (first
    layer only) draws independent masks per member, like ``torch.vmap(randomness='different')``.
    """

    members: int
    hidden: Sequence[int]
    out: int
    dropout: float = 0.0
    zero_init_out: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool = True, heads=None):
        """``heads``: only those members (see :class:`EnsembleLinear`)."""
        for i, h in enumerate(self.hidden):
            x = EnsembleLinear(self.members, h, shared_input=(i == 0), dropout=self.dropout if i == 0 else 0.0,
                               name=f"layer{i}")(x, deterministic, heads)
        return EnsembleLinear(self.members, self.out, shared_input=not self.hidden, normed=False,
                              zero_init=self.zero_init_out, name=f"layer{len(self.hidden)}")(x, True, heads)
