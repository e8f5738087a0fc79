"""MPPI planning in the latent space of the world model (official ``TDMPC2._plan``), batched over envs.

``planner = make_planner(model, config)`` returns a pure function

    plan(params, obs [B, O], task [B], prev_mean [B, H, A], t0 [B] bool, key, mode='sample')
        -> (action [B, A], new_prev_mean [B, H, A])

where every env b plans independently with its own task id. Per env, as the official code:

1. ``num_pi_trajs`` action sequences are rolled out from the policy prior;
2. the sampling mean starts at zero, or (``t0`` false) at the previous mean shifted one step (warm start);
   the std starts at ``max_std``;
3. each of ``iterations`` rounds samples ``num_samples - num_pi_trajs`` sequences N(mean, std) clipped to
   [-1, 1], masks padded action dims, scores every sequence with H model rewards plus the discounted
   ``avg`` Q of a policy action at the end, keeps ``num_elites``, and refits mean/std with weights
   ``exp(temperature * (v - max v))`` (std clipped to [min_std, max_std], masked);
4. the first action of one elite, drawn with probability equal to its weight, is returned; ``mode='sample'``
   (the official ``act`` during training *and* in the official ``evaluate.py``) adds N(0, std[0]) noise,
   ``mode='elite'`` (the official ``eval_mode=True``) does not, ``mode='mean'`` returns the refitted mean's
   first action (not an official mode). The result is clipped to [-1, 1]; actions beyond a task's action dim
   are exactly 0.

``config.planner.compute_dtype`` ("float32", official; or "bfloat16") is the dtype the world model runs in while
planning: params are cast once per call, the model's matmuls accumulate in float32 (``nn.layers.matmul``), its hidden
layers normalise the float32 products in float32 before rounding their outputs to bf16
(``nn.layers.linear_layer_norm_mish``, as torch's autocast runs ``layer_norm`` in float32), and the MPPI statistics,
rewards, values and returned actions stay float32.

For evaluation, data collection and online training the planner is used as an *actor policy*
(:mod:`mtdistill_jax.acting`)::

    policy = make_plan_policy(model, config, mode)       # or Planner(config).policy(mode)
    policy(params, obs [B, O], task [B], first [B] bool, state: PlannerState, key) -> (action [B, A], state)

where ``first`` marks envs whose ``obs`` starts an episode (the official ``t0``: no warm start);
``init_planner_state(config, B)`` is the initial state. :func:`make_prior_policy` is the same interface for
the policy prior alone (the official ``act`` with ``mpc=False``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax import math as tdmath
from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.configs.tasks import get_task_set, task_discounts
from mtdistill_jax.nn.layers import centred_hidden_layers
from mtdistill_jax.nn.world_model import (
    WorldModel,
    action_masks,
    heads_to_evaluate,
    make_world_model,
    q_reduce,
    two_heads,
)
from mtdistill_jax.xla_cpu import bf16_dot_options

MODES = ("sample", "elite", "mean")  # planner action: official act (noise) / official eval_mode=True / MPPI mean
PRIOR_MODES = ("sample", "mean")  # policy prior: official act / official eval_mode=True (the tanh of the mean)


@flax.struct.dataclass
class PlannerState:
    """Warm-start memory: the last MPPI mean of each env, ``[B, H, A]``."""

    prev_mean: jax.Array


def apply_centred(model: WorldModel, params, *args, method):
    """``model.apply`` of ``method`` with :func:`~mtdistill_jax.nn.layers.centred_hidden_layers`: the planner
    runs every layer several times per call, so it centres the weights once rather than the activations at
    each use (the same values)."""
    with centred_hidden_layers():
        return model.apply({"params": params}, *args, method=method)


def make_value_estimator(model: WorldModel, config: ml_collections.ConfigDict) -> Callable:
    """The planner's trajectory value (official ``_estimate_value``) with its noise given:
    ``estimate_value(params, z [n, D], actions [H, n, A], task [n], gamma [n, 1], eps [n, A], heads [2]) -> [n, 1]``,
    ``G = sum_t gamma^t r_t + gamma^H Q_avg(z_H, pi(z_H, eps))`` with the Q heads ``heads`` (official
    ``randperm(num_q)[:2]``). The planner draws ``eps`` and ``heads`` from its keys; given, they make the value
    comparable with the official code's on the same draws (``benchmarks/compare_official.py``)."""
    mc = config.model

    apply = functools.partial(apply_centred, model)

    def estimate_value(params, z, actions, task, gamma, eps, heads):
        # the model runs in z's dtype (planner.compute_dtype); rewards, Q values and the return in float32
        actions, eps = actions.astype(z.dtype), eps.astype(z.dtype)
        G, disc = 0.0, 1.0
        for t in range(actions.shape[0]):
            r = tdmath.two_hot_inv(apply(params, z, actions[t], task, method=WorldModel.reward).astype(jnp.float32),
                                   mc.num_bins, mc.vmin, mc.vmax)
            z = apply(params, z, actions[t], task, method=WorldModel.next)
            G = G + disc * r
            disc = disc * gamma
        a = apply(params, z, task, eps, method=WorldModel.pi)[0].astype(z.dtype)  # pi's squash returns float32
        q = apply(params, z, a, task, True, heads_to_evaluate(heads, mc.num_q), method=WorldModel.Q)
        q = q_reduce(q.astype(jnp.float32), mc, "avg")
        return G + disc * q

    return estimate_value


