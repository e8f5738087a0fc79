"""Offline distillation of a frozen TD-MPC2 teacher into a student, checkpointed and resumable.

``mtdistill-distill`` (console entry point) and ``python launch/distill.py`` run this module.

  mtdistill-distill --teacher=TEACHER --data=chunk_0.pt,chunk_1.pt --workdir=runs/distill_1m \
      [--config=mtdistill_jax/configs/distill.py] [--config.distill.d_coef=0.45] [--config.model_size=1] \
      [--config.steps=1000000] [--config.distill.teacher_compute_dtype=bfloat16] [--save_every=10000] \
      [--eval_every=50000 [--eval_tasks=walker-walk,cup-catch] [--eval_episodes=2]] [--to_torch=student.pt]

TEACHER is an agent export directory (any storage dtype: float32/bfloat16/float16/int8) or an official TD-MPC2
``.pt`` (read by the safe importer; its size and task set are inferred, a file that fits no official size is
refused naming its shapes). The teacher stays in its storage dtype on the device and runs in
``--config.distill.teacher_compute_dtype``; its params are an argument of the compiled step, never changed.

Each update is the student's TD-MPC2 update plus the distillation terms of ``--config.distill``
(``mtdistill_jax/configs/distill.py``; default: the paper's reward MSE at the first step, d_coef 0.45), with
the teacher's forward in the same program; up to ``--config.train.steps_per_dispatch`` updates run per
dispatch. ``--config.model_size`` picks the student (1/5/19/48/317; default 1). With several devices the
batch is split over all of them; the teacher is replicated, or split with
``--config.distill.teacher_sharding=sharded``.

Outputs in --workdir are those of ``launch/train.py``: checkpoints (student state, distillation-only params
such as the latent projection, PRNG key, data cursor), ``metrics.csv`` and ``tb/`` (``train/...``,
``distill/...``, ``eval/...``, ``perf/...``), ``config.json``, and at the end ``agent/`` (the student as an
agent export: world model only) plus ``--to_torch``. Run the same command again to resume (bit-exact on CPU).
A missing file, a teacher whose task set differs from the student's (each difference named), data of another
task set, NaN/inf in the data or a loss that turns NaN/inf stop it with one ``error: ...`` line (exit 2:
command line, 1: inputs); a NaN loss keeps the last good checkpoint. MTDISTILL_TRACEBACK=1 adds the traceback.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from mtdistill_jax import cli, configs
from mtdistill_jax.configs import distill as distill_config
from mtdistill_jax.launch import common

_CONFIG = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "distill.py")
cli.define_config_file("config", _CONFIG, "distillation config (get_config())", lock_config=True)
flags.DEFINE_string("teacher", None, "teacher: an agent export directory or an official TD-MPC2 .pt", required=True)
common.define_flags()
FLAGS = common.FLAGS


def main(argv):
    cli.start_main(argv)
    try:
        config = distill_config.resolve(FLAGS.config)
    except cli.UserError as e:
        raise cli.UsageError(f"--config: {e}") from e
    options = common.options_from_flags(config, check=distill_config.check_config)

    common.run(config, options, **run_kwargs(config, FLAGS.teacher))


def run_kwargs(config, teacher_path: str) -> dict:
    """What :func:`mtdistill_jax.launch.common.run` takes for distilling the teacher at ``teacher_path`` (agent
    export or official ``.pt``) into the student of ``config`` (a resolved distillation config): ``update_fn``,
    ``init_state``, ``aux`` (the teacher's params), ``aux_specs``, ``program`` and ``compiler_options`` (a bf16
    teacher's on CPU: :func:`mtdistill_jax.distill.step.compiler_options`). A teacher of another task set is
    refused (each difference named)."""
    from mtdistill_jax import distill

    teacher = distill.load_teacher(teacher_path)
    distill.check_compatible(config.model, teacher.config)
    logging.info("teacher: %dM %s (%s, stored %s, computed %s) from %s", teacher.config.model_size,
                 teacher.config.task_set, f"{teacher.param_count:,} params", teacher.dtype,
                 config.distill.teacher_compute_dtype, teacher_path)
    logging.info("student: %dM %s; distillation: %s", config.model.model_size, config.model.task_set,
                 ", ".join(f"{k}={v}" for k, v in sorted(config.distill.items())))

    def init_state(key):
        return distill.init_distill_state(config, teacher.config, key)

    def teacher_layout(mesh):
        return distill.teacher_specs(config, teacher.params, mesh)

    return dict(update_fn=distill.make_distill_update(config, teacher.config), init_state=init_state,
                aux=teacher.params, aux_specs=teacher_layout,
                program=f"mtdistill-distill (teacher {os.path.abspath(teacher_path)})",
                compiler_options=distill.step_compiler_options(config))


def entry_point() -> None:
    """Console entry point ``mtdistill-distill`` (and ``python launch/distill.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
