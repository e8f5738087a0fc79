"""Benchmark: the TD-MPC2 update's first-call (compile) time against its step time, for levers that trade them.

In one process, with the persistent compilation cache off (every compile cold), each variant is traced and lowered
(timed), compiled (timed; its fusions counted), then the variants' steps are timed interleaved, call after call,
so that all see the same machine state:

- ``tree``: the library's update (``mtdistill_jax.tdmpc2.train.make_optimizers``: world-model Adam with the
  encoder's learning rate scaled, policy Adam, each after a global-norm clip), optimiser state per parameter leaf.
- ``flat``: the same arithmetic with each optimiser's Adam moments in one vector (``optax.flatten``; the encoder's
  learning-rate scale applied after Adam, per leaf). Not a library option: it would change the optimiser state's
  layout in checkpoints, so this script swaps it in to measure what it would gain.
- ``no_tree_reduction``: the library's update compiled without XLA's tree-reduction rewrite (which turns a
  reduction over more than 32 elements into a 32-wide reduce-window and a reduce: vectorised and more accurate).
- ``opt1``: the library's update compiled at ``xla_backend_optimization_level=1`` (LLVM -O1 instead of -O2).
- ``opt0``: the same at ``xla_backend_optimization_level=0`` (LLVM -O0).
- ``vector512``: the library's update compiled with ``xla_cpu_prefer_vector_width=512`` (XLA:CPU's kernels in
  512-bit vectors on AVX-512 CPUs; 256 by default).
- ``ln_reduction``: the library's update with every CPU matmul-for-a-sum change off: LayerNorm's row means and
  the parameter gradients' column sums as reductions, as before they became matrix products on CPU
  (``MTDISTILL_XLA_CPU_TUNING=0`` while it is traced; ``mtdistill_jax.nn.layers.row_means_by_matmul``).
- ``sum_reduction``: the library's update with the bias and LayerNorm-parameter gradients' sums over rows as
  reductions (``mtdistill_jax.nn.layers.column_sums_by_matmul`` patched off), not products with ones.
- ``ln_autodiff``: the library's update with LayerNorm's normalisation differentiated by JAX's autodiff of its
  matmul-mean forward instead of the closed-form backward (``mtdistill_jax.nn.layers.normalize_rows``);
  ``ln_autodiff_sum_reduction``: both of the last two.
- ``nd_random``: the library's update with its policy-noise draws (``[H, B, A]`` and ``[H+1, B, A]``) taken by
  ``jax.random.normal`` at their shapes, as before :func:`mtdistill_jax.math.normal` drew them as one vector and
  reshaped them (the same values; a shorter compile).
- ``concat_norm``: the library's update with each optimiser's global gradient norm taken as one dot product of
  all gradients concatenated into a vector (which XLA rewrites into one reduction of that vector) instead of
  ``nn.layers.squared_norm``'s Gram product per leaf.
- ``no_emitters``: the library's update compiled with ``xla_cpu_use_fusion_emitters=False`` (XLA:CPU's legacy
  loop emitter instead of the MLIR fusion emitters); ``no_emitters_opt1`` / ``no_emitters_opt0``: the same at
  LLVM -O1 / -O0.

'fusions' counts the compiled program's fusion instructions, 'kernels' the distinct ones among them
(:func:`benchmarks.common.fused_kernels`): XLA:CPU compiles identical fusions once, so the compile follows the
kernels. ``--phases`` traces each compile with ``jax.profiler`` and prints where it went (XLA's HLO passes, the
fusion emitters' MLIR, LLVM's code generation), summed over the trace's events by name. ``--by_source`` prints
each variant's kernels grouped by the module and pass they come from
(:func:`benchmarks.common.kernels_by_source`). ``--cache_dir=DIR`` turns JAX's persistent compilation cache on in
``DIR`` instead of off: a second run with the same ``DIR`` times warm compiles.

Usage: ``python benchmarks/compile_update.py [--size 1] [--variants tree,flat,no_tree_reduction,opt1,...]
[--repeats 15] [--phases] [--by_source] [--cache_dir DIR]`` (``--variants``: any of the above, comma-separated);
``taskset -c 0 python benchmarks/compile_update.py`` for one core.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

class Variant(NamedTuple):
    """How a variant's update is built and compiled (the library's own with every default)."""

    flat: bool = False  # optimiser state in one vector (flat_optimizers)
    options: dict | None = None  # XLA compiler options
    ln_matmul: bool = True  # every CPU matmul-for-a-sum change on (MTDISTILL_XLA_CPU_TUNING unset while traced)
    sum_matmul: bool = True  # layers.column_sums_by_matmul as the library has it
    ln_closed_form: bool = True  # layers.normalize_rows with its closed-form backward
    flat_random: bool = True  # tdmath.normal as the library has it (False: jax.random.normal at the draw's shape)
    concat_norm: bool = False  # train.global_norm over the gradients concatenated (concatenated_global_norm)


NO_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
VARIANTS = {"tree": Variant(), "flat": Variant(flat=True),
            "no_tree_reduction": Variant(options={"xla_disable_hlo_passes": "tree_reduction_rewriter"}),
            "opt1": Variant(options={"xla_backend_optimization_level": 1}),
            "vector512": Variant(options={"xla_cpu_prefer_vector_width": 512}),
            "opt0": Variant(options={"xla_backend_optimization_level": 0}),
            "ln_reduction": Variant(ln_matmul=False),
            "no_emitters": Variant(options=NO_EMITTERS),
            "no_emitters_opt1": Variant(options={**NO_EMITTERS, "xla_backend_optimization_level": 1}),
            "no_emitters_opt0": Variant(options={**NO_EMITTERS, "xla_backend_optimization_level": 0}),
            "sum_reduction": Variant(sum_matmul=False),
            "ln_autodiff": Variant(ln_closed_form=False),
            "ln_autodiff_sum_reduction": Variant(sum_matmul=False, ln_closed_form=False),
            "nd_random": Variant(flat_random=False),
            "concat_norm": Variant(concat_norm=True)}


def no_column_sums_by_matmul(g) -> bool:
    """``layers.column_sums_by_matmul`` for the ``sum_reduction`` variant: every sum a reduction."""
    return False


def normalize_rows_by_autodiff(x, eps):
    """``layers.normalize_rows`` for the ``ln_autodiff`` variants: its forward (row means by matmul) with
    JAX's autodiff instead of the closed-form backward."""
    from mtdistill_jax.nn.layers import _normalize_rows_fwd

    return _normalize_rows_fwd(x, eps)[0]


