"""The fused distillation step: the frozen teacher's forward and the student's TD-MPC2 update in one program.

``step = make_distill_step(config, teacher.config)``; ``state = init_distill_state(config, teacher.config, key)``;
``state, metrics = step(state, teacher_params, batch, key)``. The step is the learner's update
(:func:`mtdistill_jax.tdmpc2.train.make_update_fn`) with the terms of :mod:`mtdistill_jax.distill.losses`:
the teacher's forward runs once per update (``aux_forward``), outside every gradient; its params are a jit
argument (never a constant, never donated) in whatever dtype they are stored (float32/bfloat16/float16, or int8
weight-only, dequantised inside the step) and are computed in ``config.distill.teacher_compute_dtype``. On a
mesh the batch is split over the ``data`` axis and student and teacher are replicated.

:func:`make_distill_update` is the same step as a pure ``update(state, batch, key, draws=None, aux=teacher_params)``
for the offline loop (K steps per dispatch in one compiled loop), :func:`check_compatible` says what differs
between a teacher and a student that cannot share data, and :func:`load_teacher` reads a teacher from an agent
export or an official ``.pt`` (any size the importer knows; others are refused by it, naming the shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from mtdistill_jax.checkpoint.export import AgentExport, load_agent_stored
from mtdistill_jax.configs.distill import check_config
from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.distill.losses import DISTILL_KEY, init_distill_params, make_distill_losses
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import init_params, make_world_model
from mtdistill_jax.tdmpc2.train import TrainingState, init_training_state, make_update_fn
from mtdistill_jax.types import Params
from mtdistill_jax.xla_cpu import bf16_dot_options

__all__ = ["IncompatibleTeacherError", "check_compatible", "load_teacher", "make_distill_update",
           "make_distill_step", "init_distill_state", "teacher_specs", "place_teacher", "compiler_options"]


class IncompatibleTeacherError(UserError):
    """A teacher whose task set (ids, observation/action dims, padding) is not the student's."""


def check_compatible(student: ml_collections.ConfigDict, teacher: ml_collections.ConfigDict) -> None:
    """Raise :class:`IncompatibleTeacherError` listing every difference between the task sets of two model
    configs (task names and order = ids, padded obs/action widths, per-task obs/action dims, bin layout of the
    reward/value heads when the reward KL compares bins)."""
    s, t = get_task_set(student.task_set), get_task_set(teacher.task_set)
    diffs = []
    if s.name != t.name:
        diffs.append(f"task set: student {s.name}, teacher {t.name}")
    if s.num_tasks != t.num_tasks:
        diffs.append(f"number of tasks: student {s.num_tasks}, teacher {t.num_tasks}")
    if s.obs_pad != t.obs_pad:
        diffs.append(f"padded observation width: student {s.obs_pad}, teacher {t.obs_pad}")
    if s.action_pad != t.action_pad:
        diffs.append(f"padded action width: student {s.action_pad}, teacher {t.action_pad}")
    for i, (a, b) in enumerate(zip(s.tasks, t.tasks, strict=False)):
        if a != b:
            diffs.append(f"task id {i}: student {a}, teacher {b}")
            continue
        if s.obs_dims[i] != t.obs_dims[i] or s.action_dims[i] != t.action_dims[i]:
            diffs.append(f"task {a}: obs/action dims student {s.obs_dims[i]}/{s.action_dims[i]}, "
                         f"teacher {t.obs_dims[i]}/{t.action_dims[i]}")
    if diffs:
        shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
        raise IncompatibleTeacherError("teacher and student do not share a task set: " + "; ".join(shown))


def load_teacher(path: str) -> AgentExport:
    """A teacher as stored (its storage dtype kept: the step dequantises/casts on the device): an agent export
    directory or an official TD-MPC2 ``.pt`` (read by the safe importer)."""
    return load_agent_stored(path)


def _check(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict) -> None:
    check_config(config)
    check_compatible(config.model, teacher_config)


def make_distill_update(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict, *,
                        return_intermediates: bool = False) -> Callable:
    """The pure distillation update ``update(state, batch, key, draws=None, aux=teacher_params)`` (jit or
    scan it): the learner's update with the configured teacher terms; ``return_intermediates`` as in
    :func:`~mtdistill_jax.tdmpc2.train.make_update_fn` (``inter['aux']`` holds the teacher's outputs)."""
    _check(config, teacher_config)
    student, teacher = make_world_model(config.model), make_world_model(teacher_config)
    dl = make_distill_losses(student, teacher, config)
    return make_update_fn(student, config, extra_wm_loss=dl.wm_loss, extra_pi_loss=dl.pi_loss,
                          aux_forward=dl.teacher_forward, return_intermediates=return_intermediates)


