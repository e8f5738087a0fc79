"""A multi-task vector environment over any subset of MT30 with N envs per task.

Observations are zero-padded to the task set's width (MT30: 24), actions arrive padded to 6 and each task
reads only its first ``action_dim`` entries; every row carries its task id. The whole thing is one pure,
jittable pytree function: each task's physics model is traced once (a Python loop over *tasks* at trace
time, ``vmap`` over the N copies), and episodes auto-reset.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax.configs.tasks import MT30, TaskSet
from mtdistill_jax.envs.registry import make
from mtdistill_jax.envs.wrappers import VecState, VectorEnv


@flax.struct.dataclass
class MultiTaskState:
    """State of a :class:`MultiTaskEnv` (rows task-major: task k occupies rows [k*N, (k+1)*N)).

    groups:    per-task :class:`VecState` (a tuple, one per task)
    obs:       [K*N, obs_pad] padded observations to act on
    final_obs: [K*N, obs_pad] padded observations produced by the last step (before any auto-reset)
    reward:    [K*N] rewards of the last step
    done:      [K*N] True on the last step of an episode
    task:      [K*N] int32 task ids (task set ids, e.g. MT30 order)
    """

    groups: tuple
    obs: jax.Array
    final_obs: jax.Array
    reward: jax.Array
    done: jax.Array
    task: jax.Array


class MultiTaskEnv:
    """``num_envs_per_task`` copies of each of ``tasks`` as one batched environment."""

    def __init__(self, tasks: Sequence[str], num_envs_per_task: int = 1, task_set: TaskSet = MT30,
                 impl: str | None = None, episode_length: int | None = None, auto_reset: bool = True,
                 impls: dict[str, str] | None = None):
        if not tasks:
            raise ValueError("tasks is empty; give a subset of: " + ", ".join(task_set.tasks))
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct, got {list(tasks)}")
        self.tasks = tuple(tasks)
        self.task_set = task_set
        self.num_envs_per_task = num_envs_per_task
        self.task_ids = np.asarray([task_set.task_id(t) for t in tasks], np.int32)
        impls = impls or {}
        self.vec_envs = [VectorEnv(make(t, impl=impls.get(t, impl)), num_envs_per_task, episode_length, auto_reset)
                         for t in self.tasks]
        self.obs_dims = [task_set.obs_dims[i] for i in self.task_ids]
        self.action_dims = [task_set.action_dims[i] for i in self.task_ids]
        for t, v, od, ad in zip(self.tasks, self.vec_envs, self.obs_dims, self.action_dims, strict=True):
            if v.env.action_size != ad:
                raise AssertionError(f"{t}: env action size {v.env.action_size} != task set's {ad}")
            if v.env.observation_size != od:
                raise AssertionError(f"{t}: env observation size {v.env.observation_size} != task set's {od}")
        self.obs_pad, self.action_pad = task_set.obs_pad, task_set.action_pad
        self.num_envs = len(self.tasks) * num_envs_per_task
        self.task = jnp.asarray(np.repeat(self.task_ids, num_envs_per_task))
        masks = np.zeros((self.num_envs, self.action_pad), np.float32)
        for k, ad in enumerate(self.action_dims):
            masks[k * num_envs_per_task:(k + 1) * num_envs_per_task, :ad] = 1
        self.action_masks = jnp.asarray(masks)  # [K*N, action_pad]

    def _pad(self, x):
        return jnp.pad(x, ((0, 0), (0, self.obs_pad - x.shape[-1])))

    def _collect(self, groups: Sequence[VecState]) -> MultiTaskState:
        cat = jnp.concatenate
        return MultiTaskState(
            groups=tuple(groups),
            obs=cat([self._pad(g.obs) for g in groups]),
            final_obs=cat([self._pad(g.final_obs) for g in groups]),
            reward=cat([g.reward for g in groups]),
            done=cat([g.done for g in groups]),
            task=self.task,
        )

    def reset(self, key) -> MultiTaskState:
        keys = jax.random.split(key, len(self.vec_envs))
        return self._collect([v.reset(k) for v, k in zip(self.vec_envs, keys, strict=True)])

    def step(self, state: MultiTaskState, action: jax.Array) -> MultiTaskState:
        """``action``: [K*N, action_pad]; entries beyond a task's action dim are ignored."""
        if action.shape != (self.num_envs, self.action_pad):
            raise ValueError(f"action must be [{self.num_envs}, {self.action_pad}] (tasks x envs per task, padded "
                             f"action dim), got {action.shape}")
        N = self.num_envs_per_task
        groups = [v.step(g, action[k * N:(k + 1) * N, :ad])
                  for k, (v, g, ad) in enumerate(zip(self.vec_envs, state.groups, self.action_dims, strict=True))]
        return self._collect(groups)