def concatenated_global_norm(tree):
    """``train.global_norm`` for the ``concat_norm`` variant: the leaves raveled and concatenated into one vector,
    its norm the square root of its dot product with itself."""
    import jax
    import jax.numpy as jnp

    v = jnp.concatenate([x.reshape(-1) for x in jax.tree_util.tree_leaves(tree)])
    return jnp.sqrt(jax.lax.dot_general(v, v, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST))


def flat_optimizers(config):
    """``make_optimizers`` with each optimiser's state in one vector (see the module docstring)."""
    import optax

    from mtdistill_jax.tdmpc2.train import clip_by_global_norm, encoder_labels

    tc = config.train
    wm = optax.chain(
        optax.flatten(optax.chain(clip_by_global_norm(tc.grad_clip_norm), optax.scale_by_adam(eps=tc.adam_eps))),
        optax.multi_transform({"encoder": optax.scale_by_learning_rate(tc.lr * tc.enc_lr_scale),
                               "rest": optax.scale_by_learning_rate(tc.lr)}, encoder_labels),
    )
    pi = optax.flatten(optax.chain(clip_by_global_norm(tc.grad_clip_norm),
                                   optax.adam(tc.lr, eps=tc.pi_adam_eps)))
    return wm, pi


# Compile phases of XLA:CPU, as the native events of a jax.profiler trace name them (prefixes; jax 0.10.2).
PHASES = (("HLO passes", "HLO passes"), ("kernels emitted (thunks, fusion emitters' MLIR)", "ThunkEmitter"),
          ("  of which the fusion emitters", "FusionCompiler::Compile"),
          ("LLVM code generation of the kernels", "JitCompiler::Compile"))


