"""Benchmark: compile time, peak memory and memory mappings of the evaluation program over many MT30 tasks.

Builds the batched evaluation program (``evaluate.program``: the MJX tasks x episodes and the planner in one
``lax.scan`` chunk) for the 1M model, compiles its reset and its step chunk from an empty cache (the persistent
compilation cache is off here) side by side as the evaluator does (``evaluate.program.compile_eval_program``;
``--serial``: one after the other), runs one chunk, and prints compile seconds, peak RSS and the process's memory
mappings. ``--noshare_physics`` traces one physics model per task (the layout before tasks of one physics
structure shared theirs), for a before/after comparison. ``--compute_dtype bfloat16`` runs the planner's model in
bf16, compiled with the XLA options the evaluator gives it (``xla_cpu.bf16_dot_options``: YNNPACK's single-dot path
on CPU) or without them (``--dot_options none``). ``--chunks N`` times N more chunks after the first (median).

Usage: ``python benchmarks/compile_eval.py [--tasks all|walker-stand,walker-walk] [--episodes 1]
[--noshare_physics] [--policy planner|prior] [--default_kernels] [--serial] [--compute_dtype float32|bfloat16]
[--dot_options library|none] [--chunks 0]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="all", help="comma-separated MT30 tasks, or 'all'")
    p.add_argument("--episodes", type=int, default=1, help="episodes (envs) per task")
    p.add_argument("--policy", choices=("planner", "prior"), default="planner")
    p.add_argument("--noshare_physics", action="store_true", help="one physics trace per task")
    p.add_argument("--serial", action="store_true",
                   help="compile the step chunk, then the reset (the evaluator compiles them side by side)")
    p.add_argument("--default_kernels", action="store_true",
                   help="XLA's default fusion emitters (more memory mappings; launch/evaluate.py uses fewer)")
    p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the planner's planner.compute_dtype")
    p.add_argument("--dot_options", choices=("library", "none"), default="library",
                   help="library: the step chunk compiled with the evaluator's options (xla_cpu.bf16_dot_options); "
                        "none: XLA_FLAGS alone")
    p.add_argument("--chunks", type=int, default=0, help="time this many more chunks after the first (median)")
    args = p.parse_args(argv)
    if args.chunks < 0:
        p.error(f"--chunks must be >= 0, got {args.chunks}")

    from mtdistill_jax.xla_cpu import bf16_dot_options, mapping_count, max_map_count, use_fewer_kernels

    fewer = False if args.default_kernels else use_fewer_kernels()  # before JAX starts, as launch/evaluate.py
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from benchmarks.common import header
    from mtdistill_jax.configs import MT30, get_config
    from mtdistill_jax.evaluate.program import compile_eval_program, make_eval_program
    from mtdistill_jax.nn import init_params
    from mtdistill_jax.tdmpc2.planner import Planner

    tasks = list(MT30.tasks) if args.tasks == "all" else args.tasks.split(",")
    config = get_config(1, "mt30")
    config.planner.compute_dtype = args.compute_dtype
    params = init_params(Planner(config).model, jax.random.key(0))
    options = bf16_dot_options(args.compute_dtype) if args.dot_options == "library" else None
    print(header(), f"| {len(tasks)} tasks x {args.episodes} episodes, {args.policy}, fewer kernels {fewer}, "
          f"share physics {not args.noshare_physics}, planner in {args.compute_dtype}, step chunk's compiler "
          f"options {options}", flush=True)
    t = time.perf_counter()
    env, init, run_chunk = make_eval_program(config, tasks, args.episodes, mode="mean", policy=args.policy,
                                             share_physics=not args.noshare_physics)
    build_s = time.perf_counter() - t
    print(f"build (MJX models, {len(env.structures)} physics structures): {build_s:.1f} s", flush=True)
    t, cpu = time.perf_counter(), time.process_time()
    init_c, run, s = compile_eval_program(init, run_chunk, params, donate=False, side_by_side=not args.serial,
                                          compiler_options=options)
    total_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    print(f"lowered both: {s['lower']:.1f} s; compiled {'one after the other' if args.serial else 'side by side'}: "
          f"reset {s['init']:.1f} s, step chunk {s['run']:.1f} s, both {s['compile']:.1f} s (wall); CPU time of "
          f"lowering and compiling {cpu_s:.1f} s ({cpu_s / total_s:.2f} cores busy on average); peak RSS "
          f"{_rss_gib():.2f} GiB", flush=True)
    carry = init_c(jax.random.key(0))
    t = time.perf_counter()
    carry, _ = run(params, carry)
    jax.block_until_ready(carry)
    chunk_s = time.perf_counter() - t
    print(f"one chunk (10 agent steps x {env.num_envs} envs): {chunk_s:.1f} s", flush=True)
    if args.chunks:
        times = []
        for _ in range(args.chunks):
            t = time.perf_counter()
            carry, _ = run(params, carry)
            jax.block_until_ready(carry)
            times.append(time.perf_counter() - t)
        print(f"{args.chunks} more chunks: median {np.median(times):.2f} s ({', '.join(f'{x:.2f}' for x in times)})",
              flush=True)
    print(f"total lower + compile {total_s:.1f} s ({total_s / 60:.1f} min); peak RSS "
          f"{_rss_gib():.2f} GiB; memory mappings {mapping_count()} (vm.max_map_count {max_map_count()})",
          flush=True)


if __name__ == "__main__":
    main()