def teacher_specs(config: ml_collections.ConfigDict, teacher_params, mesh):
    """How the teacher params (as stored) sit on ``mesh``: ``None`` (replicated) or, with
    ``config.distill.teacher_sharding = 'sharded'``, :func:`~mtdistill_jax.parallel.sharded_param_specs`
    (large kernels split along their output axis over the data axis, gathered by XLA where used)."""
    if mesh is None or config.distill.teacher_sharding == "replicated":
        return None
    from mtdistill_jax.parallel import sharded_param_specs

    return sharded_param_specs(teacher_params, mesh)


def place_teacher(config: ml_collections.ConfigDict, teacher_params, mesh=None):
    """The teacher params on the device(s), in their storage dtype: replicated over ``mesh`` or sharded as
    :func:`teacher_specs` says (one copy on the default device without a mesh)."""
    if mesh is None:
        return jax.device_put(teacher_params)
    from mtdistill_jax.parallel import to_shardings

    return jax.device_put(teacher_params, to_shardings(teacher_specs(config, teacher_params, mesh), mesh))


def make_distill_step(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict, mesh=None, *,
                      donate: bool = True, teacher_params=None) -> Callable:
    """One jitted ``step(student_state, teacher_params, batch, key) -> (student_state, metrics)``.

    The student state is donated (``donate``), the teacher params never are; with ``mesh`` the batch is
    sharded over its ``data`` axis, the student replicated (XLA all-reduces the gradients) and the teacher
    replicated or, with ``config.distill.teacher_sharding = 'sharded'``, split as :func:`teacher_specs` says
    (pass ``teacher_params``, or any tree of the same structure and shapes, to lay that out).

    With ``config.distill.teacher_compute_dtype = 'bfloat16'`` on CPU the step compiles with
    :func:`mtdistill_jax.xla_cpu.bf16_dot_options` (YNNPACK's single-dot path, the CPU's bf16 units): the 19M
    teacher's bf16 forward took 5.4 instead of 11.1 ms and the fused step with the 1M student 72.2 instead of 75.0
    ms, where the float32 student update alone runs about 3 % slower under the option (a float32 teacher: 77.0
    against 75.0 ms; 2-core Xeon, ``benchmarks/distill_step.py --teacher_sizes 19 --repeats 15 --compute_dtype
    float32|bfloat16 [--dot_options ynn]``).
    """
    from mtdistill_jax.parallel import batch_specs, compile_step

    update = make_distill_update(config, teacher_config)
    t_specs = None
    if mesh is not None and config.distill.teacher_sharding == "sharded":
        if teacher_params is None:
            raise ValueError("teacher_sharding='sharded' needs teacher_params (or their shapes) to lay them out")
        t_specs = teacher_specs(config, teacher_params, mesh)

    def step(state, teacher_params, batch, key):
        return update(state, batch, key, None, teacher_params)

    return compile_step(step, mesh, in_specs=(None, t_specs, batch_specs()), donate_argnums=(0,) if donate else (),
                        compiler_options=compiler_options(config))


def compiler_options(config: ml_collections.ConfigDict) -> dict | None:
    """XLA options of a program that runs the distillation update of ``config``: for a teacher computing in bf16
    on CPU, YNNPACK's single-dot path (the CPU's bf16 units, :func:`mtdistill_jax.xla_cpu.bf16_dot_options`; see
    :func:`make_distill_step`); None otherwise. ``make_distill_step`` and ``launch/distill.py``'s training loop
    both compile with it."""
    return bf16_dot_options(config.distill.teacher_compute_dtype)


def init_distill_state(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict, key=None,
                       params: Params | None = None, target_q_params: Params | None = None) -> TrainingState:
    """A fresh student training state (official init from ``key``, or around given world-model ``params``)
    plus the distillation-only params under ``params['distill']`` when the config uses them."""
    _check(config, teacher_config)
    if params is None:
        if key is None:
            raise ValueError("init_distill_state needs a PRNG key when no params are given")
        k_model, key = jax.random.split(key)
        params = init_params(make_world_model(config.model), k_model)
    extra = init_distill_params(config.model, teacher_config, config)
    params = {**params, DISTILL_KEY: extra} if extra else dict(params)
    return init_training_state(config, params=params, target_q_params=target_q_params)
