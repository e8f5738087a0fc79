"""Batched, fixed-length episodes with auto-reset over groups of MJX tasks (TD-MPC2: no early termination).

One state type, :class:`EnvState`, and one stepping program, :class:`BatchedEnv`, serve a single task
(:class:`VectorEnv`: ``N`` copies of one task) and a task set (:class:`~mtdistill_jax.envs.multitask.MultiTaskEnv`:
``N`` copies of each of ``K`` tasks). Rows are group-major (group ``g`` occupies rows ``[g*N, (g+1)*N)``); each
group's physics is its task's MJX program vmapped over its ``N`` copies (a Python loop over *groups* at trace
time). Every env carries its own ``first`` flag and episode ``step``: an actor reads ``first`` to know that
``obs`` starts an episode (the official ``t0``), so auto-resetting loops need no global step counter.

Episodes auto-reset when they reach their group's episode length: the group's fresh random initial states are
computed inside one ``lax.cond`` (not on other steps) and selected for the envs whose episode ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax.envs.base import DMCEnv, State
from mtdistill_jax.errors import UserError


@flax.struct.dataclass
class EnvState:
    """State of a :class:`BatchedEnv` (B = groups x N rows, group-major).

    physics:   per-group MJX :class:`State` with leading axis N (a tuple, one per group); read it through the
               env's accessors (:meth:`BatchedEnv.render_state`), not directly
    obs:       [B, obs_pad] observation to act on (after an auto-reset: the new episode's first one)
    final_obs: [B, obs_pad] the observation the last step produced (equals ``obs`` unless the episode ended)
    reward:    [B] float32 reward of the last step (0 after a reset)
    done:      [B] bool, True on the last step of an episode
    first:     [B] bool, True when ``obs`` is the first observation of an episode (the official ``t0``)
    step:      [B] int32 agent steps taken in the episode of ``obs`` (0 when ``first``)
    task:      [B] int32 task id of each row
    key:       [groups] PRNG keys for the next resets
    """

    physics: tuple
    obs: jax.Array
    final_obs: jax.Array
    reward: jax.Array
    done: jax.Array
    first: jax.Array
    step: jax.Array
    task: jax.Array
    key: jax.Array


class BatchedEnv:
    """``num_envs_per_group`` copies of each of ``envs`` stepped together, as one pure, jittable environment.

    ``obs_pad`` pads observations (zeros) to a common width; ``action_pad`` is the width of the action rows, of
    which group ``g`` reads its first ``action_dims[g]`` entries; ``episode_lengths`` [groups] agent steps per
    episode; ``task_ids`` [groups] the id every row of a group carries in ``EnvState.task``.
    """

    def __init__(self, envs: Sequence[DMCEnv], num_envs_per_group: int, episode_lengths: Sequence[int],
                 task_ids: Sequence[int], obs_pad: int, action_pad: int, auto_reset: bool = True):
        if num_envs_per_group < 1:
            raise UserError(f"num_envs must be >= 1, got {num_envs_per_group}")
        if any(int(L) < 1 for L in episode_lengths):
            raise UserError(f"episode_length must be >= 1, got {list(episode_lengths)}")
        self.envs = tuple(envs)
        self.num_groups = len(self.envs)
        self.num_envs_per_group = int(num_envs_per_group)
        self.num_envs = self.num_groups * self.num_envs_per_group
        self.episode_lengths = tuple(int(L) for L in episode_lengths)
        self.task_ids = np.asarray(task_ids, np.int32)
        self.obs_pad, self.action_pad = int(obs_pad), int(action_pad)
        self.action_dims = [e.action_size for e in self.envs]
        self.auto_reset = auto_reset
        self.task = jnp.asarray(np.repeat(self.task_ids, self.num_envs_per_group))  # [B]
        masks = np.zeros((self.num_envs, self.action_pad), np.float32)
        for g, ad in enumerate(self.action_dims):
            masks[self._rows(g), :ad] = 1
        self.action_masks = jnp.asarray(masks)  # [B, action_pad]

    @property
    def episode_length(self) -> int:
        """The episode length shared by every group (raises if the groups differ)."""
        if len(set(self.episode_lengths)) != 1:
            raise UserError(f"the groups have different episode lengths {self.episode_lengths}")
        return self.episode_lengths[0]

    def _rows(self, g: int) -> slice:
        N = self.num_envs_per_group
        return slice(g * N, (g + 1) * N)

    def _pad(self, x):
        return jnp.pad(x, ((0, 0), (0, self.obs_pad - x.shape[-1])))

    def _reset_group(self, g: int, key) -> State:
        return jax.vmap(self.envs[g].reset)(jax.random.split(key, self.num_envs_per_group))

    def reset(self, key) -> EnvState:
        keys = jax.random.split(key, self.num_groups)
        physics, group_keys = [], []
        for g in range(self.num_groups):
            k, sub = jax.random.split(keys[g])
            physics.append(self._reset_group(g, sub))
            group_keys.append(k)
        obs = jnp.concatenate([self._pad(p.obs) for p in physics])
        B = self.num_envs
        return EnvState(physics=tuple(physics), obs=obs, final_obs=obs, reward=jnp.zeros((B,), jnp.float32),
                        done=jnp.zeros((B,), bool), first=jnp.ones((B,), bool), step=jnp.zeros((B,), jnp.int32),
                        task=self.task, key=jnp.stack(group_keys))

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        """``action``: [B, action_pad] in [-1, 1]; entries beyond a group's action dim are ignored."""
        if action.shape != (self.num_envs, self.action_pad):
            raise UserError(f"action must be [{self.num_envs}, {self.action_pad}] (groups x envs per group, padded "
                            f"action dim), got {action.shape}")
        physics, obs, final_obs, reward, done, first, step, keys = [], [], [], [], [], [], [], []
        for g in range(self.num_groups):
            rows = self._rows(g)
            p = jax.vmap(self.envs[g].step)(state.physics[g], action[rows, :self.action_dims[g]])
            t = state.step[rows] + 1
            d = t >= self.episode_lengths[g]
            final_obs.append(self._pad(p.obs))
            reward.append(p.reward)
            key, f = state.key[g], jnp.zeros_like(d)
            if self.auto_reset:
                def do_reset(args, g=g, d=d):
                    p, t, key = args
                    key, sub = jax.random.split(key)
                    r = self._reset_group(g, sub)
                    p = jax.tree_util.tree_map(
                        lambda new, old: jnp.where(d.reshape(d.shape + (1,) * (new.ndim - 1)), new, old), r, p)
                    return p, jnp.where(d, 0, t), key

                p, t, key = jax.lax.cond(jnp.any(d), do_reset, lambda args: args, (p, t, key))
                f = d
            physics.append(p)
            obs.append(self._pad(p.obs))
            done.append(d)
            first.append(f)
            step.append(t)
            keys.append(key)
        cat = jnp.concatenate
        return state.replace(physics=tuple(physics), obs=cat(obs), final_obs=cat(final_obs), reward=cat(reward),
                             done=cat(done), first=cat(first), step=cat(step), key=jnp.stack(keys))

    # ----------------------------------------------------------------------------------------------------
    # Public accessors (what evaluation, rendering and data collection read of a state).

    def render_state(self, state: EnvState, row: int) -> dict[str, Any]:
        """What rendering needs of env ``row``: ``{'qpos', 'qvel', 'act', 'info'}`` (see ``envs.render``)."""
        g, i = divmod(int(row), self.num_envs_per_group)
        if not 0 <= g < self.num_groups:
            raise UserError(f"row must be in [0, {self.num_envs}), got {row}")
        p = jax.tree_util.tree_map(lambda x: x[i], state.physics[g])
        return {"qpos": p.data.qpos, "qvel": p.data.qvel, "act": p.data.act, "info": p.info}

    def group_render_states(self, state: EnvState, index: int = 0) -> tuple[dict[str, Any], ...]:
        """:meth:`render_state` of env ``index`` of every group (per task: its ``index``-th copy)."""
        return tuple(self.render_state(state, g * self.num_envs_per_group + index) for g in range(self.num_groups))


class VectorEnv(BatchedEnv):
    """``N`` copies of one :class:`DMCEnv` stepped together, with episodes of ``episode_length`` steps (default:
    the env's). Observations are not padded; every row has task id ``task_id``."""

    def __init__(self, env: DMCEnv, num_envs: int, episode_length: int | None = None, auto_reset: bool = True,
                 task_id: int = 0):
        super().__init__([env], num_envs, [episode_length or env.episode_length], [task_id],
                         obs_pad=env.observation_size, action_pad=env.action_size, auto_reset=auto_reset)
        self.env = env

