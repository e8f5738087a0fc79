"""Timing helpers for the benchmark scripts: compile time apart, median of repeated runs after warm-up."""

from __future__ import annotations

import time

import jax
import numpy as np


def time_jitted(fn, args_fn, repeats: int = 20, *, return_compiled: bool = False, compiler_options=None):
    """Compile ``fn`` (timed; ``compiler_options``: XLA options of this program), warm up once, then time
    ``repeats`` calls (block_until_ready after each).

    ``args_fn(i)`` gives the arguments of call ``i``. Returns (compile_s, median_s, p10_s, p90_s), plus the
    compiled executable as a fifth item with ``return_compiled`` (for its memory/cost analysis).
    """
    args = args_fn(0)
    t = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    times = []
    for i in range(repeats):
        args = args_fn(i + 1)
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    times = np.asarray(times)
    stats = (compile_s, float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90)))
    return (*stats, compiled) if return_compiled else stats


def header():
    d = jax.devices()[0]
    return f"jax {jax.__version__} on {d.platform} ({d.device_kind}), {jax.device_count()} device(s)"


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Measured matmul throughput of the default device (n x n @ n x n in ``dtype``), GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # random data: zeros/ones run faster on GPUs
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(a))
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def cost_flops(program) -> float | None:
    """``cost_analysis()['flops']`` of a lowered or compiled program (a dict, or a list of one per device in
    older jax); None where the backend gives none."""
    try:
        ca = program.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis raise various errors
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])
