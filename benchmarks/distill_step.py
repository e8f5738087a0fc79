"""Benchmark: ms per distillation step (MT30, batch 256, horizon 3), a student and teachers of several sizes.

For each teacher size one row compares the fused step (``make_distill_step``: the teacher's forward and the
student's TD-MPC2 update in one program) with the unfused alternative (two dispatches: the plain student update
plus a separately jitted teacher forward on the same batch). Default distillation config
(``configs/distill.py``): reward MSE at the first step of each sub-trajectory, ``d_coef`` 0.45. Teachers and
students have random weights (``init_params`` of the model, random batches as in ``update_step.py``): the
figures are timings, the weights do not change them. Each program is compiled once (compile time printed
apart), warmed up once, then timed ``--repeats`` times (``block_until_ready`` after each call).

Usage::

    python benchmarks/distill_step.py [--student_size 1] [--teacher_sizes 1,5,19] [--batch 256] [--repeats 20]
        [--teacher_dtype float32|bfloat16|float16|int8] [--compute_dtype float32|bfloat16] [--mfu_peak_tflops F]
        [--dot_options library|ynn|none]

``--dot_options``: ``library`` (default) compiles the fused step as ``make_distill_step`` does and the teacher's
forward with the same options (XLA:CPU's YNNPACK single-dot path, the one that reaches the CPU's bf16 units, for a
teacher computing in bf16 on CPU: ``xla_cpu.bf16_dot_options``); ``ynn`` both with that path whatever the dtype,
``none`` neither.

    # per-device memory on an N-device mesh, teacher replicated vs sharded (shapes only; CPU gets N virtual devices):
    python benchmarks/distill_step.py --layout_devices 8 --teacher_sizes 19,317 --teacher_dtype bfloat16 \
        --compute_dtype bfloat16

    # GPU (H200, dense bf16 peak 989 TFLOP/s):
    python benchmarks/distill_step.py --teacher_sizes 317 --compute_dtype bfloat16 --teacher_dtype bfloat16 \\
        --mfu_peak_tflops 989

Columns:

- ``teacher``: teacher model size; ``params``: its learnable parameters; ``MiB``: its params as stored on the
  device in ``--teacher_dtype`` (int8: int8 kernels + float32 per-channel scales, other leaves float32).
- ``compile s``: compile time of the fused step.
- ``fused ms``: median (p10-p90) ms of ``step(state, teacher_params, batch, key)``, donate off.
- ``student ms``: median ms of the student's half of the unfused alternative: the same update with the same
  distillation terms, reading teacher outputs computed beforehand (``make_update_fn(..., extra_wm_loss,
  extra_pi_loss)`` with the outputs as ``aux``).
- ``teacher ms``: median ms of the jitted ``make_teacher_forward(teacher, config)(teacher_params, batch)``.
- ``sum ms``: student + teacher, the unfused alternative (two dispatches); ``fused/sum``: the ratio
  (below 1: fusing is faster).
- ``fused MiB`` / ``unfused MiB``: peak device memory of the compiled fused step / of the larger of the two
  unfused programs, from XLA's ``memory_analysis()`` (argument + output + temp bytes, minus aliased ones).
  jit drops the arguments a program never reads, so only the teacher params the configured terms use count
  (with the default reward-at-the-first-step term: task embedding, encoder and reward head; all of them still
  sit on the device, see the ``MiB`` column). ``n/a`` where the backend gives no memory analysis. The line
  above the table gives the plain student update (no teacher, no terms) for reference.
- with ``--mfu_peak_tflops``: ``GFLOP`` per fused step from the compiled executable's
  ``cost_analysis()['flops']``, achieved ``TFLOP/s`` (GFLOP / median time) and ``MFU`` = achieved / peak.
  XLA counts a loop body once (the student's H-step latent rollout is a scan), so the FLOPs are a slight
  undercount, negligible when a large teacher dominates.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "--layout_devices" in " ".join(sys.argv) and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):  # on CPU, the virtual devices must exist before jax starts (no effect on a GPU/TPU)
    n = next(a.split("=")[1] if "=" in a else sys.argv[i + 1] for i, a in enumerate(sys.argv)
             if a.startswith("--layout_devices"))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import cost_flops, header, time_jitted  # noqa: E402
from benchmarks.update_step import random_batch  # noqa: E402
from mtdistill_jax.checkpoint import transforms  # noqa: E402
from mtdistill_jax.configs import get_model_config  # noqa: E402
from mtdistill_jax.configs.distill import COMPUTE_DTYPES  # noqa: E402
from mtdistill_jax.configs.distill import get_config as get_distill_config  # noqa: E402
from mtdistill_jax.distill.losses import make_distill_losses, make_teacher_forward  # noqa: E402
from mtdistill_jax.distill.step import init_distill_state, make_distill_step  # noqa: E402
from mtdistill_jax.nn.world_model import count_params, init_params, make_world_model  # noqa: E402
from mtdistill_jax.tdmpc2.train import Learner, make_update_fn  # noqa: E402
from mtdistill_jax.xla_cpu import BF16_DOT_OPTIONS, bf16_dot_options  # noqa: E402

MIB = 2.0**20


def peak_bytes(compiled) -> int | None:
    """Argument + output + temp bytes minus aliased ones of a compiled executable; None when unavailable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without memory analysis raise various errors
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def fmt_mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MIB:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student_size", type=int, default=1)
    ap.add_argument("--teacher_sizes", default="1,5,19")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--teacher_dtype", default="float32", choices=transforms.DTYPES,
                    help="storage dtype of the teacher params on the device")
    ap.add_argument("--compute_dtype", default="float32", choices=COMPUTE_DTYPES,
                    help="dtype of the teacher's forward (config.distill.teacher_compute_dtype)")
    ap.add_argument("--dot_options", default="library", choices=("library", "ynn", "none"),
                    help="library: as make_distill_step compiles (YNNPACK single-dot for a bf16 teacher on CPU); "
                         "ynn: for every dtype; none: XLA_FLAGS alone")
    ap.add_argument("--mfu_peak_tflops", type=float, default=None,
                    help="device peak TFLOP/s: also print achieved TFLOP/s and MFU of the fused step")
    ap.add_argument("--layout_devices", type=int, default=0,
                    help="instead of timing: per-device memory of the fused step on a mesh of N devices with the "
                         "teacher replicated vs sharded (compiled from shapes only, nothing allocated)")
    args = ap.parse_args()
    if args.layout_devices:
        return layout(args)

    config = get_distill_config(args.student_size, "mt30")
    config.train.batch_size = args.batch
    config.distill.teacher_compute_dtype = args.compute_dtype
    H = config.train.horizon
    d = config.distill

    rng = np.random.default_rng(0)
    batches = [jax.device_put(random_batch(rng, args.batch, H)) for _ in range(4)]
    learner = Learner(config, donate=False)
    student_state = learner.init(jax.random.key(0))

    options = {"library": bf16_dot_options(args.compute_dtype), "ynn": BF16_DOT_OPTIONS, "none": None}[args.dot_options]
    print(header())
    print(f"student {args.student_size}M ({count_params(student_state.params):,} params), MT30, batch {args.batch}, "
          f"H {H}; distill: reward {d.reward_loss} ({d.steps} step), d_coef {d.d_coef}; teacher stored "
          f"{args.teacher_dtype}, computed {args.compute_dtype}; dot options {args.dot_options}; "
          f"{args.repeats} timed calls, "
          "random weights")

    # the student-only update does not depend on the teacher: timed once
    def student_args(i):
        return student_state, batches[i % len(batches)], jax.random.key(i)

    _, s_med, _, _, s_comp = time_jitted(learner.update_jit, student_args, args.repeats, return_compiled=True)
    s_peak = peak_bytes(s_comp)

    print(f"plain student update (no teacher): {s_med * 1e3:.2f} ms, {fmt_mib(s_peak)} MiB")
    cols = (f"{'teacher':>7} {'params':>11} {'MiB':>7} {'compile s':>9} {'fused ms':>8} {'p10-p90 ms':>15} "
            f"{'student ms':>10} {'teacher ms':>10} {'sum ms':>8} {'fused/sum':>9} {'fused MiB':>9} "
            f"{'unfused MiB':>11}")
    if args.mfu_peak_tflops:
        cols += f" {'GFLOP':>8} {'TFLOP/s':>8} {'MFU':>6}"
    print(cols)
    for size in [int(s) for s in args.teacher_sizes.split(",")]:
        teacher_config = get_model_config(size, "mt30")
        teacher = make_world_model(teacher_config)
        t_params = init_params(teacher, jax.random.key(1000 + size))
        n_teacher = count_params(t_params)
        stored = transforms.transform(jax.device_get(t_params), args.teacher_dtype)
        del t_params
        teacher_params = jax.device_put(stored)
        t_mib = transforms.tree_nbytes(stored) / MIB
        del stored

        state = init_distill_state(config, teacher_config, jax.random.key(0))
        step = make_distill_step(config, teacher_config, donate=False)
        if args.dot_options != "library":  # the step's own jit, compiled with ``options`` instead of the library's
            step = jax.jit(step.__wrapped__)

        def fused_args(i, state=state, teacher_params=teacher_params):
            return state, teacher_params, batches[i % len(batches)], jax.random.key(i)

        c, f_med, f_p10, f_p90, f_comp = time_jitted(step, fused_args, args.repeats, return_compiled=True,
                                                     compiler_options=options)
        f_peak, f_flops = peak_bytes(f_comp), cost_flops(f_comp)
        del f_comp

        forward = jax.jit(make_teacher_forward(teacher, config))

        def teacher_args(i, teacher_params=teacher_params):
            return teacher_params, batches[i % len(batches)]

        _, t_med, _, _, t_comp = time_jitted(forward, teacher_args, args.repeats, return_compiled=True,
                                             compiler_options=options)

        # the unfused alternative's student half: the same update and terms on precomputed teacher outputs
        dl = make_distill_losses(make_world_model(config.model), teacher, config)
        student_update = jax.jit(make_update_fn(make_world_model(config.model), config, extra_wm_loss=dl.wm_loss,
                                                extra_pi_loss=dl.pi_loss))
        outputs = [forward(teacher_params, b) for b in batches]

        def student_args(i, state=state, outputs=outputs):
            return state, batches[i % len(batches)], jax.random.key(i), None, outputs[i % len(batches)]

        _, st_med, _, _, st_comp = time_jitted(student_update, student_args, args.repeats, return_compiled=True)
        unfused = st_med + t_med
        u_peak = None if peak_bytes(st_comp) is None else max(peak_bytes(st_comp), peak_bytes(t_comp))

        row = (f"{size:>6}M {n_teacher:>11,} {t_mib:>7.1f} {c:>9.1f} {f_med * 1e3:>8.2f} "
               f"{f_p10 * 1e3:>7.2f}-{f_p90 * 1e3:<7.2f} {st_med * 1e3:>10.2f} {t_med * 1e3:>10.2f} "
               f"{unfused * 1e3:>8.2f} {f_med / unfused:>9.2f} {fmt_mib(f_peak):>9} {fmt_mib(u_peak):>11}")
        if args.mfu_peak_tflops:
            if f_flops is None:
                row += f" {'n/a':>8} {'n/a':>8} {'n/a':>6}"
            else:
                achieved = f_flops / f_med / 1e12
                row += f" {f_flops / 1e9:>8.2f} {achieved:>8.3f} {achieved / args.mfu_peak_tflops:>6.1%}"
        print(row, flush=True)
        del teacher_params, state, step, forward, student_update, outputs


