"""TD-MPC2 losses (official ``TDMPC2._update``, ``_td_target`` and ``update_pi``) as pure functions.

``make_losses(model, config)`` returns a :class:`Losses` of closures over the model and hyperparameters:

- ``td_target(params, target_q, next_z, reward, task, key)``: r + gamma_task * min of 2 random target heads
  at (next_z, a ~ pi(next_z)).
- ``world_model_loss(wm_params, params, target_q, batch, key)``: consistency + reward + value losses.
- ``policy_loss(pi_params, params, zs, task, scale, key)``: entropy-regularised, scale-normalised Q.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax import math as tdmath
from mtdistill_jax.configs.tasks import discount_for_episode_length, get_task_set
from mtdistill_jax.nn.world_model import WorldModel, q_value
from mtdistill_jax.types import Batch

WM_KEYS = ("task_emb", "encoder", "dynamics", "reward_head", "Qs")  # updated by the world-model optimiser
PI_KEY = "pi_head"  # updated by the policy optimiser


def task_discounts(config: ml_collections.ConfigDict) -> np.ndarray:
    """Per-task discount ``[num_tasks]`` from episode lengths (official heuristic, clipped)."""
    ts = get_task_set(config.model.task_set)
    tc = config.train
    return np.asarray([discount_for_episode_length(L, tc.discount_denom, tc.discount_min, tc.discount_max)
                       for L in ts.episode_lengths], np.float32)


def running_scale_update(scale, q0, tau: float):
    """Official RunningScale.update: lerp towards max(P95 - P5, 1) of ``q0 [B, 1]`` over the batch."""
    lo, hi = jnp.percentile(q0[:, 0], jnp.asarray([5.0, 95.0]), method="linear")
    value = jnp.maximum(hi - lo, 1.0)
    return scale + tau * (value - scale)


@dataclasses.dataclass(frozen=True)
class Losses:
    td_target: Callable
    world_model_loss: Callable
    policy_loss: Callable
    discounts: jax.Array


def make_losses(model: WorldModel, config: ml_collections.ConfigDict) -> Losses:
    """Build the TD-MPC2 loss functions for ``model`` with ``config.train`` hyperparameters."""
    mc, tc = config.model, config.train
    discounts = jnp.asarray(task_discounts(config))
    H = tc.horizon
    rho_w = jnp.asarray([tc.rho**t for t in range(H + 1)], jnp.float32)

    def apply(params, *args, method, rngs=None):
        return model.apply({"params": params}, *args, method=method, rngs=rngs)

    def sample_pi(params, z, task, key):
        eps = jax.random.normal(key, z.shape[:-1] + (model_action_dim,), z.dtype)
        return apply(params, z, task, eps, method=WorldModel.pi)

    model_action_dim = get_task_set(mc.task_set).action_pad

    def td_target(params, target_q, next_z, reward, task, key):
        """TD target r_t + gamma * min_{2 random heads} Q_target(z_{t+1}, pi(z_{t+1})), ``[H, B, 1]``."""
        k_pi, k_q = jax.random.split(key)
        action, _ = sample_pi(params, next_z, task, k_pi)
        logits = apply({**params, "Qs": target_q}, next_z, action, task, method=WorldModel.Q)
        q = q_value(logits, k_q, mc, "min")
        return reward + discounts[task][:, None] * q

    def world_model_loss(wm_params, params, target_q, batch: Batch, key):
        """Official world-model objective (TD-MPC2 eq. 3):

        L = c_cons * 1/H sum_t rho^t ||d(z_t, a_t) - sg(h(s_{t+1}))||^2
          + c_rew  * 1/H sum_t rho^t CE(R(z_t, a_t), r_t)
          + c_val  * 1/(H num_q) sum_t sum_q rho^t CE(Q_q(z_t, a_t), sg(TD_t)).
        Returns ``(loss, (metrics, zs))`` with the rolled-out latents ``zs [H+1, B, D]``.
        """
        k_td, k_drop = jax.random.split(key)
        full = {**params, **wm_params}
        task = batch.task
        next_z = jax.lax.stop_gradient(apply(full, batch.obs[1:], task, method=WorldModel.encode))
        td = jax.lax.stop_gradient(td_target(jax.lax.stop_gradient(full), target_q, next_z, batch.reward, task, k_td))

        z0 = apply(full, batch.obs[0], task, method=WorldModel.encode)

        def step(z, xs):
            a, target_z = xs
            z = apply(full, z, a, task, method=WorldModel.next)
            return z, (z, jnp.mean(jnp.square(z - target_z)))

        _, (zs_next, cons) = jax.lax.scan(step, z0, (batch.action, next_z))
        zs = jnp.concatenate([z0[None], zs_next], axis=0)
        consistency = jnp.sum(cons * rho_w[:H]) / H
        _zs = zs[:-1]
        q_logits = apply(full, _zs, batch.action, task, False, method=WorldModel.Q, rngs={"dropout": k_drop})
        r_logits = apply(full, _zs, batch.action, task, method=WorldModel.reward)
        rew_ce = tdmath.soft_ce(r_logits, batch.reward, mc.num_bins, mc.vmin, mc.vmax)  # [H, B, 1]
        reward_loss = jnp.sum(jnp.mean(rew_ce, axis=(1, 2)) * rho_w[:H]) / H
        val_ce = tdmath.soft_ce(q_logits, td[None], mc.num_bins, mc.vmin, mc.vmax)  # [Q, H, B, 1]
        value_loss = jnp.sum(jnp.mean(val_ce, axis=(2, 3)) * rho_w[None, :H]) / (H * mc.num_q)
        total = tc.consistency_coef * consistency + tc.reward_coef * reward_loss + tc.value_coef * value_loss
        metrics = {
            "train/consistency_loss": consistency,
            "train/reward_loss": reward_loss,
            "train/value_loss": value_loss,
            "train/total_loss": total,
        }
        return total, (metrics, zs)

    def policy_loss(pi_params, params, zs, task, scale, key):
        """Official policy objective: mean_t rho^t * -(alpha * scaled_entropy + Q_avg(z_t, pi(z_t)) / S).

        Q heads, task embedding and latents are frozen (release behaviour: no policy gradient reaches the
        task embedding); S is the running P5-P95 scale, updated from the t=0 values first.
        Returns ``(loss, (metrics, new_scale))``.
        """
        k_pi, k_q = jax.random.split(key)
        full = {**jax.lax.stop_gradient(params), PI_KEY: pi_params}
        zs = jax.lax.stop_gradient(zs)
        action, info = sample_pi(full, zs, task, k_pi)
        logits = apply(full, zs, action, task, method=WorldModel.Q)
        qs = q_value(logits, k_q, mc, "avg")  # [H+1, B, 1]
        new_scale = running_scale_update(scale, jax.lax.stop_gradient(qs[0]), tc.tau)
        qs = qs / jax.lax.stop_gradient(new_scale)
        per_t = -jnp.mean(tc.entropy_coef * info["scaled_entropy"] + qs, axis=(1, 2))
        loss = jnp.mean(per_t * rho_w[: zs.shape[0]])
        metrics = {
            "train/pi_loss": loss,
            "train/pi_entropy": jnp.mean(info["entropy"]),
            "train/pi_scaled_entropy": jnp.mean(info["scaled_entropy"]),
            "train/pi_scale": new_scale,
        }
        return loss, (metrics, new_scale)

    return Losses(td_target=td_target, world_model_loss=world_model_loss, policy_loss=policy_loss,
                  discounts=discounts)
