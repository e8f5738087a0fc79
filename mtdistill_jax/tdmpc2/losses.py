"""TD-MPC2 losses (official ``TDMPC2._update``, ``_td_target`` and ``update_pi``): one forward, small terms.

``make_losses(model, config)`` returns a :class:`Losses` of pure closures over the model and hyperparameters.
The student runs forward once per objective and every loss term reads that forward's outputs, so an extra
term (a teacher's, an auxiliary one) needs no second pass:

- ``rollout(params, batch, key) -> Rollout``: encoder, latent rollout, reward and Q logits (Q dropout: ``key``).
- ``td_target(params, target_q, next_z, reward, task, eps, heads)``: r + gamma_task * min of 2 target heads
  at (next_z, a ~ pi(next_z)).
- ``consistency_loss(rollout)``, ``reward_loss(rollout, batch)``, ``value_loss(rollout, td_targets)`` and
  their weighted sum ``world_model_loss(rollout, batch, td_targets) -> (loss, metrics)`` (TD-MPC2 eq. 3).
- ``policy_rollout(trainable, params, zs, task, eps, heads, key) -> PolicyOutputs``: pi and the Q average at
  the (frozen) latents.
- ``policy_loss(pi_out, scale) -> (loss, metrics)``: entropy-regularised, scale-normalised Q; the running
  scale ``scale`` is updated by the caller (:func:`running_scale_update`) before, as the official code does.

The random draws of an update (policy noise, Q-head choices) enter the losses as arrays (:class:`Draws`, made
by :func:`sample_draws` or given by the caller, e.g. recorded from the official code); the PRNG keys the
losses take drive dropout only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mtdistill_jax import math as tdmath
from mtdistill_jax.configs.tasks import get_task_set, task_discounts
from mtdistill_jax.nn.world_model import WorldModel, heads_to_evaluate, q_reduce, two_heads
from mtdistill_jax.types import Batch

__all__ = ["WM_KEYS", "PI_KEY", "Rollout", "PolicyOutputs", "Draws", "Losses", "make_losses", "sample_draws",
           "running_scale_percentiles", "running_scale_update"]

WM_KEYS = ("task_emb", "encoder", "dynamics", "reward_head", "Qs")  # updated by the world-model optimiser
PI_KEY = "pi_head"  # updated by the policy optimiser


def running_scale_percentiles(q0):
    """(P5, P95) of ``q0 [B, 1]`` over the batch, linear interpolation as the official ``RunningScale``."""
    lo, hi = jnp.percentile(q0[:, 0], jnp.asarray([5.0, 95.0]), method="linear")
    return lo, hi


def running_scale_update(scale, q0, tau: float):
    """Official RunningScale.update: lerp towards max(P95 - P5, 1) of ``q0 [B, 1]`` over the batch."""
    lo, hi = running_scale_percentiles(q0)
    value = jnp.maximum(hi - lo, 1.0)
    return scale + tau * (value - scale)


@flax.struct.dataclass
class Rollout:
    """One forward pass of the student over a time-major batch (H horizon, B batch, D latent, K bins, Q heads).

    z:             [B, D]        h(s_0), the encoded first observation (differentiable; ``zs[0]``)
    zs:            [H+1, B, D]   latent rollout: z_0 = h(s_0), z_{t+1} = d(z_t, a_t)
    next_z:        [H, B, D]     sg(h(s_{t+1})): consistency targets, latents of the TD target
    reward_logits: [H, B, K]     R(z_t, a_t)
    q_logits:      [Q, H, B, K]  Q_q(z_t, a_t), dropout active (train mode)
    """

    z: jax.Array
    zs: jax.Array
    next_z: jax.Array
    reward_logits: jax.Array
    q_logits: jax.Array


@flax.struct.dataclass
class PolicyOutputs:
    """The policy's forward at latents ``zs [T, B, D]`` (T = H+1 in the update), A padded action dims.

    action:         [T, B, A]  squashed sample pi(z_t, eps_t)
    mean:           [T, B, A]  tanh of the masked mean
    mean_presquash: [T, B, A]  the masked mean of the Gaussian before tanh
    log_std:        [T, B, A]  masked log-std
    entropy:        [T, B, 1]  -log pi(action)
    scaled_entropy: [T, B, 1]  the official action-dims-scaled entropy (the policy loss's bonus)
    q:              [T, B, 1]  mean of the 2 chosen online Q heads at (z_t, action), before scaling
    """

    action: jax.Array
    mean: jax.Array
    mean_presquash: jax.Array
    log_std: jax.Array
    entropy: jax.Array
    scaled_entropy: jax.Array
    q: jax.Array


@flax.struct.dataclass
class Draws:
    """The random draws of one update, as the official code makes them (raw N(0, 1) noise, before masking).

    td_eps:   [H, B, A]   policy noise of the TD target at next_z (the step's first ``randn_like``)
    td_heads: [2] int     target-Q heads of the TD-target minimum (``randperm(num_q)[:2]``)
    pi_eps:   [H+1, B, A] policy noise of the policy loss at zs (the second ``randn_like``)
    pi_heads: [2] int     online-Q heads averaged in the policy loss (the second ``randperm(num_q)[:2]``)
    """

    td_eps: jax.Array
    td_heads: jax.Array
    pi_eps: jax.Array
    pi_heads: jax.Array


def sample_draws(key, config: ml_collections.ConfigDict, batch_size: int, dtype=jnp.float32) -> Draws:
    """Fresh :class:`Draws` for one update (pure; the default of the update step).

    Both noises come from one ``[2H + 1, B, A]`` draw (the TD target's the first H steps, the policy loss's the
    rest), and ``key`` is split in 3, as the update splits its own key: XLA:CPU compiles a threefry draw's kernels
    per shape, and two noise draws of two shapes with a split in 4 compiled 13 kernels more in the 1M update
    (362 against 349) than one draw with a split that shares the update's."""
    H, A, num_q = config.train.horizon, get_task_set(config.model.task_set).action_pad, config.model.num_q
    k_eps, k_tdq, k_piq = jax.random.split(key, 3)
    eps = tdmath.normal(k_eps, (2 * H + 1, batch_size, A), dtype)
    return Draws(td_eps=eps[:H], td_heads=two_heads(k_tdq, num_q), pi_eps=eps[H:], pi_heads=two_heads(k_piq, num_q))


@dataclasses.dataclass(frozen=True)
class Losses:
    """The TD-MPC2 forward passes and loss terms of one model and config (see the module docstring)."""

    rollout: Callable  # (params, batch, key) -> Rollout
    td_target: Callable  # (params, target_q, next_z, reward, task, eps, heads) -> (td [H, B, 1], aux)
    consistency_loss: Callable  # (rollout) -> scalar
    reward_loss: Callable  # (rollout, batch) -> scalar
    value_loss: Callable  # (rollout, td_targets) -> scalar
    world_model_loss: Callable  # (rollout, batch, td_targets) -> (loss, metrics)
    policy_rollout: Callable  # (trainable, params, zs, task, eps, heads, key) -> PolicyOutputs
    policy_loss: Callable  # (pi_out, scale) -> (loss, metrics)
    discounts: jax.Array  # [num_tasks]


def make_losses(model: WorldModel, config: ml_collections.ConfigDict) -> Losses:
    """Build the TD-MPC2 forward passes and loss terms for ``model`` with ``config.train`` hyperparameters."""
    mc, tc = config.model, config.train
    discounts = jnp.asarray(task_discounts(config))
    H = tc.horizon
    rho_w = jnp.asarray([tc.rho**t for t in range(H + 1)], jnp.float32)

    def apply(params, *args, method, rngs=None):
        return model.apply({"params": params}, *args, method=method, rngs=rngs)

    def rollout(params, batch: Batch, key) -> Rollout:
        """The student's forward over ``batch``: ``next_z = sg(h(s_{1..H}))``, ``z_0 = h(s_0)``, the latent
        rollout ``z_{t+1} = d(z_t, a_t)``, and R and Q (dropout from ``key``) at ``(z_t, a_t)``, t < H."""
        task = batch.task
        next_z = jax.lax.stop_gradient(apply(params, batch.obs[1:], task, method=WorldModel.encode))
        z0 = apply(params, batch.obs[0], task, method=WorldModel.encode)

        def step(z, a):
            z = apply(params, z, a, task, method=WorldModel.next)
            return z, z

        # unrolled (H is small): no loop carries to copy in and out, and XLA fuses across steps; on one core
        # the 1M update took 128-129 ms instead of 138-148 (454 kernels instead of 464), the 5M one unchanged
        _, zs_next = jax.lax.scan(step, z0, batch.action, unroll=True)
        zs = jnp.concatenate([z0[None], zs_next], axis=0)
        _zs = zs[:-1]
        q_logits = apply(params, _zs, batch.action, task, False, method=WorldModel.Q, rngs={"dropout": key})
        r_logits = apply(params, _zs, batch.action, task, method=WorldModel.reward)
        return Rollout(z=z0, zs=zs, next_z=next_z, reward_logits=r_logits, q_logits=q_logits)

    def td_target(params, target_q, next_z, reward, task, eps, heads):
        """TD target r_t + gamma_task * min_{heads} Q_target(z_{t+1}, pi(z_{t+1}, eps)), ``[H, B, 1]``.

        Target Qs in eval mode (no dropout), as the official code keeps them. Returns ``(targets, aux)`` with
        ``aux = {td_action, td_q}``. No gradient flows through it.
        """
        params, next_z = jax.lax.stop_gradient(params), jax.lax.stop_gradient(next_z)
        action, _ = apply(params, next_z, task, eps, method=WorldModel.pi)
        logits = apply({**params, "Qs": target_q}, next_z, action, task, True, heads_to_evaluate(heads, mc.num_q),
                       method=WorldModel.Q)
        q = q_reduce(logits, mc, "min")
        return jax.lax.stop_gradient((reward + discounts[task][:, None] * q, {"td_action": action, "td_q": q}))

    def consistency_loss(ro: Rollout):
        """1/H sum_t rho^t mean ||z_{t+1} - sg(h(s_{t+1}))||^2 (TD-MPC2 eq. 3, first term)."""
        cons = jnp.mean(jnp.square(ro.zs[1:] - ro.next_z), axis=(1, 2))  # [H]
        return jnp.sum(cons * rho_w[:H]) / H

    def reward_loss(ro: Rollout, batch: Batch):
        """1/H sum_t rho^t mean_b CE(R(z_t, a_t), r_t) (two-hot soft cross-entropy)."""
        rew_ce = tdmath.soft_ce(ro.reward_logits, batch.reward, mc.num_bins, mc.vmin, mc.vmax)  # [H, B, 1]
        return jnp.sum(jnp.mean(rew_ce, axis=(1, 2)) * rho_w[:H]) / H

    def value_loss(ro: Rollout, td_targets):
        """1/(H num_q) sum_t sum_q rho^t mean_b CE(Q_q(z_t, a_t), sg(TD_t))."""
        val_ce = tdmath.soft_ce(ro.q_logits, jax.lax.stop_gradient(td_targets)[None], mc.num_bins, mc.vmin,
                                mc.vmax)  # [Q, H, B, 1]
        return jnp.sum(jnp.mean(val_ce, axis=(2, 3)) * rho_w[None, :H]) / (H * mc.num_q)

    def world_model_loss(ro: Rollout, batch: Batch, td_targets):
        """Official world-model objective (TD-MPC2 eq. 3):

        L = c_cons * consistency_loss + c_rew * reward_loss + c_val * value_loss. Returns ``(loss, metrics)``.
        """
        consistency, rew, val = consistency_loss(ro), reward_loss(ro, batch), value_loss(ro, td_targets)
        total = tc.consistency_coef * consistency + tc.reward_coef * rew + tc.value_coef * val
        metrics = {
            "train/consistency_loss": consistency,
            "train/reward_loss": rew,
            "train/value_loss": val,
            "train/total_loss": total,
        }
        return total, metrics

    def policy_rollout(trainable, params, zs, task, eps, heads, key) -> PolicyOutputs:
        """pi(z_t, eps_t) and the average of the online Q heads ``heads`` at it, dropout active (``key``) as in
        the official train mode.

        ``trainable`` holds the sub-trees that receive the gradient (``{'pi_head': ...}``, plus ``'task_emb'``
        for the official HEAD behaviour); everything else in ``params`` (Q weights, ...) and the latents ``zs``
        are frozen.
        """
        full = {**jax.lax.stop_gradient(params), **trainable}
        zs = jax.lax.stop_gradient(zs)
        action, info = apply(full, zs, task, eps, method=WorldModel.pi)
        logits = apply(full, zs, action, task, False, heads_to_evaluate(heads, mc.num_q), method=WorldModel.Q,
                       rngs={"dropout": key})
        q = q_reduce(logits, mc, "avg")  # [T, B, 1]
        return PolicyOutputs(action=action, mean=info["mean"], mean_presquash=info["mean_presquash"],
                             log_std=info["log_std"], entropy=info["entropy"],
                             scaled_entropy=info["scaled_entropy"], q=q)

    def policy_loss(pi: PolicyOutputs, scale):
        """Official policy objective: mean_t rho^t * -(alpha * scaled_entropy + Q_avg(z_t, pi(z_t)) / S).

        ``scale`` is S, the running P5-P95 value scale *already updated* from this step's t=0 values
        (:func:`running_scale_update`; no gradient). Returns ``(loss, metrics)``.
        """
        qs = pi.q / jax.lax.stop_gradient(scale)
        per_t = -jnp.mean(tc.entropy_coef * pi.scaled_entropy + qs, axis=(1, 2))
        loss = jnp.mean(per_t * rho_w[: pi.q.shape[0]])
        metrics = {
            "train/pi_loss": loss,
            "train/pi_entropy": jnp.mean(pi.entropy),
            "train/pi_scaled_entropy": jnp.mean(pi.scaled_entropy),
            "train/pi_scale": scale,
        }
        return loss, metrics

    return Losses(rollout=rollout, td_target=td_target, consistency_loss=consistency_loss, reward_loss=reward_loss,
                  value_loss=value_loss, world_model_loss=world_model_loss, policy_rollout=policy_rollout,
                  policy_loss=policy_loss, discounts=discounts)