def make_planner(model: WorldModel, config: ml_collections.ConfigDict) -> Callable:
    """Pure batched MPPI ``plan`` function for ``model`` with ``config.planner`` settings (see module doc)."""
    pc, mc = config.planner, config.model
    ts = get_task_set(mc.task_set)
    A, H = ts.action_pad, pc.horizon
    N, P, E = pc.num_samples, pc.num_pi_trajs, pc.num_elites
    if not 0 <= P < N:
        raise ValueError(f"num_pi_trajs ({P}) must be in [0, num_samples={N})")
    if not 0 < E <= N:
        raise ValueError(f"num_elites ({E}) must be in (0, num_samples={N}]")
    iterations = pc.iterations + 2 * int(A >= 20)  # official heuristic for large action spaces
    masks_all = jnp.asarray(action_masks(mc.task_set))
    discounts = jnp.asarray(task_discounts(config))
    compute_dtype = pc.get("compute_dtype", "float32")
    cdt = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32

    apply = functools.partial(apply_centred, model)

    def policy(params, z, task, key):
        eps = tdmath.normal(key, z.shape[:-1] + (A,), z.dtype)
        return apply(params, z, task, eps, method=WorldModel.pi)[0].astype(z.dtype)

    value_of = make_value_estimator(model, config)

    def estimate_value(params, z, actions, task, gamma, key):
        """:func:`make_value_estimator`'s value, its policy noise and Q heads drawn from ``key``."""
        k_pi, k_q = jax.random.split(key)
        eps = tdmath.normal(k_pi, z.shape[:-1] + (A,), z.dtype)
        heads = two_heads(k_q, mc.num_q)
        return value_of(params, z, actions, task, gamma, eps, heads)

    def plan_one(params, obs, task, prev_mean, t0, key, mode):
        mask = masks_all[task]
        gamma = discounts[task]
        k_pi, k_iter, k_sel, k_noise = jax.random.split(key, 4)
        z = apply(params, obs[None].astype(cdt), task[None], method=WorldModel.encode)[0]

        if P > 0:
            zp = jnp.broadcast_to(z, (P,) + z.shape)
            tp = jnp.broadcast_to(task, (P,))
            pi_actions = []
            for t, k in enumerate(jax.random.split(k_pi, H)):
                a = policy(params, zp, tp, k)
                pi_actions.append(a)
                if t < H - 1:
                    zp = apply(params, zp, a, tp, method=WorldModel.next)
            pi_actions = jnp.stack(pi_actions).astype(jnp.float32)  # [H, P, A]

        zs = jnp.broadcast_to(z, (N,) + z.shape)
        tn = jnp.broadcast_to(task, (N,))
        shifted = jnp.concatenate([prev_mean[1:], jnp.zeros((1, A), prev_mean.dtype)], axis=0)
        mean = jnp.where(t0, jnp.zeros((H, A), jnp.float32), shifted)
        std = jnp.full((H, A), pc.max_std, jnp.float32)

        def iteration(carry, k):
            mean, std, _, _ = carry
            k_r, k_v = jax.random.split(k)
            r = tdmath.normal(k_r, (H, N - P, A), jnp.float32)
            sampled = jnp.clip(mean[:, None] + std[:, None] * r, -1, 1)
            actions = jnp.concatenate([pi_actions, sampled], axis=1) if P > 0 else sampled
            actions = actions * mask
            value = jnp.nan_to_num(estimate_value(params, zs, actions, tn, gamma, k_v), nan=0.0)[:, 0]
            elite_value, elite_idx = jax.lax.top_k(value, E)
            elite_actions = actions[:, elite_idx]  # [H, E, A]
            score = jnp.exp(pc.temperature * (elite_value - jnp.max(elite_value)))
            score = score / jnp.sum(score)
            w = score[None, :, None]
            mean = jnp.sum(w * elite_actions, axis=1) / (jnp.sum(score) + 1e-9)
            std = jnp.sqrt(jnp.sum(w * jnp.square(elite_actions - mean[:, None]), axis=1) / (jnp.sum(score) + 1e-9))
            std = jnp.clip(std, pc.min_std, pc.max_std)
            return (mean * mask, std * mask, score, elite_actions), None

        init = (mean, std, jnp.zeros((E,), jnp.float32), jnp.zeros((H, E, A), jnp.float32))
        (mean, std, score, elite_actions), _ = jax.lax.scan(iteration, init, jax.random.split(k_iter, iterations))
        if mode == "mean":
            a = mean[0]
        else:
            idx = jax.random.categorical(k_sel, jnp.log(score))
            a = elite_actions[0, idx]
            if mode == "sample":
                a = a + std[0] * jax.random.normal(k_noise, (A,), jnp.float32)
        return jnp.clip(a, -1, 1) * mask, mean

    def plan(params, obs, task, prev_mean, t0, key, mode: str = "sample"):
        check_mode(mode)
        if compute_dtype != "float32":
            params = transforms.to_compute(params, compute_dtype, xp=jnp)  # once per call, outside the vmap
        keys = jax.random.split(key, obs.shape[0])
        fn = jax.vmap(plan_one, in_axes=(None, 0, 0, 0, 0, 0, None))
        return fn(params, obs, task, prev_mean, t0, keys, mode)

    return plan


