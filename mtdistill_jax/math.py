"""Numerics of TD-MPC2 (official ``common/math.py``): symlog, two-hot regression, squashed Gaussians; and the
random draws of the update and the planner (:func:`normal`, :func:`uniform`).

All functions are pure ``jax.numpy`` and work on any leading batch shape. Scalars that the official code
keeps as ``[..., 1]`` columns keep that trailing axis here too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_SQRT_2PI = 0.9189385175704956  # 0.5 * log(2 * pi), the constant of the official gaussian_logprob

FLAT_DRAW_IMPLS = ("threefry2x32",)  # key kinds whose draws number their values in row-major order


def _draws_flat(key, shape) -> bool:
    """Whether a draw of ``shape`` from ``key`` may be taken as one vector and reshaped (same values)."""
    if len(shape) < 2:
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
    else:  # a raw uint32 key: the default implementation's
        impl = str(jax.config.jax_default_prng_impl)
    return impl in FLAT_DRAW_IMPLS


def normal(key, shape, dtype=jnp.float32):
    """``jax.random.normal(key, shape, dtype)``, the same array bit for bit, with a shorter compile.

    A threefry key numbers the values of a draw by their row-major index (``iota_2x32_shape`` with
    ``jax_threefry_partitionable``, a flat iota without), so ``prod(shape)`` values drawn as one vector and
    reshaped are the same array. XLA:CPU compiles the vector's kernels much faster than the multi-dimensional
    ones: one ``[3, 256, 6]`` draw compiled in 0.9 s on one core, the same draw as a vector in 0.2 s (the update
    draws two such arrays, the planner one in each MPPI iteration). Other key kinds, and draws of rank 0 or 1,
    go to ``jax.random.normal`` as they are.
    """
    shape = tuple(shape)
    if not _draws_flat(key, shape):
        return jax.random.normal(key, shape, dtype)
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
    """``jax.random.uniform(key, shape, dtype, minval, maxval)`` for scalar bounds, drawn flat as :func:`normal`."""
    shape = tuple(shape)
    if not _draws_flat(key, shape) or jnp.ndim(minval) or jnp.ndim(maxval):
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)


def symlog(x):
    """sign(x) * log(1 + |x|)."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    """sign(x) * (exp(|x|) - 1), the inverse of :func:`symlog`."""
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def bin_centres(num_bins: int, vmin: float, vmax: float, dtype=jnp.float32):
    """The ``num_bins`` regression support points, linspace(vmin, vmax) in symlog space."""
    return jnp.linspace(vmin, vmax, num_bins, dtype=dtype)


def two_hot(x, num_bins: int, vmin: float, vmax: float):
    """Soft two-hot encoding of scalars ``x[..., 1]`` in symlog space -> ``[..., num_bins]``.

    Values are clamped to [vmin, vmax] after symlog; the mass splits linearly between the two nearest bins.
    """
    bin_size = (vmax - vmin) / (num_bins - 1)
    x = jnp.clip(symlog(x), vmin, vmax)[..., 0]
    pos = (x - vmin) / bin_size
    idx = jnp.floor(pos)
    offset = (pos - idx)[..., None]
    idx = idx.astype(jnp.int32)
    lower = jax.nn.one_hot(idx, num_bins, dtype=x.dtype)
    upper = jax.nn.one_hot((idx + 1) % num_bins, num_bins, dtype=x.dtype)
    return lower * (1 - offset) + upper * offset


def two_hot_inv(logits, num_bins: int, vmin: float, vmax: float):
    """Expected value of softmax(logits) over the bin centres, mapped back with symexp -> ``[..., 1]``."""
    probs = jax.nn.softmax(logits, axis=-1)
    centres = bin_centres(num_bins, vmin, vmax, logits.dtype)
    return symexp(jnp.sum(probs * centres, axis=-1, keepdims=True))


def soft_ce(logits, target, num_bins: int, vmin: float, vmax: float):
    """Cross-entropy of ``logits [..., num_bins]`` against the two-hot of scalar ``target [..., 1]`` -> ``[..., 1]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(two_hot(target, num_bins, vmin, vmax) * logp, axis=-1, keepdims=True)


