"""Tasks that share one physics structure, stepped as one vmapped MJX program.

Many MT30 tasks differ only in their reward, observation and reset, not in their physics: walker
stand/walk/run and the backwards variants, the cheetah family, cartpole x 4, finger x 3, hopper x 3, reacher
easy/hard, pendulum x 2, cup x 2. :func:`group_by_structure` puts such tasks into one :class:`Structure`,
whose physics is traced once and vmapped over the rows of all its tasks, with the few model fields that differ
(e.g. a floor's length, finger spin's hinge damping) stacked per row, the way MuJoCo Playground vmaps model
fields for domain randomisation. Each task keeps its own reward, observation and initial-state draw, evaluated
on its own rows (static slices). A program over all 30 tasks so traces 11 physics structures instead of 30.

Two tasks share a structure when their MJX models have the same pytree structure and static fields
(up to :data:`RENDER_ONLY_FIELDS`, which MJX physics does not read), the same implementation ('jax'), control
step, action repeat, control ranges and per-episode ``info`` layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mujoco import mjx

from mtdistill_jax.envs.base import DMCEnv, State, advance, first_state

# Static (numpy) mjx.Model fields that only rendering reads: tasks that differ only there share their physics
# (finger turn-easy / turn-hard differ in the target site's size, which no sensor or constraint uses).
RENDER_ONLY_FIELDS = ("site_size", "site_rgba", "geom_rgba", "mat_rgba")


def _canonical(model: mjx.Model, like: mjx.Model) -> mjx.Model:
    """``model`` with its render-only static fields taken from ``like``."""
    rep = {f: getattr(like, f) for f in RENDER_ONLY_FIELDS
           if hasattr(model, f) and isinstance(getattr(model, f), np.ndarray)}
    return dataclasses.replace(model, **rep)


def _info_layout(env: DMCEnv):
    """Shapes and dtypes of a task's per-episode ``info``."""
    return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), env.reset_shape.info)


def _physics_key(env: DMCEnv) -> tuple:
    """What must be equal for two tasks to share one physics trace (the model compared apart)."""
    return (type(env).control_step, type(env).finish_reset, env.impl, env.n_sub_steps,
            int(env._config.action_repeat), np.asarray(env._ctrl_lo).tobytes(), np.asarray(env._ctrl_hi).tobytes())


def same_structure(a: DMCEnv, b: DMCEnv) -> bool:
    """Whether ``a`` and ``b`` can be stepped as one vmapped physics program."""
    if a.impl != "jax" or _physics_key(a) != _physics_key(b):
        return False
    ma, mb = a.mjx_model, _canonical(b.mjx_model, a.mjx_model)
    if jax.tree_util.tree_structure(ma) != jax.tree_util.tree_structure(mb):
        return False
    if any(x.shape != y.shape or x.dtype != y.dtype
           for x, y in zip(jax.tree_util.tree_leaves(ma), jax.tree_util.tree_leaves(mb), strict=True)):
        return False
    return _info_layout(a) == _info_layout(b)


def group_by_structure(envs: Sequence[DMCEnv]) -> list[list[int]]:
    """Indices of ``envs`` grouped by physics structure, groups in order of first appearance."""
    groups: list[list[int]] = []
    for i, e in enumerate(envs):
        for g in groups:
            if same_structure(envs[g[0]], e):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _rows(tree, sl: slice):
    return jax.tree_util.tree_map(lambda x: x[sl], tree)


def _cat(trees):
    return trees[0] if len(trees) == 1 else jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *trees)