def init_planner_state(config: ml_collections.ConfigDict, batch_size: int) -> PlannerState:
    """The planner state of ``batch_size`` envs before their first step (no warm start yet)."""
    H, A = config.planner.horizon, get_task_set(config.model.task_set).action_pad
    return PlannerState(prev_mean=jnp.zeros((batch_size, H, A), jnp.float32))


def check_mode(mode: str, modes: tuple[str, ...] = MODES) -> str:
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    return mode


def make_plan_policy(model: WorldModel, config: ml_collections.ConfigDict, mode: str = "sample",
                     plan: Callable | None = None) -> Callable:
    """The MPPI planner as an actor policy ``(params, obs, task, first, state, key) -> (action, state)``
    (``state``: :class:`PlannerState`; ``first`` = the official ``t0``); ``plan`` defaults to
    ``make_planner(model, config)``."""
    check_mode(mode)
    plan = plan or make_planner(model, config)

    def policy(params, obs, task, first, state: PlannerState, key):
        action, mean = plan(params, obs, task, state.prev_mean, first, key, mode)
        return action, PlannerState(prev_mean=mean)

    return policy


def make_prior_policy(model: WorldModel, config: ml_collections.ConfigDict, mode: str = "sample") -> Callable:
    """The policy prior alone as an actor policy ``(params, obs, task, first, state, key) -> (action, state)``:
    ``mode='sample'`` draws from it (official ``act`` with ``mpc=False``), ``'mean'`` returns the tanh of its
    mean (official ``eval_mode=True``). Stateless: ``state`` (e.g. ``()``) is passed through; ``first`` unused."""
    check_mode(mode, PRIOR_MODES)
    A = get_task_set(config.model.task_set).action_pad

    def policy(params, obs, task, first, state, key):
        del first
        z = model.apply({"params": params}, obs, task, method=WorldModel.encode)
        eps = tdmath.normal(key, z.shape[:-1] + (A,), z.dtype)
        action, info = model.apply({"params": params}, z, task, eps, method=WorldModel.pi)
        return (info["mean"] if mode == "mean" else action), state

    return policy