def compile_phases(trace_dir: str) -> list[tuple[str, float, int]]:
    """Seconds and event counts of each :data:`PHASES` entry in a ``jax.profiler`` trace (perfetto JSON):
    ``(phase, seconds, events)``, summed over the events whose name starts with the phase's prefix."""
    from benchmarks.common import trace_events

    total, count = collections.Counter(), collections.Counter()
    for e in trace_events(trace_dir):
        for phase, prefix in PHASES:
            if e["name"].startswith(prefix):
                total[phase] += e.get("dur", 0) / 1e6
                count[phase] += 1
    return [(phase, total[phase], count[phase]) for phase, _ in PHASES]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--variants", default="tree,flat,no_tree_reduction,opt1")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--phases", action="store_true", help="profile each compile and print where it went")
    ap.add_argument("--by_source", action="store_true",
                    help="print each variant's distinct kernels by where they come from (module, pass)")
    ap.add_argument("--cache_dir", default="", help="persistent compilation cache here (default: off)")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: unknown {bad}; valid: {', '.join(VARIANTS)}")
    if a.size < 1 or a.batch < 1 or a.repeats < 1:
        ap.error("--size, --batch and --repeats must be >= 1")

    import jax
    import numpy as np

    if a.cache_dir:
        jax.config.update("jax_compilation_cache_dir", a.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    from benchmarks.common import fused_kernels, header, kernels_by_source
    from benchmarks.update_step import random_batch
    from mtdistill_jax import math as tdmath
    from mtdistill_jax.configs import get_config
    from mtdistill_jax.nn import layers
    from mtdistill_jax.tdmpc2 import train
    from mtdistill_jax.xla_cpu import TUNING_ENV, usable_cpus

    column_sums_by_matmul, normalize_rows, normal = layers.column_sums_by_matmul, layers.normalize_rows, tdmath.normal
    global_norm = train.global_norm

    print(header(), f"{usable_cpus()} core(s)")
    cfg = get_config(a.size, "mt30")
    cfg.train.batch_size = a.batch
    batch = jax.device_put(random_batch(np.random.default_rng(0), a.batch, cfg.train.horizon))
    tree_optimizers, rows, lowered, tuning = train.make_optimizers, {}, {}, os.environ.get(TUNING_ENV)
    for v in variants:
        variant = VARIANTS[v]
        train.make_optimizers = flat_optimizers if variant.flat else tree_optimizers
        if not variant.ln_matmul:
            os.environ[TUNING_ENV] = "0"  # read while tracing (layers.row_means_by_matmul)
        if not variant.sum_matmul:
            layers.column_sums_by_matmul = no_column_sums_by_matmul
        if not variant.ln_closed_form:
            layers.normalize_rows = normalize_rows_by_autodiff
        if not variant.flat_random:
            tdmath.normal = jax.random.normal
        if variant.concat_norm:
            train.global_norm = concatenated_global_norm  # read when the optimiser's update is traced
        try:
            learner = train.Learner(cfg, donate=False)
            state = learner.init(jax.random.key(0))
            t = time.perf_counter()
            key = variant._replace(options=None)  # what the traced program depends on
            low = lowered[key] = lowered.get(key) or learner.update_jit.lower(state, batch, jax.random.key(1))
            lower_s = time.perf_counter() - t
        finally:
            train.make_optimizers = tree_optimizers
            layers.column_sums_by_matmul, layers.normalize_rows = column_sums_by_matmul, normalize_rows
            tdmath.normal, train.global_norm = normal, global_norm
            if tuning is None:
                os.environ.pop(TUNING_ENV, None)
            else:
                os.environ[TUNING_ENV] = tuning
        with tempfile.TemporaryDirectory(prefix="compile_update_") as trace_dir:
            if a.phases:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            t = time.perf_counter()
            try:
                compiled = low.compile(variant.options)
            finally:
                compile_s = time.perf_counter() - t
                if a.phases:
                    jax.profiler.stop_trace()
            if a.phases:
                for phase, sec, n in compile_phases(trace_dir):
                    print(f"    {v}: {sec:6.2f} s {phase} ({n} events)")
        hlo = compiled.as_text()
        fusions, kernels = fused_kernels(hlo)
        if a.by_source:
            print(f"    {v}: {kernels} kernels by source: "
                  + ", ".join(f"{src} {n}" for src, n in kernels_by_source(hlo).items()))
        rows[v] = dict(lower_s=lower_s, compile_s=compile_s, state=state, compiled=compiled, fusions=fusions,
                       kernels=kernels, times=[])
        jax.block_until_ready(compiled(state, batch, jax.random.key(1)))
        print(f"  {v}: compiled", flush=True)
    for i in range(a.repeats):
        for r in rows.values():
            t = time.perf_counter()
            jax.block_until_ready(r["compiled"](r["state"], batch, jax.random.key(i + 2)))
            r["times"].append(time.perf_counter() - t)
    caching = f"persistent cache {a.cache_dir}" if a.cache_dir else "cold compiles"
    print(f"update MT30 {a.size}M, batch {a.batch}, {caching}; steps interleaved, median of {a.repeats} "
          "(p10-p90); 'lower' is 0 where an earlier variant's lowering was reused")
    print(f"{'variant':>17} {'lower s':>8} {'compile s':>9} {'fusions':>8} {'kernels':>8} {'step ms':>8} "
          f"{'p10-p90 ms':>12}")
    for v, r in rows.items():
        ms = np.asarray(r["times"]) * 1e3
        print(f"{v:>17} {r['lower_s']:>8.1f} {r['compile_s']:>9.1f} {r['fusions']:>8} {r['kernels']:>8} "
              f"{np.median(ms):>8.1f} "
              f"{np.percentile(ms, 10):>5.0f}-{np.percentile(ms, 90):<6.0f}")


if __name__ == "__main__":
    main()
