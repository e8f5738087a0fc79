"""Benchmark: ms per TD-MPC2 update (MT30, batch 256, horizon 3) for model sizes 1 and 5.

Prints compile time separately, the median (p10-p90) over >= 20 timed updates after one warm-up, the program's
temporary buffer (XLA's memory analysis) and the page faults and kernel (system) time per update: on Linux, glibc
page-faults that buffer in again at every call unless ``mtdistill_jax.xla_cpu.tune_malloc`` (run on import; off with
``MTDISTILL_MALLOC_TUNING=0``) keeps it mapped; on more than one CPU a buffer above 64 MB (the 5M update's) still is
(the module's docstring says why).
``--profile N`` then traces N more updates with ``jax.profiler`` and prints where their time went
(:func:`benchmarks.common.step_profile`): per kind (the matmul library's dots, XLA's fusions, copies, ...), per
thread, and the largest (kind, source) pairs, the source being the network and pass a kernel comes from; then the
dots' time by kind of product (:func:`benchmarks.common.dot_groups`: full matmuls, narrow products, matrix-vector
products, a matrix with itself), the rate the dots reached per operand shape against the float32 matmul peak, and the
bandwidth the fusions reached against
an elementwise kernel's, both measured in the same process (on one core, ``taskset -c 0``, where the traced events
cover each kernel's work).
``--task_emb_policy_grad release,head``: one row per setting of ``train.task_emb_policy_grad`` (``release``, the
default: the policy gradient stops at the task embedding; ``head``, the official HEAD code's, which
``benchmarks/compare_official.py`` runs).
``--narrow_grads kept,folded``: one row per form of a narrowing layer's weight gradient (``kept``, the default:
``g^T x`` kept in ``[out, in]`` order; ``folded``: XLA's ``x^T g``; ``mtdistill_jax.nn.layers.kernel_grad_kept_out_in``
says which layers and why); list a setting twice, e.g. ``kept,folded,kept,folded``, to see the machine's drift.
Usage: ``python benchmarks/update_step.py [--sizes 1,5] [--batch 256] [--repeats 20] [--profile 5]
[--task_emb_policy_grad release] [--narrow_grads kept]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import header, matmul_peak_gflops, step_profile, stream_gbps, time_jitted  # noqa: E402
from mtdistill_jax.configs import MT30, get_config  # noqa: E402
from mtdistill_jax.nn import count_params  # noqa: E402
from mtdistill_jax.nn.layers import narrow_kernel_grads_kept  # noqa: E402
from mtdistill_jax.tdmpc2.train import Learner  # noqa: E402
from mtdistill_jax.types import Batch  # noqa: E402
from mtdistill_jax.xla_cpu import usable_cpus  # noqa: E402


def random_batch(rng, B, H):
    task = rng.integers(0, MT30.num_tasks, B)
    obs = rng.normal(size=(H + 1, B, MT30.obs_pad)).astype(np.float32)
    act = rng.uniform(-1, 1, (H, B, MT30.action_pad)).astype(np.float32)
    for b, t in enumerate(task):
        obs[:, b, MT30.obs_dims[t]:] = 0
        act[:, b, MT30.action_dims[t]:] = 0
    rew = rng.uniform(0, 1, (H, B, 1)).astype(np.float32)
    return Batch(obs=obs, action=act, reward=rew, task=task.astype(np.int32))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,5")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--profile", type=int, default=0, help="trace this many more updates and print where they went")
    ap.add_argument("--profile_rows", type=int, default=12, help="(kind, source) rows of each profile")
    ap.add_argument("--task_emb_policy_grad", default="release", help="comma-separated: release and/or head")
    ap.add_argument("--narrow_grads", default="kept",
                    help="comma-separated: kept and/or folded (a narrowing layer's weight-gradient form)")
    args = ap.parse_args(argv)
    if args.profile < 0 or args.repeats < 1:
        ap.error("--profile must be >= 0 and --repeats >= 1")
    grads = args.task_emb_policy_grad.split(",")
    if not grads or set(grads) - {"release", "head"}:
        ap.error(f"--task_emb_policy_grad: release and/or head, got {args.task_emb_policy_grad!r}")
    narrows = args.narrow_grads.split(",")
    if set(narrows) - {"kept", "folded"}:
        ap.error(f"--narrow_grads: kept and/or folded, got {args.narrow_grads!r}")
    print(header())
    print(f"{'size':>5} {'params':>11} {'batch':>5} {'H':>2} {'emb grad':>8} {'narrow':>6} {'compile s':>9} "
          f"{'median ms':>9} {'p10-p90 ms':>15} {'temp MB':>7} {'faults/update':>13} {'sys ms/update':>13}")
    for size, grad, narrow in [(int(s), g, n) for s in args.sizes.split(",") for g in grads for n in narrows]:
        cfg = get_config(size, "mt30")
        cfg.train.batch_size = args.batch
        cfg.train.task_emb_policy_grad = grad
        learner = Learner(cfg, donate=False)
        state = learner.init(jax.random.key(0))
        H = cfg.train.horizon
        rng = np.random.default_rng(0)
        batches = [jax.device_put(random_batch(rng, args.batch, H)) for _ in range(4)]

        def args_fn(i, state=state, batches=batches):
            return state, batches[i % len(batches)], jax.random.key(i)

        with narrow_kernel_grads_kept(narrow == "kept"):  # a trace-time choice: it binds while compiling
            c, med, p10, p90, compiled = time_jitted(learner.update_jit, args_fn, args.repeats, return_compiled=True)
        calls = 5
        before = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(calls):
            jax.block_until_ready(compiled(*args_fn(i)))
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults = (after.ru_minflt - before.ru_minflt) / calls
        sys_ms = (after.ru_stime - before.ru_stime) / calls * 1e3
        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
        n = count_params(state.params)
        print(f"{size:>4}M {n:>11,} {args.batch:>5} {H:>2} {grad:>8} {narrow:>6} {c:>9.1f} {med * 1e3:>9.1f} "
              f"{p10 * 1e3:>7.1f}-{p90 * 1e3:<7.1f} {temp_mb:>7.1f} {faults:>13,.0f} {sys_ms:>13.1f}")
        if args.profile:
            prof = step_profile(compiled, args_fn, args.profile)
            print_profile(f"{size}M update ({grad}, {narrow})", prof, args.profile, args.profile_rows,
                          matmul_peak_gflops(), stream_gbps())


def print_profile(what: str, prof: dict, steps: int, rows: int, peak_gflops: float | None = None,
                  stream: float | None = None) -> None:
    """Print a :func:`benchmarks.common.step_profile` result (ms per call), the rate its dots reached (against
    ``peak_gflops``, the square-matmul peak measured in the same run, where given) and the bandwidth its fusions
    reached (against ``stream``, :func:`benchmarks.common.stream_gbps` measured in the same run)."""
    kinds = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in prof["by_kind"].items() if k != "while")
    busiest = max(prof["threads"].values(), default=0.0)
    threads = " / ".join(f"{v * 1e3:.1f}" for v in prof["threads"].values() if v >= 0.01 * busiest)
    print(f"  profile of {what}, {steps} calls traced, {prof['wall'] * 1e3:.1f} ms per call: {kinds} ms "
          f"(loop instructions apart); busy per thread {threads} ms")
    for (kind, source), sec in list(prof["by_source"].items())[:rows]:
        print(f"    {sec * 1e3:8.2f} ms  {kind:<12} {source}")
    dot_s = sum(sec for sec, _ in prof["by_dot_shape"].values())
    if dot_s > 0:
        peak = f"; matmul peak here {peak_gflops:.1f} GFLOP/s" if peak_gflops else ""
        print(f"  dots: {prof['dot_flops'] / 1e9:.2f} GFLOP per call in {dot_s * 1e3:.1f} ms of dot time = "
              f"{prof['dot_flops'] / dot_s / 1e9:.1f} GFLOP/s{peak}; slowest operand shapes:")
        groups = ", ".join(f"{group} {sec * 1e3:.1f} ms ({flops / 1e9:.3f} GFLOP)"
                           for group, (sec, flops) in prof["by_dot_group"].items())
        print(f"  dot time by kind of product: {groups}")
        cores = usable_cpus()
        if cores > 1:
            print("    (more than one core: a dot's traced event does not cover the work XLA:CPU's thread pool does "
                  "for it, so these rates overstate, up to 3x the peak; read them from a one-core run, "
                  "`taskset -c 0`)")
        for shape, (sec, flops) in [kv for kv in prof["by_dot_shape"].items() if kv[1][0] > 0][:rows]:
            rate = flops / sec / 1e9
            share = f" ({rate / peak_gflops:4.0%} of peak)" if peak_gflops else ""
            print(f"    {sec * 1e3:8.2f} ms  {flops / 1e9:6.3f} GFLOP  {rate:6.1f} GFLOP/s{share}  {shape}")
    if prof["fusion_time"] > 0:
        here = f"; a 3 MB elementwise kernel here moves {stream:.1f} GB/s" if stream else ""
        print(f"  fusions: {prof['fusion_bytes'] / 1e9:.2f} GB read + written per call in "
              f"{prof['fusion_time'] * 1e3:.1f} ms = {prof['fusion_bytes'] / prof['fusion_time'] / 1e9:.1f} GB/s{here}")
        n_split, n_all = prof["split_fusions"]
        if n_split:
            print(f"  fusions split across threads by XLA: {n_split} of {n_all}, "
                  f"{prof['split_fusion_time'] * 1e3:.1f} of the {prof['fusion_time'] * 1e3:.1f} ms")

if __name__ == "__main__":
    main()
