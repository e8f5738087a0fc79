"""A multi-task vector environment over any subset of MT30 with N envs per task.

Observations are zero-padded to the task set's width (MT30: 24), actions arrive padded to 6 and each task
reads only its first ``action_dim`` entries; every row carries its task id, and rows are task-major (task k
occupies rows [k*N, (k+1)*N)). The whole thing is one pure,
jittable pytree function (:class:`~mtdistill_jax.envs.wrappers.BatchedEnv` with one group per task): each
physics structure is traced once (tasks that share one, e.g. cartpole x 4, are one ``vmap`` over all their rows;
``share_physics=False``: one trace per task),
episodes last the task set's episode length (MT30: 500 agent steps) and auto-reset; every env carries a
``first`` flag and its episode ``step`` (:class:`~mtdistill_jax.envs.wrappers.EnvState`).
"""

from __future__ import annotations

from collections.abc import Sequence

from mtdistill_jax.configs.tasks import MT30, TaskSet
from mtdistill_jax.envs.registry import make
from mtdistill_jax.envs.wrappers import BatchedEnv, EnvState
from mtdistill_jax.errors import UnknownNameError, UserError


class MultiTaskEnv(BatchedEnv):
    """``num_envs_per_task`` copies of each of ``tasks`` as one batched environment.

    ``episode_length``: agent steps per episode for every task (default: each task's length in ``task_set``);
    ``impl`` / ``impls``: the MJX implementation for all tasks / per task name; ``share_physics``: step tasks of
    one physics structure together (see :mod:`mtdistill_jax.envs.structure`). Bad arguments raise a
    :class:`~mtdistill_jax.errors.UserError` (a ``ValueError``; unknown names: ``UnknownNameError``).
    """

    def __init__(self, tasks: Sequence[str], num_envs_per_task: int = 1, task_set: TaskSet = MT30,
                 impl: str | None = None, episode_length: int | None = None, auto_reset: bool = True,
                 impls: dict[str, str] | None = None, share_physics: bool = True):
        if isinstance(tasks, str):
            raise UserError(f"tasks must be a list of task names, got the string {tasks!r}")
        if not tasks:
            raise UserError("tasks is empty; give a subset of: " + ", ".join(task_set.tasks))
        if len(set(tasks)) != len(tasks):
            raise UserError(f"tasks must be distinct, got {list(tasks)}")
        if num_envs_per_task < 1:
            raise UserError(f"num_envs_per_task must be >= 1, got {num_envs_per_task}")
        if episode_length is not None and episode_length < 1:
            raise UserError(f"episode_length must be >= 1, got {episode_length}")
        impls = dict(impls or {})
        stray = sorted(set(impls) - set(tasks))
        if stray:
            raise UnknownNameError(f"impls names tasks that are not evaluated: {stray}; tasks: {', '.join(tasks)}")
        self.tasks = tuple(tasks)
        self.task_set = task_set
        self.num_envs_per_task = int(num_envs_per_task)
        task_ids = [task_set.task_id(t) for t in self.tasks]  # UnknownNameError listing the valid names
        envs = [make(t, impl=impls.get(t, impl)) for t in self.tasks]
        self.obs_dims = [task_set.obs_dims[i] for i in task_ids]
        for t, e, od, ad in zip(self.tasks, envs, self.obs_dims, [task_set.action_dims[i] for i in task_ids],
                                strict=True):
            if e.action_size != ad:
                raise AssertionError(f"{t}: env action size {e.action_size} != task set's {ad}")
            if e.observation_size != od:
                raise AssertionError(f"{t}: env observation size {e.observation_size} != task set's {od}")
        lengths = [episode_length or task_set.episode_lengths[i] for i in task_ids]
        super().__init__(envs, num_envs_per_task, lengths, task_ids, task_set.obs_pad, task_set.action_pad,
                         auto_reset, share_physics)

    def task_render_states(self, state: EnvState, episode: int = 0) -> tuple[dict, ...]:
        """Per task (in ``tasks`` order), :meth:`render_state` of its copy number ``episode``."""
        return self.group_render_states(state, episode)
