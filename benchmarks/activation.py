"""Benchmark: what an elementwise hidden-layer kernel costs per element on this CPU, and which part of it.

A TD-MPC2 hidden layer's elementwise work after its matmul is LayerNorm's affine normalisation (from the row
statistics) and Mish. This times, on one ``[rows, width]`` float32 activation, kernels that read it once and
write one result of its size:

- ``multiply-add``: ``x * a + b``, the plain elementwise kernel (what the memory system moves);
- ``layer norm``: ``(x - mean) * rstd * scale + bias`` with per-row statistics and per-feature parameters;
- ``layer norm + mish``: the same followed by :func:`mtdistill_jax.math.mish` (the library's one-``exp`` Mish);
- ``layer norm + mish, exp replaced``: Mish's arithmetic with its ``exp`` replaced by a multiply-add, so the
  difference to the row above is what the ``exp`` costs;
- ``exp``: ``jnp.exp`` alone.

It prints each kernel's median time (:func:`benchmarks.common.time_jitted`: over ``--repeats`` calls after one
warm-up, dispatch included), ns per element and the GB/s it moves (the activation read and the result written).
Where a row's GB/s falls well below the multiply-add's, that kernel is bound by its arithmetic, not by memory.

Usage: ``python benchmarks/activation.py [--rows 2048] [--width 384] [--repeats 100]`` (``taskset -c 0`` in front
for one core).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import header, time_jitted  # noqa: E402
from mtdistill_jax import math as tdmath  # noqa: E402


def _layer_norm(x, mean, rstd, scale, bias):
    return (x - mean) * rstd * scale + bias


def _mish_without_exp(x):
    """:func:`mtdistill_jax.math.mish`'s arithmetic with ``exp(min(x, clip))`` replaced by a multiply-add."""
    e = jnp.minimum(x, tdmath.MISH_CLIP) * 0.5 + 1.0
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


KERNELS = {
    "multiply-add": lambda x, mean, rstd, scale, bias: x * 1.5 + 0.5,
    "layer norm": _layer_norm,
    "layer norm + mish": lambda *a: tdmath.mish(_layer_norm(*a)),
    "layer norm + mish, exp replaced": lambda *a: _mish_without_exp(_layer_norm(*a)),
    "exp": lambda x, *_: jnp.exp(x),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=100)
    a = ap.parse_args(argv)
    if a.rows < 1 or a.width < 1 or a.repeats < 1:
        ap.error(f"--rows, --width and --repeats must be >= 1, got {a.rows}, {a.width}, {a.repeats}")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.rows, a.width)).astype(np.float32) * 3)
    mean = jnp.asarray(rng.normal(size=(a.rows, 1)).astype(np.float32))
    rstd = jnp.asarray(rng.uniform(0.5, 1.0, size=(a.rows, 1)).astype(np.float32))
    scale, bias = (jnp.asarray(rng.normal(size=(a.width,)).astype(np.float32)) for _ in range(2))
    args = (x, mean, rstd, scale, bias)
    elements = a.rows * a.width
    print(header())
    print(f"one [{a.rows}, {a.width}] float32 activation read and one result written per call; "
          f"median of {a.repeats} calls")
    print(f"{'kernel':<32} {'us':>8} {'ns/element':>10} {'GB/s':>6}")
    for name, fn in KERNELS.items():
        _, sec, _, _ = time_jitted(jax.jit(fn), lambda i: args, a.repeats)
        print(f"{name:<32} {sec * 1e6:>8.1f} {sec / elements * 1e9:>10.3f} {2 * 4 * elements / sec / 1e9:>6.1f}")


if __name__ == "__main__":
    main()