class Structure:
    """``envs`` (tasks of one physics structure) with ``copies`` rows each, task after task.

    ``model`` is the first task's MJX model with the fields that differ between the tasks stacked per row
    (``in_axes`` 0 in :attr:`model_axes`, None elsewhere); :meth:`reset` and :meth:`step` work on a
    :class:`State` whose leaves lead with the structure's rows and whose ``obs`` is zero-padded to
    :attr:`obs_width`, the widest of its tasks' observations (a single task's state is then the same as the
    vmapped task's own, which keeps checkpoints of one-task structures loadable across versions).
    """

    def __init__(self, envs: Sequence[DMCEnv], copies: int):
        self.envs = tuple(envs)
        self.rep = self.envs[0]
        for e in self.envs[1:]:
            if not same_structure(self.rep, e):
                raise ValueError(f"{e.name} does not share {self.rep.name}'s physics structure")
        self.copies = int(copies)
        self.obs_width = max(e.observation_size for e in self.envs)
        self.num_rows = len(self.envs) * self.copies
        self.slices = [slice(k * self.copies, (k + 1) * self.copies) for k in range(len(self.envs))]
        models = [self.rep.mjx_model] + [_canonical(e.mjx_model, self.rep.mjx_model) for e in self.envs[1:]]
        leaves = [jax.tree_util.tree_leaves(m) for m in models]
        treedef = jax.tree_util.tree_structure(models[0])
        stacked, axes = [], []
        for per_task in zip(*leaves, strict=True):
            if all(np.array_equal(np.asarray(per_task[0]), np.asarray(x)) for x in per_task[1:]):
                stacked.append(per_task[0])
                axes.append(None)
            else:
                stacked.append(jnp.repeat(jnp.stack(per_task), self.copies, axis=0))
                axes.append(0)
        self.model = jax.tree_util.tree_unflatten(treedef, stacked)
        self.model_axes = jax.tree_util.tree_unflatten(treedef, axes)
        self.varying_fields = sum(a == 0 for a in axes)  # how many model leaves differ between the tasks

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.envs)

    # Per-task pieces, each on the task's own rows.

    def _per_task(self, fn, *trees):
        if len(self.envs) == 1:
            return fn(self.envs[0], *trees)
        return _cat([fn(e, *(_rows(t, sl) for t in trees)) for e, sl in zip(self.envs, self.slices, strict=True)])

    def _pad(self, obs):
        return jnp.pad(obs, ((0, 0), (0, self.obs_width - obs.shape[-1])))

    def _obs(self, data, info, data_pre=None):
        return self._per_task(lambda e, d, i, p: self._pad(jax.vmap(e.get_obs)(d, i, p)), data, info, data_pre)

    def _reward(self, data, info):
        return self._per_task(lambda e, d, i: jax.vmap(e.reward)(d, i), data, info)

    # The shared physics, vmapped over every row with its own model fields.

    def _physics(self, data, ctrl):
        return jax.vmap(lambda m, d, c: self.rep.control_step(d, c, m), in_axes=(self.model_axes, 0, 0))(
            self.model, data, ctrl)

    def reset(self, keys: Sequence[jax.Array]) -> State:
        """First states of every row; ``keys[k]``: [copies] keys of task ``k``'s rows."""
        def draw(e, k):
            data0 = e.make_data()
            return jax.vmap(lambda r: e.initial_state(r, data0))(k)

        data, info = _cat([draw(e, k) for e, k in zip(self.envs, keys, strict=True)])
        data = jax.vmap(lambda m, d: self.rep.finish_reset(d, m), in_axes=(self.model_axes, 0))(self.model, data)
        return first_state(data, info, self._obs, (self.num_rows,))

    def step(self, state: State, action: jax.Array) -> State:
        """``action``: [rows, action_size] in [-1, 1]."""
        ctrl = jax.vmap(self.rep.scale_action)(action)
        return advance(state, ctrl, self._physics, self._reward, self._obs, int(self.rep._config.action_repeat))

    def state_from_physics(self, qpos, qvel, act=None, time=None, ctrl=None, qacc_warmstart=None,
                           info: dict[str, Any] | None = None) -> State:
        """Forwarded states of every row at given physics states: :meth:`DMCEnv.state_from_physics` row by row
        with each row's model fields (e.g. states recorded from dm_control, replayed task by task).

        Every argument leads with the structure's :attr:`num_rows` rows, task after task (``info``: each
        leaf of the tasks' common per-episode layout, without ``step``); ``act``, ``ctrl`` and
        ``qacc_warmstart`` may be None (zeros), ``time`` too.
        """
        rows = self.num_rows
        if np.shape(qpos)[:1] != (rows,) or np.shape(qvel)[:1] != (rows,):
            raise ValueError(f"qpos and qvel must lead with the structure's {rows} rows "
                             f"({len(self.envs)} tasks x {self.copies} copies), got {np.shape(qpos)} and "
                             f"{np.shape(qvel)}")
        time = jnp.zeros((rows,)) if time is None else time
        if act is not None and not np.size(act):
            act = None
        data = jax.vmap(self.rep.physics_data, in_axes=(0, 0, 0, 0, 0, 0, self.model_axes))(
            qpos, qvel, act, time, ctrl, qacc_warmstart, self.model)
        return first_state(data, info, self._obs, (rows,))

    def render_state(self, state: State, task: int, copy: int) -> dict[str, Any]:
        p = jax.tree_util.tree_map(lambda x: x[task * self.copies + copy], state)
        return {"qpos": p.data.qpos, "qvel": p.data.qvel, "act": p.data.act, "info": p.info}
