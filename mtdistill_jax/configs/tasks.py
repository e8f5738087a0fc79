"""Task sets of TD-MPC2: MT30 (DMControl) and MT80 (MT30 + Meta-World MT50).

Task ids are indices into the official task lists (the order is part of every checkpoint: row ``i`` of the
task embedding belongs to ``tasks[i]``). Dimensions are the unpadded per-task observation and action sizes
of the official environments; observations are zero-padded to ``obs_pad`` and actions to ``action_pad``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mtdistill_jax.errors import UnknownNameError, UserError

# 19 stock DeepMind Control tasks followed by the 11 custom TD-MPC2 tasks, in the official order.
MT30_TASKS: tuple[str, ...] = (
    "walker-stand", "walker-walk", "walker-run", "cheetah-run", "reacher-easy",
    "reacher-hard", "acrobot-swingup", "pendulum-swingup", "cartpole-balance", "cartpole-balance-sparse",
    "cartpole-swingup", "cartpole-swingup-sparse", "cup-catch", "finger-spin", "finger-turn-easy",
    "finger-turn-hard", "fish-swim", "hopper-stand", "hopper-hop",
    "walker-walk-backwards", "walker-run-backwards", "cheetah-run-backwards", "cheetah-run-front",
    "cheetah-run-back", "cheetah-jump", "hopper-hop-backwards", "reacher-three-easy", "reacher-three-hard",
    "cup-spin", "pendulum-spin",
)  # fmt: skip

MT30_OBS_DIMS: tuple[int, ...] = (
    24, 24, 24, 17, 6, 6, 6, 3, 5, 5, 5, 5, 8, 9, 12, 12, 24, 15, 15,
    24, 24, 17, 17, 17, 17, 15, 8, 8, 8, 3,
)  # fmt: skip
MT30_ACTION_DIMS: tuple[int, ...] = (
    6, 6, 6, 6, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 5, 4, 4,
    6, 6, 6, 6, 6, 6, 4, 3, 3, 2, 1,
)  # fmt: skip

# Meta-World MT50 in the official MT80 order (goal-observable v2 tasks: 39-d obs, 4-d actions, 100 steps).
METAWORLD_TASKS: tuple[str, ...] = (
    "mw-assembly", "mw-basketball", "mw-button-press-topdown", "mw-button-press-topdown-wall", "mw-button-press",
    "mw-button-press-wall", "mw-coffee-button", "mw-coffee-pull", "mw-coffee-push", "mw-dial-turn",
    "mw-disassemble", "mw-door-open", "mw-door-close", "mw-drawer-close", "mw-drawer-open",
    "mw-faucet-open", "mw-faucet-close", "mw-hammer", "mw-handle-press-side", "mw-handle-press",
    "mw-handle-pull-side", "mw-handle-pull", "mw-lever-pull", "mw-peg-insert-side", "mw-peg-unplug-side",
    "mw-pick-out-of-hole", "mw-pick-place", "mw-pick-place-wall", "mw-plate-slide", "mw-plate-slide-side",
    "mw-plate-slide-back", "mw-plate-slide-back-side", "mw-push-back", "mw-push", "mw-push-wall",
    "mw-reach", "mw-reach-wall", "mw-shelf-place", "mw-soccer", "mw-stick-push",
    "mw-stick-pull", "mw-sweep-into", "mw-sweep", "mw-window-open", "mw-window-close",
    "mw-bin-picking", "mw-box-close", "mw-door-lock", "mw-door-unlock", "mw-hand-insert",
)  # fmt: skip

DMC_EPISODE_LENGTH = 500  # 1000 physics control steps with action repeat 2
METAWORLD_EPISODE_LENGTH = 100  # official Timeout(max_episode_steps=100), action repeat 2

# Official discount heuristic (TDMPC2._get_discount): frac = L / denom, clip((frac - 1) / frac, min, max).
DISCOUNT_DENOM = 5
DISCOUNT_MIN = 0.95
DISCOUNT_MAX = 0.995


def discount_for_episode_length(episode_length: int, denom: float = DISCOUNT_DENOM,
                                low: float = DISCOUNT_MIN, high: float = DISCOUNT_MAX) -> float:
    """Per-task discount of the official code: ``clip((L/denom - 1) / (L/denom), low, high)``."""
    if episode_length <= 0:
        raise ValueError(f"episode_length must be positive, got {episode_length}")
    frac = episode_length / denom
    return float(min(max((frac - 1) / frac, low), high))


def task_discounts(config) -> np.ndarray:
    """Per-task discounts ``[num_tasks]`` (float32) of ``config.model.task_set``, each
    :func:`discount_for_episode_length` of the task's episode length with ``config.train``'s
    ``discount_denom`` / ``discount_min`` / ``discount_max``."""
    ts, tc = get_task_set(config.model.task_set), config.train
    return np.asarray([discount_for_episode_length(L, tc.discount_denom, tc.discount_min, tc.discount_max)
                       for L in ts.episode_lengths], np.float32)


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A named, ordered list of tasks; the task id of ``tasks[i]`` is ``i``."""

    name: str
    tasks: tuple[str, ...]
    obs_dims: tuple[int, ...]
    action_dims: tuple[int, ...]
    episode_lengths: tuple[int, ...]
    obs_pad: int
    action_pad: int

    def __post_init__(self):
        n = len(self.tasks)
        for field in ("obs_dims", "action_dims", "episode_lengths"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{self.name}: {field} has {len(getattr(self, field))} entries, tasks has {n}")
        if max(self.obs_dims) > self.obs_pad or max(self.action_dims) > self.action_pad:
            raise ValueError(f"{self.name}: padding ({self.obs_pad}, {self.action_pad}) smaller than a task")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def discounts(self) -> tuple[float, ...]:
        return tuple(discount_for_episode_length(L) for L in self.episode_lengths)

    def task_id(self, name: str) -> int:
        """Index of ``name``; unknown names raise an :class:`UnknownNameError` (a ``KeyError``) listing the valid
        ones."""
        try:
            return self.tasks.index(name)
        except ValueError:
            raise UnknownNameError(f"unknown task {name!r} for task set {self.name}; valid: "
                                   f"{', '.join(self.tasks)}") from None

    def select(self, names: Sequence[str] | None = None) -> list[str]:
        """``names`` (default: all tasks), checked: unknown names raise an :class:`UnknownNameError` listing
        the valid ones, a repeated name a :class:`UserError`."""
        names = list(names or self.tasks)
        unknown = [t for t in names if t not in self.tasks]
        if unknown:
            raise UnknownNameError(f"unknown tasks {unknown} for {self.name}; valid: {', '.join(self.tasks)}")
        repeated = sorted({t for t in names if names.count(t) > 1})
        if repeated:
            raise UserError(f"tasks must be distinct; repeated: {', '.join(repeated)}")
        return names

    def task_ids(self, names: Sequence[str]) -> list[int]:
        return [self.task_id(n) for n in names]


MT30 = TaskSet(
    name="mt30",
    tasks=MT30_TASKS,
    obs_dims=MT30_OBS_DIMS,
    action_dims=MT30_ACTION_DIMS,
    episode_lengths=(DMC_EPISODE_LENGTH,) * len(MT30_TASKS),
    obs_pad=24,
    action_pad=6,
)

MT80 = TaskSet(
    name="mt80",
    tasks=MT30_TASKS + METAWORLD_TASKS,
    obs_dims=MT30_OBS_DIMS + (39,) * len(METAWORLD_TASKS),
    action_dims=MT30_ACTION_DIMS + (4,) * len(METAWORLD_TASKS),
    episode_lengths=(DMC_EPISODE_LENGTH,) * len(MT30_TASKS) + (METAWORLD_EPISODE_LENGTH,) * len(METAWORLD_TASKS),
    obs_pad=39,
    action_pad=6,
)

TASK_SETS: dict[str, TaskSet] = {"mt30": MT30, "mt80": MT80}


def get_task_set(name: str) -> TaskSet:
    """Look a task set up by name (``mt30`` or ``mt80``, case-insensitive)."""
    key = name.lower()
    if key not in TASK_SETS:
        raise UnknownNameError(f"unknown task set {name!r}; valid: {', '.join(TASK_SETS)}")
    return TASK_SETS[key]
