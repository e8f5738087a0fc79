"""Benchmark: ms per MPPI plan call (official settings: 6 iterations x 512 samples x horizon 3, 24 policy
trajectories, 64 elites) for B = 1 and B = 30 environments (one MT30 task each), MT30 model size 1.

Also prints the model matmul FLOPs per call (counted from the layer widths: XLA's cost analysis counts a
loop body once) and the achieved fraction of this device's measured float32 matmul throughput.
Usage: ``python benchmarks/plan.py [--sizes 1] [--batches 1,30] [--repeats 20] [--compute_dtypes float32,bfloat16]
[--dot_options library|ynn|none] [--draws flat,nd] [--opt_levels default,1] [--layers centred,plain] [--profile 5]``.
``--compute_dtypes``: the planner's ``planner.compute_dtype`` settings to time (bfloat16: the
model's matmuls in bf16, the same FLOPs, % of the float32 peak). ``--dot_options``: ``library`` (default) compiles
each row as ``Planner.plan_jit`` does (:func:`mtdistill_jax.xla_cpu.bf16_dot_options`: XLA:CPU's YNNPACK single-dot
library path for bfloat16 on CPU, the one path that reached this CPU's AMX-BF16 units; see benchmarks/README.md),
``ynn`` with that path for every dtype (``--ynn_dot`` is the same), ``none`` with neither (XLA_FLAGS alone).
``--draws``: ``flat`` is the library's planner; ``nd`` takes its noise draws with ``jax.random.normal`` at their
shapes instead of :func:`mtdistill_jax.math.normal` (the same values, drawn as one vector): it measures what that
saves in compile.
``--opt_levels``: the program's ``xla_backend_optimization_level`` (LLVM's -O level for XLA:CPU's kernels;
``default`` leaves XLA's own, 2, or what ``XLA_FLAGS`` sets), one row each, for compile against call time.
``--layers``: ``centred`` is the library's planner (hidden layers with centred weights,
:func:`mtdistill_jax.nn.layers.centred_hidden_layers`); ``plain`` traces it with the context off (the layers as the
update runs them): the same values, what the centring saves. ``--profile N`` traces N more calls of each row with
``jax.profiler`` and prints where their time went, as ``benchmarks/update_step.py --profile`` does
(:func:`benchmarks.common.step_profile`; read the per-shape dot rates from a one-core run, ``taskset -c 0``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import header, matmul_peak_gflops, step_profile, stream_gbps, time_jitted  # noqa: E402
from benchmarks.update_step import print_profile  # noqa: E402
from mtdistill_jax import math as tdmath  # noqa: E402
from mtdistill_jax.configs import MT30, get_config  # noqa: E402
from mtdistill_jax.nn import init_params, layers  # noqa: E402
from mtdistill_jax.tdmpc2 import planner as planner_module  # noqa: E402
from mtdistill_jax.tdmpc2.planner import Planner  # noqa: E402
from mtdistill_jax.xla_cpu import BF16_DOT_OPTIONS, bf16_dot_options  # noqa: E402


def mlp_macs(dims):
    return sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def plan_flops(cfg) -> float:
    """Matmul FLOPs of one single-env MPPI call (2 x multiply-adds), official planner structure."""
    m, p = cfg.model, cfg.planner
    A, O = MT30.action_pad, MT30.obs_pad
    za = m.latent_dim + m.task_dim + A
    zt = m.latent_dim + m.task_dim
    enc = mlp_macs([O + m.task_dim] + [m.enc_dim] * max(m.num_enc_layers - 1, 1) + [m.latent_dim])
    dyn = mlp_macs([za, m.mlp_dim, m.mlp_dim, m.latent_dim])
    rew = mlp_macs([za, m.mlp_dim, m.mlp_dim, m.num_bins])
    pi = mlp_macs([zt, m.mlp_dim, m.mlp_dim, 2 * A])
    q = m.num_q * mlp_macs([za, m.mlp_dim, m.mlp_dim, m.num_bins])
    value = p.horizon * (rew + dyn) + pi + q  # per candidate sequence
    pi_trajs = p.num_pi_trajs * (p.horizon * pi + (p.horizon - 1) * dyn)
    return 2.0 * (enc + pi_trajs + p.iterations * p.num_samples * value)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1")
    ap.add_argument("--batches", default="1,30")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compute_dtypes", default="float32")
    ap.add_argument("--dot_options", choices=("library", "ynn", "none"), default="library",
                    help="library: as Planner.plan_jit (YNNPACK single-dot for bf16 on CPU); ynn: for every dtype; "
                         "none: XLA_FLAGS alone")
    ap.add_argument("--ynn_dot", action="store_true", help="the same as --dot_options=ynn")
    ap.add_argument("--draws", default="flat", help="flat (the library's), nd (jax.random.normal at each shape)")
    ap.add_argument("--profile", type=int, default=0, help="trace this many more calls per row")
    ap.add_argument("--profile_rows", type=int, default=12, help="(kind, source) rows of each profile")
    ap.add_argument("--layers", default="centred", help="centred (the library's), plain (uncentred hidden layers)")
    ap.add_argument("--opt_levels", default="default",
                    help="comma-separated: default and/or LLVM levels 0-3 (xla_backend_optimization_level)")
    args = ap.parse_args()
    if args.profile < 0 or args.repeats < 1:
        ap.error("--profile must be >= 0 and --repeats >= 1")
    draws = args.draws.split(",")
    if not draws or set(draws) - {"flat", "nd"}:
        ap.error(f"--draws: flat and/or nd, got {args.draws!r}")
    layer_modes = args.layers.split(",")
    if not layer_modes or set(layer_modes) - {"centred", "plain"}:
        ap.error(f"--layers: centred and/or plain, got {args.layers!r}")
    levels = args.opt_levels.split(",")
    if not levels or set(levels) - {"default", "0", "1", "2", "3"}:
        ap.error(f"--opt_levels: default and/or 0-3, got {args.opt_levels!r}")
    normal, centred = tdmath.normal, planner_module.centred_hidden_layers
    print(header())
    peak = matmul_peak_gflops()
    print(f"measured float32 matmul throughput (2048^3): {peak:.1f} GFLOP/s")
    print(f"{'size':>5} {'dtype':>8} {'draws':>5} {'layers':>7} {'-O':>7} {'B':>3} {'compile s':>9} {'median ms':>9} "
          f"{'p10-p90 ms':>15} {'GFLOP/call':>10} {'GFLOP/s':>8} {'of peak':>7}")
    dots = "ynn" if args.ynn_dot else args.dot_options
    for size, dtype, draw, layer_mode, level in [(int(s), d, r, c, o) for s in args.sizes.split(",")
                                                 for d in args.compute_dtypes.split(",") for r in draws
                                                 for c in layer_modes for o in levels]:
        dot_options = {"library": bf16_dot_options(dtype) or {}, "ynn": BF16_DOT_OPTIONS, "none": {}}[dots]
        options = {**dot_options,
                   **({} if level == "default" else {"xla_backend_optimization_level": int(level)})} or None
        tdmath.normal = normal if draw == "flat" else jax.random.normal  # read while the planner is traced
        planner_module.centred_hidden_layers = (centred if layer_mode == "centred"
                                                else functools.partial(layers.centred_hidden_layers, False))
        cfg = get_config(size, "mt30")
        cfg.planner.compute_dtype = dtype
        planner = Planner(cfg)
        params = init_params(planner.model, jax.random.key(0))
        for B in [int(b) for b in args.batches.split(",")]:
            rng = np.random.default_rng(0)
            obs = jnp.asarray(rng.normal(size=(B, MT30.obs_pad)).astype(np.float32))
            task = jnp.arange(B, dtype=jnp.int32) % MT30.num_tasks
            prev = planner.init(B).prev_mean
            t0 = jnp.zeros((B,), bool)

            def args_fn(i, params=params, obs=obs, task=task, prev=prev, t0=t0):
                return params, obs, task, prev, t0, jax.random.key(i)

            fn = jax.jit(planner.plan)
            c, med, p10, p90, compiled = time_jitted(fn, args_fn, args.repeats, compiler_options=options,
                                                     return_compiled=True)
            gflop = B * plan_flops(cfg) / 1e9
            print(f"{size:>4}M {dtype:>8} {draw:>5} {layer_mode:>7} {level:>7} {B:>3} {c:>9.1f} {med * 1e3:>9.1f} "
                  f"{p10 * 1e3:>7.1f}-{p90 * 1e3:<7.1f} {gflop:>10.2f} {gflop / med:>8.1f} {gflop / med / peak:>7.0%}",
                  flush=True)
            if args.profile:
                prof = step_profile(compiled, args_fn, args.profile)
                print_profile(f"{size}M plan, B = {B}, {dtype}, {layer_mode}", prof, args.profile, args.profile_rows,
                              peak, stream_gbps())
    tdmath.normal, planner_module.centred_hidden_layers = normal, centred


if __name__ == "__main__":
    main()
