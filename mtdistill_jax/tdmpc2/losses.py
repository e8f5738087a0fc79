"""TD-MPC2 losses (official ``TDMPC2._update``, ``_td_target`` and ``update_pi``) as pure functions.

``make_losses(model, config)`` returns a :class:`Losses` of closures over the model and hyperparameters:

- ``td_target(params, target_q, next_z, reward, task, eps, heads)``: r + gamma_task * min of 2 target heads
  at (next_z, a ~ pi(next_z)).
- ``world_model_loss(wm_params, params, target_q, batch, draws, key)``: consistency + reward + value losses.
- ``policy_loss(trainable, params, zs, task, scale, eps, heads, key)``: entropy-regularised, scale-normalised Q.

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
    """Fresh :class:`Draws` for one update (pure; the default of the update step)."""
    H, A, num_q = config.train.horizon, get_task_set(config.model.task_set).action_pad, config.model.num_q
    k_td, k_tdq, k_pi, k_piq = jax.random.split(key, 4)
    return Draws(td_eps=jax.random.normal(k_td, (H, batch_size, A), dtype),
                 td_heads=jax.random.permutation(k_tdq, num_q)[:2],
                 pi_eps=jax.random.normal(k_pi, (H + 1, batch_size, A), dtype),
                 pi_heads=jax.random.permutation(k_piq, num_q)[:2])


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

    def td_target(params, target_q, next_z, reward, task, eps, heads):
        """TD target r_t + gamma_task * min_{heads} Q_target(z_{t+1}, pi(z_{t+1}, eps)), ``[H, B, 1]``.

        Target Qs in eval mode (no dropout), as the official code keeps them. Returns ``(targets, aux)`` with
        ``aux = {td_action, td_q}``.
        """
        action, _ = apply(params, next_z, task, eps, method=WorldModel.pi)
        logits = apply({**params, "Qs": target_q}, next_z, action, task, method=WorldModel.Q)
        q = q_value(logits, None, mc, "min", heads=heads)
        return reward + discounts[task][:, None] * q, {"td_action": action, "td_q": q}

    def world_model_loss(wm_params, params, target_q, batch: Batch, draws: Draws, key):
        """Official world-model objective (TD-MPC2 eq. 3):

        L = c_cons * 1/H sum_t rho^t ||d(z_t, a_t) - sg(h(s_{t+1}))||^2
          + c_rew  * 1/H sum_t rho^t CE(R(z_t, a_t), r_t)
          + c_val  * 1/(H num_q) sum_t sum_q rho^t CE(Q_q(z_t, a_t), sg(TD_t)).
        ``draws`` gives the TD target's policy noise and heads; ``key`` drives the Q dropout.
        Returns ``(loss, (metrics, aux))``; ``aux`` holds the rolled-out latents ``zs [H+1, B, D]``, ``next_z``,
        ``td_targets``, ``td_action`` and ``td_q``.
        """
        full = {**params, **wm_params}
        task = batch.task
        next_z = jax.lax.stop_gradient(apply(full, batch.obs[1:], task, method=WorldModel.encode))
        td, td_aux = jax.lax.stop_gradient(td_target(jax.lax.stop_gradient(full), target_q, next_z, batch.reward,
                                                     task, draws.td_eps, draws.td_heads))

        z0 = apply(full, batch.obs[0], task, method=WorldModel.encode)

        def step(z, xs):
            a, target_z = xs
            z = apply(full, z, a, task, method=WorldModel.next)
            return z, (z, jnp.mean(jnp.square(z - target_z)))

        _, (zs_next, cons) = jax.lax.scan(step, z0, (batch.action, next_z))
        zs = jnp.concatenate([z0[None], zs_next], axis=0)
        consistency = jnp.sum(cons * rho_w[:H]) / H
        _zs = zs[:-1]
        q_logits = apply(full, _zs, batch.action, task, False, method=WorldModel.Q, rngs={"dropout": key})
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
        aux = {"zs": zs, "next_z": next_z, "td_targets": td, **td_aux}
        return total, (metrics, aux)

    def policy_loss(trainable, params, zs, task, scale, eps, heads, key):
        """Official policy objective: mean_t rho^t * -(alpha * scaled_entropy + Q_avg(z_t, pi(z_t, eps)) / S).

        ``trainable`` holds the sub-trees that receive the gradient (``{'pi_head': ...}``, plus ``'task_emb'``
        for the official HEAD behaviour); everything else in ``params`` (Q weights, ...) and the latents ``zs``
        are frozen. The Q heads ``heads`` are averaged, with dropout active (``key``) as in the official train
        mode; S is the running P5-P95 scale, updated from the t=0 values first.
        Returns ``(loss, (metrics, new_scale, aux))``; ``aux`` holds ``pi_action``, ``pi_mean``, ``pi_log_std``,
        ``pi_scaled_entropy_all`` and ``pi_q`` (before scaling).
        """
        full = {**jax.lax.stop_gradient(params), **trainable}
        zs = jax.lax.stop_gradient(zs)
        action, info = apply(full, zs, task, eps, method=WorldModel.pi)
        logits = apply(full, zs, action, task, False, method=WorldModel.Q, rngs={"dropout": key})
        q = q_value(logits, None, mc, "avg", heads=heads)  # [H+1, B, 1]
        new_scale = running_scale_update(scale, jax.lax.stop_gradient(q[0]), tc.tau)
        qs = q / jax.lax.stop_gradient(new_scale)
        per_t = -jnp.mean(tc.entropy_coef * info["scaled_entropy"] + qs, axis=(1, 2))
        loss = jnp.mean(per_t * rho_w[: zs.shape[0]])
        metrics = {
            "train/pi_loss": loss,
            "train/pi_entropy": jnp.mean(info["entropy"]),
            "train/pi_scaled_entropy": jnp.mean(info["scaled_entropy"]),
            "train/pi_scale": new_scale,
        }
        aux = {"pi_action": action, "pi_mean": info["mean"], "pi_log_std": info["log_std"],
               "pi_scaled_entropy_all": info["scaled_entropy"], "pi_q": q}
        return loss, (metrics, new_scale, aux)

    return Losses(td_target=td_target, world_model_loss=world_model_loss, policy_loss=policy_loss,
                  discounts=discounts)
