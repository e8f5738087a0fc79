"""One actor-step interface for evaluation, data collection and online training (brax ``acting.actor_step``).

A *policy* is a pure function

    policy(params, obs [B, O], task [B] int32, first [B] bool, state, key) -> (action [B, A], state)

``first`` marks the envs whose ``obs`` is the first of an episode (the official ``t0``; e.g. the planner
does not warm-start there); ``state`` is the policy's own memory (the planner's :class:`PlannerState`, ``()``
for the policy prior). Policies: :func:`mtdistill_jax.tdmpc2.planner.make_plan_policy` (MPPI) and
:func:`~mtdistill_jax.tdmpc2.planner.make_prior_policy` (policy prior).

An env state is anything with per-env ``obs``, ``task`` and ``first`` fields
(:class:`mtdistill_jax.envs.wrappers.EnvState`): this module imports no environment and no model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax

Policy = Callable[..., tuple[jax.Array, Any]]  # (params, obs, task, first, state, key) -> (action, state)


@flax.struct.dataclass
class Transition:
    """One agent step of B envs (``[B, ...]`` each).

    obs:      observation acted on          action:   the action taken
    reward:   reward of the step            next_obs: observation the step produced (before any auto-reset)
    done:     the step ended an episode     first:    ``obs`` was the first of an episode
    task:     task id
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    done: jax.Array
    first: jax.Array
    task: jax.Array


def actor_step(policy: Policy, params, env_state, policy_state, key) -> tuple[jax.Array, Any]:
    """The policy's action for every env of ``env_state``: ``(action [B, A], new policy_state)``."""
    return policy(params, env_state.obs, env_state.task, env_state.first, policy_state, key)


def env_step(env, policy: Policy, params, env_state, policy_state, key):
    """``actor_step`` then ``env.step``: ``(next env_state, next policy_state, Transition)`` (pure, jittable)."""
    action, policy_state = actor_step(policy, params, env_state, policy_state, key)
    next_state = env.step(env_state, action)
    transition = Transition(obs=env_state.obs, action=action, reward=next_state.reward,
                            next_obs=next_state.final_obs, done=next_state.done, first=env_state.first,
                            task=env_state.task)
    return next_state, policy_state, transition
