"""Batched, fixed-length episodes with auto-reset over groups of MJX tasks (TD-MPC2: no early termination).

One state type, :class:`EnvState`, and one stepping program, :class:`BatchedEnv`, serve a single task
(:class:`VectorEnv`: ``N`` copies of one task) and a task set (:class:`~mtdistill_jax.envs.multitask.MultiTaskEnv`:
``N`` copies of each of ``K`` tasks). Rows are group-major (group ``g`` occupies rows ``[g*N, (g+1)*N)``). The
physics runs per *structure* (:mod:`mtdistill_jax.envs.structure`): groups whose tasks share one MJX model
structure (e.g. walker stand/walk/run) are stepped by one physics program vmapped over all their rows, each task
keeping its own reward, observation and initial-state draw (a Python loop over structures at trace time, so a
program over all 30 MT30 tasks traces 11 physics models, not 30). Every env carries its own ``first`` flag and
episode ``step``: an actor reads ``first`` to know that ``obs`` starts an episode (the official ``t0``), so
auto-resetting loops need no global step counter.

Episodes auto-reset when they reach their group's episode length: a structure's fresh random initial states are
computed inside one ``lax.cond`` (not on other steps) and selected for the envs whose episode ended; each group
draws them from its own key, which advances only when one of its episodes ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax.envs.base import DMCEnv
from mtdistill_jax.envs.structure import Structure, group_by_structure
from mtdistill_jax.errors import UserError


@flax.struct.dataclass
class EnvState:
    """State of a :class:`BatchedEnv` (B = groups x N rows, group-major).

    physics:   per-structure MJX :class:`State` with leading axis the structure's rows (a tuple, one per
               structure); read it through the env's accessors (:meth:`BatchedEnv.render_state`), not directly
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

    Groups whose tasks share one physics structure (``envs.structure``) are stepped by one vmapped physics
    program (``share_physics=False``: one per group); rows stay group-major whatever the structures are.
    """

    def __init__(self, envs: Sequence[DMCEnv], num_envs_per_group: int, episode_lengths: Sequence[int],
                 task_ids: Sequence[int], obs_pad: int, action_pad: int, auto_reset: bool = True,
                 share_physics: bool = True):
        if num_envs_per_group < 1:
            raise UserError(f"num_envs must be >= 1, got {num_envs_per_group}")
        if any(int(L) < 1 for L in episode_lengths):
            raise UserError(f"episode_length must be >= 1, got {list(episode_lengths)}")
        self.envs = tuple(envs)
        self.num_groups = len(self.envs)
        self.num_envs_per_group = N = int(num_envs_per_group)
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
        # physics structures: each steps its groups' rows (group after group) in one vmapped program
        self.structure_groups = (group_by_structure(self.envs) if share_physics
                                 else [[g] for g in range(self.num_groups)])
        self.structures = tuple(Structure([self.envs[g] for g in idx], N) for idx in self.structure_groups)
        order = [g for idx in self.structure_groups for g in idx]  # groups in the structures' row order
        self._where = {g: (s, k) for s, idx in enumerate(self.structure_groups) for k, g in enumerate(idx)}
        # row permutations between group-major rows and the structures' rows (None: the same order)
        to_structures = np.concatenate([np.arange(g * N, (g + 1) * N) for g in order])
        self._to_structures = None if order == sorted(order) else jnp.asarray(to_structures)
        self._from_structures = None if self._to_structures is None else jnp.asarray(np.argsort(to_structures))
        self._structure_rows, start = [], 0
        for st in self.structures:
            self._structure_rows.append(slice(start, start + st.num_rows))
            start += st.num_rows
        self._lengths = jnp.asarray(np.repeat(np.asarray(self.episode_lengths)[order], N), jnp.int32)

    @property
    def episode_length(self) -> int:
        """The episode length shared by every group (raises if the groups differ)."""
        if len(set(self.episode_lengths)) != 1:
            raise UserError(f"the groups have different episode lengths {self.episode_lengths}")
        return self.episode_lengths[0]

    def _rows(self, g: int) -> slice:
        N = self.num_envs_per_group
        return slice(g * N, (g + 1) * N)

    def _structure_order(self, x):
        return x if self._to_structures is None else x[self._to_structures]

    def _group_order(self, x):
        return x if self._from_structures is None else x[self._from_structures]

    def _obs_rows(self, physics) -> jax.Array:
        """[B, obs_pad] observations of the structures' states, in group-major row order."""
        obs = [jnp.pad(p.obs, ((0, 0), (0, self.obs_pad - p.obs.shape[-1]))) for p in physics]
        return self._group_order(jnp.concatenate(obs))

    def _reset_keys(self, subs):
        """Per group of a structure, the keys of its rows from the group's reset key."""
        return [jax.random.split(k, self.num_envs_per_group) for k in subs]

    def reset(self, key) -> EnvState:
        keys = jax.random.split(key, self.num_groups)
        pairs = [jax.random.split(keys[g]) for g in range(self.num_groups)]  # (next key, this reset's key)
        physics = tuple(st.reset(self._reset_keys([pairs[g][1] for g in idx]))
                        for st, idx in zip(self.structures, self.structure_groups, strict=True))
        obs = self._obs_rows(physics)
        B = self.num_envs
        return EnvState(physics=physics, obs=obs, final_obs=obs, reward=jnp.zeros((B,), jnp.float32),
                        done=jnp.zeros((B,), bool), first=jnp.ones((B,), bool), step=jnp.zeros((B,), jnp.int32),
                        task=self.task, key=jnp.stack([p[0] for p in pairs]))

    def step(self, state: EnvState, action: jax.Array) -> EnvState:
        """``action``: [B, action_pad] in [-1, 1]; entries beyond a group's action dim are ignored."""
        if action.shape != (self.num_envs, self.action_pad):
            raise UserError(f"action must be [{self.num_envs}, {self.action_pad}] (groups x envs per group, padded "
                            f"action dim), got {action.shape}")
        action, steps = self._structure_order(action), self._structure_order(state.step)
        N = self.num_envs_per_group
        keys = list(state.key)
        physics, final, reward, done, step = [], [], [], [], []
        for s, (st, idx, rows) in enumerate(zip(self.structures, self.structure_groups, self._structure_rows,
                                                strict=True)):
            p = st.step(state.physics[s], action[rows, :st.rep.action_size])
            t = steps[rows] + 1
            d = t >= self._lengths[rows]
            final.append(p)
            reward.append(p.reward)
            if self.auto_reset:
                def do_reset(args, st=st, idx=idx, d=d):
                    p, t, ks = args
                    pairs = [jax.random.split(k) for k in ks]
                    r = st.reset(self._reset_keys([q[1] for q in pairs]))
                    p = jax.tree_util.tree_map(
                        lambda new, old: jnp.where(d.reshape(d.shape + (1,) * (new.ndim - 1)), new, old), r, p)
                    ended = [jnp.any(d[k * N:(k + 1) * N]) for k in range(len(idx))]  # per group: a reset used
                    ks = [jnp.where(e, q[0], k) for e, q, k in zip(ended, pairs, ks, strict=True)]
                    return p, jnp.where(d, 0, t), ks

                p, t, ks = jax.lax.cond(jnp.any(d), do_reset, lambda args: args, (p, t, [keys[g] for g in idx]))
                for g, k in zip(idx, ks, strict=True):
                    keys[g] = k
            physics.append(p)
            done.append(d)
            step.append(t)
        cat = lambda xs: self._group_order(jnp.concatenate(xs))  # noqa: E731
        done = cat(done)
        return state.replace(physics=tuple(physics), obs=self._obs_rows(physics), final_obs=self._obs_rows(final),
                             reward=cat(reward),
                             done=done, first=done if self.auto_reset else jnp.zeros_like(done), step=cat(step),
                             key=jnp.stack(keys))

    # ----------------------------------------------------------------------------------------------------
    # Public accessors (what evaluation, rendering and data collection read of a state).

    def render_state(self, state: EnvState, row: int) -> dict[str, Any]:
        """What rendering needs of env ``row``: ``{'qpos', 'qvel', 'act', 'info'}`` (see ``envs.render``)."""
        g, i = divmod(int(row), self.num_envs_per_group)
        if not 0 <= g < self.num_groups:
            raise UserError(f"row must be in [0, {self.num_envs}), got {row}")
        s, k = self._where[g]
        return self.structures[s].render_state(state.physics[s], k, i)

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

