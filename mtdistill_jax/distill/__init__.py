"""Teacher-student distillation: the fused step (step.py) and its terms and d_coef schedules (losses.py)."""

from mtdistill_jax.distill.losses import (
    DISTILL_KEY,
    DistillLosses,
    TeacherOutputs,
    d_coef_schedule,
    make_distill_losses,
    make_teacher_forward,
)
from mtdistill_jax.distill.step import (
    IncompatibleTeacherError,
    check_compatible,
    init_distill_state,
    load_teacher,
    make_distill_step,
    make_distill_update,
    place_teacher,
    teacher_specs,
)
from mtdistill_jax.distill.step import compiler_options as step_compiler_options

__all__ = ["DISTILL_KEY", "DistillLosses", "TeacherOutputs", "d_coef_schedule", "make_distill_losses",
           "make_teacher_forward", "IncompatibleTeacherError", "check_compatible", "init_distill_state",
           "load_teacher", "make_distill_step", "make_distill_update", "place_teacher", "teacher_specs",
           "step_compiler_options"]