def layout(args) -> None:
    """Per-device memory (XLA memory analysis) of the fused step on a ``--layout_devices`` mesh, teacher
    replicated vs sharded (``config.distill.teacher_sharding``), compiled from abstract shapes: no parameter is
    allocated, so a 317M teacher is measured on a laptop."""
    from mtdistill_jax.distill.step import teacher_specs
    from mtdistill_jax.parallel import batch_sharding, make_mesh, replicated, to_shardings
    from mtdistill_jax.types import Batch

    mesh = make_mesh(args.layout_devices)
    config = get_distill_config(args.student_size, "mt30")
    config.train.batch_size = args.batch
    config.distill.teacher_compute_dtype = args.compute_dtype
    H, B, rep = config.train.horizon, args.batch, replicated(mesh)

    def abstract(tree, shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                                      shardings)

    ts = get_model_config(args.student_size, "mt30")
    batch = Batch(obs=jax.ShapeDtypeStruct((H + 1, B, 24), np.float32),
                  action=jax.ShapeDtypeStruct((H, B, 6), np.float32),
                  reward=jax.ShapeDtypeStruct((H, B, 1), np.float32), task=jax.ShapeDtypeStruct((B,), np.int32))
    batch = abstract(batch, batch_sharding(mesh))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    print(header())
    print(f"student {args.student_size}M ({ts.latent_dim}-d latent), MT30, batch {B} over {args.layout_devices} "
          f"devices; teacher stored {args.teacher_dtype}, computed {args.compute_dtype}; per-device MiB from XLA's "
          "memory analysis (arguments the step reads / temporaries)")
    print(f"{'teacher':>7} {'params':>11} {'replicated arg':>14} {'temp':>8} {'sharded arg':>11} {'temp':>8}")
    for size in [int(s) for s in args.teacher_sizes.split(",")]:
        tcfg = get_model_config(size, "mt30")
        shapes = jax.eval_shape(lambda k, tcfg=tcfg: init_params(make_world_model(tcfg), k), jax.random.key(0))
        if args.teacher_dtype == "int8":  # the transform changes the tree (kernel_int8 + scales): run it on zeros
            shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), transforms.transform(
                jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes), "int8"))
        else:
            shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, args.teacher_dtype), shapes)
        state = jax.eval_shape(lambda k, tcfg=tcfg: init_distill_state(config, tcfg, k), jax.random.key(0))
        state = abstract(state, jax.tree_util.tree_map(lambda _: rep, state))
        row = f"{size:>6}M {count_params(shapes):>11,}"
        for mode in ("replicated", "sharded"):
            config.distill.teacher_sharding = mode
            specs = teacher_specs(config, shapes, mesh)
            t = abstract(shapes, to_shardings(specs if specs is not None else
                                              jax.tree_util.tree_map(lambda _: None, shapes), mesh))
            step = make_distill_step(config, tcfg, mesh, donate=False, teacher_params=shapes)
            m = step.lower(state, t, batch, key).compile().memory_analysis()
            row += f" {m.argument_size_in_bytes / MIB:>14.1f} {m.temp_size_in_bytes / MIB:>8.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
