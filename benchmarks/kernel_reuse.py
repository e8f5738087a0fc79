"""Benchmark: does XLA:CPU compile identical fusions once? Compile time of N elementwise chains of one shape
against N chains of N different shapes.

Each chain (``tanh``, ``exp``, ``abs``, ``sin`` on its own input) becomes one loop fusion, so both programs have N
fusions; with one shape their fused computations are equal up to names, with N shapes they are all different.
The script prints, for each, the fusions and distinct kernels (:func:`benchmarks.common.fused_kernels`), the
fusion emitter's compile events in a ``jax.profiler`` trace (``FusionCompiler::Compile``: one per kernel it emits)
and the cold compile time (median over ``--repeats``, the two programs alternated; persistent cache off, and
every repeat's constants new, so nothing is reused between compiles).

This is what :func:`benchmarks.common.fused_kernels` counts on: a program's compile time follows its distinct
kernels, not its fusions (a loop unrolled into identical copies costs little), and each new shape of the same
work costs a kernel.

Usage: ``python benchmarks/kernel_reuse.py [--chains 80] [--repeats 3]`` (``taskset -c 0`` in front for one core).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chains(xs, salt: float):
    """One elementwise chain per input; ``salt`` makes each repeat's constants (and so its program) new."""
    import jax.numpy as jnp

    return [jnp.sin(jnp.tanh(x) * salt + jnp.exp(-x * x) / (1.0 + jnp.abs(x))) * x for x in xs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if a.chains < 2 or a.repeats < 1:
        ap.error("--chains must be >= 2 and --repeats >= 1")

    import jax
    import numpy as np

    from benchmarks.common import header
    from mtdistill_jax.xla_cpu import usable_cpus

    print(header(), f"{usable_cpus()} core(s)")
    cache_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # every compile cold (restored on return)
    try:
        rows = measure(a.chains, a.repeats)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_on)
    print(f"{a.chains} elementwise chains, cold compiles, median of {a.repeats} (the first repeat profiled)")
    print(f"{'program':>10} {'fusions':>8} {'kernels':>8} {'emitted':>8} {'compile s':>10}")
    for name, row in rows.items():
        print(f"{name:>10} {row['fusions']:>8} {row['kernels']:>8} {row['emitted']:>8} "
              f"{np.median(row['times']):>10.2f}")


def measure(n: int, repeats: int) -> dict:
    """Compile both programs of ``n`` chains ``repeats`` times, alternated; the first repeat profiled and
    counted. Returns ``{program: {times, fusions, kernels, emitted}}``."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import fused_kernels
    from benchmarks.compile_update import compile_phases

    shapes = {"one shape": [(256, 512)] * n, "N shapes": [(256, 512 + i) for i in range(n)]}
    rows = {name: dict(times=[]) for name in shapes}
    for r in range(repeats):
        for name, shp in shapes.items():
            xs = [jnp.ones(s, jnp.float32) for s in shp]
            salt = 3.0 + r + time.time_ns() % 1_000_003 * 1e-9
            lowered = jax.jit(lambda xs, salt=salt: chains(xs, salt)).lower(xs)
            with tempfile.TemporaryDirectory(prefix="kernel_reuse_") as trace_dir:
                if r == 0:
                    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                t = time.perf_counter()
                try:
                    compiled = lowered.compile()
                finally:
                    rows[name]["times"].append(time.perf_counter() - t)
                    if r == 0:
                        jax.profiler.stop_trace()
                if r == 0:
                    phases = {phase: n for phase, _, n in compile_phases(trace_dir)}
                    rows[name]["emitted"] = phases["  of which the fusion emitters"]
                    rows[name]["fusions"], rows[name]["kernels"] = fused_kernels(compiled.as_text())
    return rows


if __name__ == "__main__":
    main()
