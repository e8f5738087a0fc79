"""Distillation terms: a frozen teacher's outputs on the batch, and the losses that pull the student to them.

Notation: H horizon, B batch, S the distilled steps (S = 1 with ``distill.steps = 'first'``, S = H with
``'horizon'``), w_t = rho^t / sum_{t<S} rho^t (w = [1] for 'first'), d(step) the scheduled ``d_coef``.

Teacher (:func:`make_teacher_forward`, no gradient ever reaches it): ``zT_0 = h_T(s_0)`` and, for
'horizon', its own latent rollout with the batch's actions ``zT_{t+1} = d_T(zT_t, a_t)``; at each distilled
step its reward logits ``R_T(zT_t, a_t)``, and when asked the mean over all its Q heads of the decoded Q and its
policy's Gaussian (masked mean before tanh, masked log-std).

Terms (each weighted by its ``*_weight``, the world-model ones summed and scaled by d(step) into the
world-model objective, the policy one by d(step) into the policy objective):

- reward, ``reward_loss='mse'`` (the paper's): sum_t w_t mean_b (rhat_S,t - rhat_T,t)^2, rhat = symexp of the
  two-hot expectation (``two_hot_inv``) of the reward logits; the student's come from its own rollout
  (``R(z_t, a_t)``, ``z_0 = h(s_0)``).
- reward, ``reward_loss='kl'``: sum_t w_t mean_b T^2 KL(softmax(l_T / T) || softmax(l_S / T)) over the bins.
- Q (``q_weight``): sum_t w_t mean_b (mean_q Qhat_S,q - mean_q Qhat_T,q)^2 at (z_t, a_t), all heads of each
  model (the student's with its training-mode dropout).
- latent (``latent_weight``): sum_t w_t mean_{b,j} (P z_S,t - zT_t)_j^2 with a learned affine map
  ``P: R^{D_S} -> R^{D_T}`` in ``params['distill']['latent_proj']`` (world-model optimiser; starts as the
  rectangular identity, so a student equal to its teacher starts at zero).
- policy (``policy_weight``): sum_t w_t mean_b sum_a KL(N(mu_T, sigma_T) || N(mu_S, sigma_S)) on the
  pre-tanh Gaussians of both policies, at the teacher's latents zT_t (teacher) and the student's z_t
  (student); 'horizon' uses the H+1 latents of each rollout. Masked action dims have mean 0 and log-std 0 in
  both, so they add nothing.

:func:`d_coef_schedule` builds d(step) from optax schedules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtdistill_jax import math as tdmath
from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.configs.distill import parse_phases
from mtdistill_jax.nn.world_model import WorldModel
from mtdistill_jax.types import Batch

__all__ = ["DISTILL_KEY", "TeacherOutputs", "DistillLosses", "make_teacher_forward", "make_distill_losses",
           "init_distill_params", "d_coef_schedule", "teacher_compute_params"]

DISTILL_KEY = "distill"  # params[DISTILL_KEY]: the student's distillation-only trainable params


@flax.struct.dataclass
class TeacherOutputs:
    """The frozen teacher on one batch (S distilled steps, see the module docstring); unused parts are None.

    zs:            [S', B, D_T]  teacher latents zT_t (S' = S, or H+1 for the policy term with 'horizon')
    reward_logits: [S, B, K]     R_T(zT_t, a_t), float32
    q:             [S, B, 1]     mean over the teacher's heads of the decoded Q at (zT_t, a_t)
    pi_mean:       [S', B, A]    masked pre-tanh policy mean at zT_t
    pi_log_std:    [S', B, A]    masked policy log-std at zT_t
    """

    zs: jax.Array
    reward_logits: jax.Array
    q: jax.Array | None = None
    pi_mean: jax.Array | None = None
    pi_log_std: jax.Array | None = None


def teacher_compute_params(params, dtype: str):
    """The teacher's stored params (float32/bfloat16/float16, or int8 weight-only) as compute params in
    ``dtype`` ('float32' or 'bfloat16'); jit-safe, so a teacher stays in its storage dtype on the device and
    is dequantised inside the step."""
    return transforms.to_compute(params, dtype, xp=jnp)


def _num_steps(config: ml_collections.ConfigDict) -> int:
    return 1 if config.distill.steps == "first" else config.train.horizon


def _step_weights(config: ml_collections.ConfigDict, n: int) -> jax.Array:
    w = np.asarray([config.train.rho ** t for t in range(n)], np.float64)
    return jnp.asarray(w / w.sum(), jnp.float32)


def _policy_steps(config: ml_collections.ConfigDict) -> int:
    return 1 if config.distill.steps == "first" else config.train.horizon + 1


def make_teacher_forward(teacher: WorldModel, config: ml_collections.ConfigDict) -> Callable:
    """``teacher_forward(teacher_params, batch) -> TeacherOutputs`` (pure; ``teacher_params`` in any storage
    dtype, computed in ``config.distill.teacher_compute_dtype``; outputs in float32, gradient stopped)."""
    d, tmc = config.distill, teacher.config
    S = _num_steps(config)
    rollout_len = max(S, _policy_steps(config) if d.policy_weight > 0 else 1)
    cdt = jnp.bfloat16 if d.teacher_compute_dtype == "bfloat16" else jnp.float32

    def apply(params, *args, method):
        return teacher.apply({"params": params}, *args, method=method)

    def teacher_forward(teacher_params, batch: Batch) -> TeacherOutputs:
        params = teacher_compute_params(teacher_params, d.teacher_compute_dtype)
        task = batch.task
        obs0, actions = batch.obs[0].astype(cdt), batch.action.astype(cdt)
        z = apply(params, obs0, task, method=WorldModel.encode)
        zs = [z]
        for t in range(rollout_len - 1):
            z = apply(params, z, actions[t], task, method=WorldModel.next)
            zs.append(z)
        zs = jnp.stack(zs)  # [rollout_len, B, D_T]
        r_logits = apply(params, zs[:S], actions[:S], task, method=WorldModel.reward).astype(jnp.float32)
        q = pi_mean = pi_log_std = None
        if d.q_weight > 0:
            logits = apply(params, zs[:S], actions[:S], task, method=WorldModel.Q).astype(jnp.float32)
            q = jnp.mean(tdmath.two_hot_inv(logits, tmc.num_bins, tmc.vmin, tmc.vmax), axis=0)
        if d.policy_weight > 0:
            P = _policy_steps(config)
            _, info = apply(params, zs[:P], task, jnp.zeros(zs[:P].shape[:-1] + actions.shape[-1:], cdt),
                            method=WorldModel.pi)
            pi_mean, pi_log_std = info["mean_presquash"].astype(jnp.float32), info["log_std"].astype(jnp.float32)
        out = TeacherOutputs(zs=zs.astype(jnp.float32), reward_logits=r_logits, q=q, pi_mean=pi_mean,
                             pi_log_std=pi_log_std)
        return jax.lax.stop_gradient(out)

    return teacher_forward


def init_distill_params(student_config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict,
                        config: ml_collections.ConfigDict) -> dict:
    """The student's distillation-only params (``{}`` unless latent distillation is on): the projection
    ``latent_proj`` = {kernel [D_S, D_T] (rectangular identity), bias [D_T] (0)}."""
    if config.distill.latent_weight <= 0:
        return {}
    ds, dt = student_config.latent_dim, teacher_config.latent_dim
    return {"latent_proj": {"kernel": jnp.eye(ds, dt, dtype=jnp.float32), "bias": jnp.zeros((dt,), jnp.float32)}}


def _phases_schedule(spec: str, steps: int) -> optax.Schedule:
    phases = parse_phases(spec)
    boundaries = [int(round(start * steps)) for start, _ in phases[1:]]
    return optax.join_schedules([optax.constant_schedule(v) for _, v in phases], boundaries)


def d_coef_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """d(step) for ``config.distill`` (N = ``schedule_steps`` or ``config.steps``, c = ``d_coef``):

    - ``constant``: c.
    - ``linear``: c for ``schedule_begin`` steps, then linearly to ``d_coef_end`` over N steps, then held.
    - ``cosine``: c for ``schedule_begin`` steps, then cosine decay to ``cosine_alpha * c`` over N steps.
    - ``increase``: c * min(1, step / N) (td-mpc-opt ``increase``).
    - ``decrease``: c * max(0, 1 - step / N) (td-mpc-opt ``decrease``).
    - ``phases``: piecewise constant, ``phases = 'f_0:v_0,f_1:v_1,...'``: v_i from step f_i * N (td-mpc-opt's
      ``four_phase`` is the default string: 0.5, 0.5, 0.75, 0 at 0, N/4, N/2, 3N/4); ``d_coef`` is not used.
    """
    d = config.distill
    n = d.schedule_steps or config.steps
    c = float(d.d_coef)
    if d.schedule == "constant":
        return optax.constant_schedule(c)
    if d.schedule == "linear":
        return optax.linear_schedule(c, float(d.d_coef_end), n, transition_begin=d.schedule_begin)
    if d.schedule == "cosine":
        decay = optax.cosine_decay_schedule(c, n, alpha=float(d.cosine_alpha))
        return optax.join_schedules([optax.constant_schedule(c), decay], [d.schedule_begin])
    if d.schedule == "increase":
        return optax.linear_schedule(0.0, c, n)
    if d.schedule == "decrease":
        return optax.linear_schedule(c, 0.0, n)
    if d.schedule == "phases":
        return _phases_schedule(d.phases, n)
    raise ValueError(f"unknown distill.schedule {d.schedule!r}")


@dataclasses.dataclass(frozen=True)
class DistillLosses:
    """The distillation terms of one student/teacher/config (see the module docstring)."""

    teacher_forward: Callable  # (teacher_params, batch) -> TeacherOutputs
    wm_loss: Callable | None  # (rollout, batch, teacher_out, step, key, params) -> (loss, metrics); None: none
    pi_loss: Callable | None  # (rollout, pi_out, batch, teacher_out, step, key) -> (loss, metrics)
    schedule: optax.Schedule  # step -> d_coef


def _gaussian_kl(mu_p, log_std_p, mu_q, log_std_q):
    """KL(N(mu_p, e^{2 ls_p}) || N(mu_q, e^{2 ls_q})) per element."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    return log_std_q - log_std_p + (var_p + jnp.square(mu_p - mu_q)) / (2 * var_q) - 0.5


def make_distill_losses(student: WorldModel, teacher: WorldModel,
                        config: ml_collections.ConfigDict) -> DistillLosses:
    """The teacher forward, the world-model and policy distillation terms and d(step) for ``config``."""
    d, smc, tmc = config.distill, student.config, teacher.config
    S = _num_steps(config)
    w = _step_weights(config, S)
    w_pi = _step_weights(config, _policy_steps(config))
    schedule = d_coef_schedule(config)

    def weighted(per_step):  # [S'] -> scalar
        return jnp.sum(per_step * w[: per_step.shape[0]])

    def wm_loss(ro, batch, tout: TeacherOutputs, step, key, params):
        coef = schedule(step)
        total, metrics = jnp.zeros((), jnp.float32), {"distill/d_coef": jnp.asarray(coef, jnp.float32)}
        if d.reward_weight > 0:
            s_logits = ro.reward_logits[:S]
            if d.reward_loss == "mse":
                r_s = tdmath.two_hot_inv(s_logits, smc.num_bins, smc.vmin, smc.vmax)
                r_t = tdmath.two_hot_inv(tout.reward_logits, tmc.num_bins, tmc.vmin, tmc.vmax)
                term = weighted(jnp.mean(jnp.square(r_s - r_t), axis=(1, 2)))
                metrics["distill/reward_mse"] = term
            else:
                T = float(d.temperature)
                log_p_t = jax.nn.log_softmax(tout.reward_logits / T, axis=-1)
                log_p_s = jax.nn.log_softmax(s_logits / T, axis=-1)
                kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)  # [S, B]
                term = weighted(jnp.mean(kl, axis=1)) * T * T
                metrics["distill/reward_kl"] = term
            total = total + d.reward_weight * term
        if d.q_weight > 0:
            q_s = jnp.mean(tdmath.two_hot_inv(ro.q_logits[:, :S], smc.num_bins, smc.vmin, smc.vmax), axis=0)
            term = weighted(jnp.mean(jnp.square(q_s - tout.q), axis=(1, 2)))
            metrics["distill/q_mse"] = term
            total = total + d.q_weight * term
        if d.latent_weight > 0:
            proj = params[DISTILL_KEY]["latent_proj"]
            z_s = ro.zs[:S] @ proj["kernel"] + proj["bias"]
            term = weighted(jnp.mean(jnp.square(z_s - tout.zs[:S]), axis=(1, 2)))
            metrics["distill/latent_mse"] = term
            total = total + d.latent_weight * term
        metrics["distill/loss"] = total
        return coef * total, metrics

    def pi_loss(ro, pi_out, batch, tout: TeacherOutputs, step, key):
        P = _policy_steps(config)
        kl = _gaussian_kl(tout.pi_mean, tout.pi_log_std, pi_out.mean_presquash[:P], pi_out.log_std[:P])
        term = jnp.sum(jnp.mean(jnp.sum(kl, axis=-1), axis=1) * w_pi)
        return schedule(step) * d.policy_weight * term, {"distill/policy_kl": term}

    any_wm = d.reward_weight > 0 or d.q_weight > 0 or d.latent_weight > 0
    return DistillLosses(teacher_forward=make_teacher_forward(teacher, config), wm_loss=wm_loss if any_wm else None,
                         pi_loss=pi_loss if d.policy_weight > 0 else None, schedule=schedule)
