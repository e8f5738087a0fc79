"""Distillation config: the training config of the student plus ``distill`` (the teacher terms and d_coef).

``get_config()`` is what ``launch/distill.py`` uses: a 1M student on MT30 with the paper's loss (MSE between
the student's and the teacher's decoded rewards at the first step of each sub-trajectory, weight
``d_coef = 0.45``). ``--config.model_size=N`` picks the student size (:func:`resolve` rebuilds ``model`` for it,
keeping any ``--config.model.*`` override). Every option of :mod:`mtdistill_jax.distill.losses` is a field
here; :func:`check_config` rejects values no run can use, naming the field.
"""

from __future__ import annotations

import ml_collections

from mtdistill_jax.configs import train as train_config
from mtdistill_jax.configs.model_sizes import get_model_config
from mtdistill_jax.errors import UserError

SCHEDULES = ("constant", "linear", "cosine", "increase", "decrease", "phases")
STEPS = ("first", "horizon")
REWARD_LOSSES = ("mse", "kl")
COMPUTE_DTYPES = ("float32", "bfloat16")
TEACHER_SHARDINGS = ("replicated", "sharded")


def get_distill_config() -> ml_collections.ConfigDict:
    """The distillation terms, their weights and the d_coef schedule (see distill/losses.py for formulas)."""
    c = ml_collections.ConfigDict()
    c.d_coef = 0.45  # weight of the distillation terms (the released paper student's setting; sweep best 0.4)
    c.schedule = "constant"  # d_coef over steps: constant | linear | cosine | increase | decrease | phases
    c.schedule_steps = 0  # length of linear/cosine/increase/decrease/phases in steps (0: config.steps)
    c.schedule_begin = 0  # linear/cosine: steps held at d_coef before the decay starts
    c.d_coef_end = 0.0  # linear: value reached after schedule_steps (then held)
    c.cosine_alpha = 0.0  # cosine: final value as a fraction of d_coef
    c.phases = "0:0.5,0.25:0.5,0.5:0.75,0.75:0"  # phases: 'start_fraction:value,...' (td-mpc-opt four-phase)
    c.steps = "first"  # 'first': step 0 of each sub-trajectory (paper); 'horizon': all H steps, rho-weighted
    c.reward_weight = 1.0  # weight of the reward term (0 turns it off)
    c.reward_loss = "mse"  # 'mse' between decoded scalar rewards | 'kl' between the bin distributions
    c.temperature = 1.0  # KL temperature T (softmax(logits / T), loss scaled by T^2)
    c.q_weight = 0.0  # weight of Q distillation: MSE of the mean-of-heads Q at the batch's actions
    c.policy_weight = 0.0  # weight of policy distillation: KL(teacher pi || student pi), Gaussians before tanh
    c.latent_weight = 0.0  # weight of latent distillation: MSE of a learned linear map of the student latent
    c.teacher_compute_dtype = "float32"  # the teacher's forward in float32 or bfloat16 (any storage dtype)
    c.teacher_sharding = "replicated"  # on a mesh: 'replicated' teacher, or 'sharded' (large kernels split)
    c.lock()
    return c


def get_config(model_size: int = 1, task_set: str = "mt30") -> ml_collections.ConfigDict:
    """Student training config (``configs/train.py``) + ``model_size`` + ``distill``."""
    c = train_config.get_config(model_size, task_set)
    with c.unlocked():
        c.model_size = model_size  # student size (1/5/19/48/317); resolve() rebuilds `model` for it
        c.distill = get_distill_config()  # distillation terms and schedule
    c.steps = 1_000_000  # update steps (td-mpc-opt's released students: 1M steps at batch 256)
    return c


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``model`` built for ``config.model_size`` (when a command line changed it); fields of
    ``model`` that differ from their size default (``--config.model.x=...`` overrides) are kept."""
    size = int(config.model_size)
    if size == config.model.model_size:
        return config
    old_default = get_model_config(config.model.model_size, config.model.task_set)
    overrides = {k: config.model[k] for k in config.model
                 if k != "model_size" and config.model[k] != old_default[k]}
    model = get_model_config(size, overrides.pop("task_set", config.model.task_set))
    for k, v in overrides.items():
        model[k] = v
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = model
    return config


def _field(path: str, what: str, value) -> UserError:
    return UserError(f"config field {path} must be {what}, got {value!r}")


def parse_phases(spec: str) -> list[tuple[float, float]]:
    """``'0:0.5,0.25:0.5,0.5:0.75,0.75:0'`` -> ``[(0.0, 0.5), (0.25, 0.5), ...]``: start fraction and value of
    each phase; fractions start at 0, increase strictly and stay below 1."""
    try:
        phases = [tuple(float(x) for x in part.split(":")) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise _field("distill.phases", "'start:value,...' with numbers", spec) from None
    if not phases or any(len(p) != 2 for p in phases):
        raise _field("distill.phases", "'start:value,...' pairs", spec)
    starts = [p[0] for p in phases]
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)) or starts[-1] >= 1:
        raise _field("distill.phases", "start fractions 0 = s_0 < s_1 < ... < 1", spec)
    if any(v < 0 for _, v in phases):
        raise _field("distill.phases", "values >= 0", spec)
    return phases


def check_config(config: ml_collections.ConfigDict) -> None:
    """The training config's checks plus the distillation fields (raises a UserError naming the field)."""
    train_config.check_config(config)
    if config.get("model_size") is not None and config.model_size not in (1, 5, 19, 48, 317):
        raise _field("model_size", "one of 1, 5, 19, 48, 317", config.model_size)
    d = config.distill
    for name in ("d_coef", "d_coef_end", "reward_weight", "q_weight", "policy_weight", "latent_weight"):
        if not d[name] >= 0:
            raise _field(f"distill.{name}", ">= 0", d[name])
    for name, valid in (("schedule", SCHEDULES), ("steps", STEPS), ("reward_loss", REWARD_LOSSES),
                        ("teacher_compute_dtype", COMPUTE_DTYPES), ("teacher_sharding", TEACHER_SHARDINGS)):
        if d[name] not in valid:
            raise _field(f"distill.{name}", "one of " + ", ".join(valid), d[name])
    if not d.temperature > 0:
        raise _field("distill.temperature", "> 0", d.temperature)
    if not 0 <= d.cosine_alpha <= 1:
        raise _field("distill.cosine_alpha", "in [0, 1]", d.cosine_alpha)
    for name in ("schedule_steps", "schedule_begin"):
        if not (isinstance(d[name], int) and d[name] >= 0):
            raise _field(f"distill.{name}", "an int >= 0", d[name])
    if d.schedule == "phases":
        parse_phases(d.phases)


def get_smoke_config() -> ml_collections.ConfigDict:
    """A small distillation config for tests: the training smoke config's sizes, one step."""
    c = get_config(1, "mt30")
    smoke = train_config.get_smoke_config()
    c.train.batch_size = smoke.train.batch_size
    c.planner = smoke.planner
    c.steps = 1
    return c