def log_std(x, low: float, high: float):
    """Squash raw log-std outputs into [low, high]: low + 0.5 (high - low) (tanh x + 1)."""
    return low + 0.5 * (high - low) * (jnp.tanh(x) + 1)


def gaussian_logprob(eps, log_std_):
    """Log-density of ``mean + eps * exp(log_std)`` under N(mean, std), summed over the last axis -> ``[..., 1]``."""
    residual = -0.5 * jnp.square(eps) - log_std_
    return jnp.sum(residual - LOG_SQRT_2PI, axis=-1, keepdims=True)


def squash(mu, pi, log_pi):
    """tanh-squash mean and sample and correct the log-probability (official ``squash``, 1e-6 floor)."""
    mu = jnp.tanh(mu)
    pi = jnp.tanh(pi)
    log_pi = log_pi - jnp.sum(jnp.log(jax.nn.relu(1 - jnp.square(pi)) + 1e-6), axis=-1, keepdims=True)
    return mu, pi, log_pi


def simnorm(x, group: int):
    """Simplicial normalisation: softmax over consecutive groups of ``group`` features."""
    shp = x.shape
    if shp[-1] % group:
        raise ValueError(f"SimNorm: feature size {shp[-1]} is not a multiple of the group size {group}")
    y = jax.nn.softmax(x.reshape(*shp[:-1], shp[-1] // group, group), axis=-1)
    return y.reshape(shp)


MISH_CLIP = 20.0  # beyond it tanh(softplus(x)) is 1 in float32 (and exp(2x) would overflow past ~44)
# The derivative's clip: beyond 12 Mish's derivative is 1 in float32, (1 + e)(n + 2)^2 stays below 1e27, and its
# exp(min(x, 12)) is not the forward's exp(min(x, 20)), which XLA's common-subexpression pass would otherwise merge,
# making the forward keep that exp in memory for the backward.
MISH_GRAD_CLIP = 12.0


@jax.custom_jvp
def mish(x):
    """Mish activation x * tanh(softplus(x)), as torch.nn.Mish, with one exp instead of exp + log1p + tanh.

    With e = exp(x) and n = e (e + 2): tanh(softplus(x)) = tanh(log(1 + e)) = n / (n + 2). The derivative
    (:func:`mish_derivative_parts`) is in closed form, which avoids the cancellation that differentiating
    n / (n + 2) would bring; against float64 both are within float32 round-off (value and derivative within 5e-7
    on [-100, 100], ``tests/test_math.py``; the textbook derivative is off by 3.4e-6).
    """
    e = jnp.exp(jnp.minimum(x, MISH_CLIP))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


def mish_derivative_parts(x):
    """``(p, q)`` with ``mish'(x) = p / q``: with e = exp(x), n = e (e + 2), s = n + 2, the derivative
    ``r + x sigmoid(x) (1 - r^2)`` (r = n / s, 1 - r^2 = 4 (n + 1) / s^2) over one denominator,
    ``p = n s (1 + e) + 4 x e (n + 1)`` and ``q = (1 + e) s^2``; x clipped at :data:`MISH_GRAD_CLIP`.

    A gradient ``g * p / q`` is then one divide, which XLA:CPU computes once and keeps for the kernels that read
    it; as a sum of two divided terms, XLA kept both terms and recomputed the sum in each of LayerNorm's three
    backward kernels. 16-bit inputs are computed in float32 (``q`` would overflow float16 from x ~ 2.5); the
    parts are then float32."""
    if jnp.dtype(x.dtype).itemsize < 4:
        x = x.astype(jnp.float32)
    m = jnp.minimum(x, MISH_GRAD_CLIP)
    e = jnp.exp(m)
    n = e * (e + 2.0)
    s = n + 2.0
    return n * s * (1.0 + e) + 4.0 * m * e * (n + 1.0), (1.0 + e) * s * s


@mish.defjvp
def _mish_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    p, q = mish_derivative_parts(x)
    return mish.fun(x), (p / q).astype(dx.dtype) * dx