def compiler_options(config: ml_collections.ConfigDict) -> dict | None:
    """XLA compiler options for a program that plans with ``config.planner``: for a planner computing in bf16 on
    CPU, the YNNPACK single-dot path that reaches the CPU's bf16 units (:func:`~mtdistill_jax.xla_cpu.
    bf16_dot_options`); None otherwise."""
    return bf16_dot_options(config.planner.get("compute_dtype", "float32"))


class Planner:
    """Public MPPI entry point: validates input outside jit, then runs the compiled planner.

    ``planner = Planner(config); state = planner.init(B)``;
    ``action, state = planner.act(params, obs, task, state, first, key, mode='sample')``;
    ``planner.plan`` is the pure batched ``plan`` function, ``planner.policy(mode)`` the actor policy.
    """

    def __init__(self, config: ml_collections.ConfigDict, model: WorldModel | None = None):
        self.config = config
        self.model = model or make_world_model(config.model)
        self.task_set = get_task_set(config.model.task_set)
        self.plan = make_planner(self.model, config)
        self.plan_jit = jax.jit(self.plan, static_argnames=("mode",), compiler_options=compiler_options(config))

    def init(self, batch_size: int) -> PlannerState:
        return init_planner_state(self.config, batch_size)

    def policy(self, mode: str = "sample") -> Callable:
        """The actor policy ``(params, obs, task, first, state, key) -> (action, state)`` (see module doc)."""
        return make_plan_policy(self.model, self.config, mode, plan=self.plan)

    def validate(self, obs, task, state: PlannerState, first, check_values: bool = True) -> None:
        ts = self.task_set
        obs_shape, task_shape = np.shape(obs), np.shape(task)
        if len(obs_shape) != 2 or obs_shape[1] != ts.obs_pad:
            raise ValueError(f"obs must be [B, {ts.obs_pad}] (observations zero-padded to {ts.obs_pad} for "
                             f"{ts.name}), got shape {obs_shape}")
        B = obs_shape[0]
        if task_shape != (B,):
            raise ValueError(f"task must be [B] = [{B}] task ids, got shape {task_shape}")
        expected = (B, self.config.planner.horizon, ts.action_pad)
        if np.shape(state.prev_mean) != expected:
            raise ValueError(f"planner state prev_mean has shape {np.shape(state.prev_mean)}, expected {expected} "
                             f"(action dim {ts.action_pad}); create it with Planner.init({B})")
        if np.shape(first) != (B,):
            raise ValueError(f"first must be [B] = [{B}] booleans (True where obs starts an episode), got shape "
                             f"{np.shape(first)}")
        if check_values:
            t = np.asarray(task)
            if not np.issubdtype(t.dtype, np.integer):
                raise ValueError(f"task must hold integer ids, got dtype {t.dtype}")
            if t.size and (t.min() < 0 or t.max() >= ts.num_tasks):
                raise ValueError(f"task ids must be in [0, {ts.num_tasks}) for {ts.name}, got min {t.min()}, "
                                 f"max {t.max()}")

    def act(self, params, obs, task, state: PlannerState, first, key, mode: str = "sample",
            check_values: bool = True) -> tuple[jax.Array, PlannerState]:
        """Plan for every env; returns ``(action [B, A], new state)``.

        ``first`` [B] bool: True where ``obs`` is the first of an episode (the official ``t0``). ``mode``:
        ``'sample'`` (default: the official ``act``, as in the official ``evaluate.py``), ``'elite'`` (the
        official ``eval_mode=True``: an elite, no noise) or ``'mean'`` (the MPPI mean's first action).
        """
        check_mode(mode)
        self.validate(obs, task, state, first, check_values)
        action, mean = self.plan_jit(params, jnp.asarray(obs, jnp.float32), jnp.asarray(task, jnp.int32),
                                     state.prev_mean, jnp.asarray(first, bool), key, mode=mode)
        return action, PlannerState(prev_mean=mean)
