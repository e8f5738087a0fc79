"""Task registry: MT30 names (official order) -> MJX environment constructors.

``make(name, **kwargs)`` builds one task; unknown names raise an ``UnknownNameError`` (a ``KeyError``)
listing the valid ones; Meta-World (``mw-*``) tasks of MT80 have no MJX version and say so.
"""

from __future__ import annotations

import importlib

from mtdistill_jax.configs.tasks import METAWORLD_TASKS, MT30_TASKS
from mtdistill_jax.errors import UnknownNameError

# name -> "module:Class" (modules are imported lazily: building one task does not import the others)
_TASKS: dict[str, str] = {
    "walker-stand": "dmc.walker:WalkerStand",
    "walker-walk": "dmc.walker:WalkerWalk",
    "walker-run": "dmc.walker:WalkerRun",
    "cheetah-run": "dmc.cheetah:CheetahRun",
    "reacher-easy": "dmc.reacher:ReacherEasy",
    "reacher-hard": "dmc.reacher:ReacherHard",
    "acrobot-swingup": "dmc.acrobot:AcrobotSwingup",
    "pendulum-swingup": "dmc.pendulum:PendulumSwingup",
    "cartpole-balance": "dmc.cartpole:CartpoleBalance",
    "cartpole-balance-sparse": "dmc.cartpole:CartpoleBalanceSparse",
    "cartpole-swingup": "dmc.cartpole:CartpoleSwingup",
    "cartpole-swingup-sparse": "dmc.cartpole:CartpoleSwingupSparse",
    "cup-catch": "dmc.ball_in_cup:CupCatch",
    "finger-spin": "dmc.finger:FingerSpin",
    "finger-turn-easy": "dmc.finger:FingerTurnEasy",
    "finger-turn-hard": "dmc.finger:FingerTurnHard",
    "fish-swim": "dmc.fish:FishSwim",
    "hopper-stand": "dmc.hopper:HopperStand",
    "hopper-hop": "dmc.hopper:HopperHop",
    "walker-walk-backwards": "custom.walker:WalkerWalkBackwards",
    "walker-run-backwards": "custom.walker:WalkerRunBackwards",
    "cheetah-run-backwards": "custom.cheetah:CheetahRunBackwards",
    "cheetah-run-front": "custom.cheetah:CheetahRunFront",
    "cheetah-run-back": "custom.cheetah:CheetahRunBack",
    "cheetah-jump": "custom.cheetah:CheetahJump",
    "hopper-hop-backwards": "custom.hopper:HopperHopBackwards",
    "reacher-three-easy": "custom.reacher:ReacherThreeEasy",
    "reacher-three-hard": "custom.reacher:ReacherThreeHard",
    "cup-spin": "custom.ball_in_cup:CupSpin",
    "pendulum-spin": "custom.pendulum:PendulumSpin",
}
assert tuple(_TASKS) == MT30_TASKS

# MJX implementation per task and platform, chosen with benchmarks/envs.py (lax.scan harness, 2-core CPU, all
# 30 tasks at N = 1 / 64 / 256, README tables): impl="jax" is faster than "warp" for every task and N on CPU
# (e.g. walker-walk 98 / 151 / 126 vs 4 / 218 / dropped contacts; pendulum-swingup 4381 / 193313 / 252960 vs
# 34 / 2106 / 6539), and warp's contact buffer is shared by vmapped worlds, so batched contact-rich runs drop
# contacts. No GPU was available to measure: other platforms use "jax" too until measured. Both stay
# selectable with make(name, impl=...).
DEFAULT_IMPL: dict[str, dict[str, str]] = {"cpu": {name: "jax" for name in _TASKS}}


def default_impl(name: str, platform: str | None = None) -> str:
    """The measured default MJX implementation of a task on ``platform`` (default: JAX's default backend)."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return DEFAULT_IMPL.get(platform, {}).get(name, "jax")


def task_names() -> tuple[str, ...]:
    """All MT30 task names in the official order."""
    return MT30_TASKS


def get_env_class(name: str):
    if name in METAWORLD_TASKS or name.startswith("mw-"):
        raise UnknownNameError(f"{name!r} is a Meta-World task of MT80: there is no MJX version of Meta-World, so MT80 "
                       "is supported offline only (datasets and checkpoints); MJX tasks: the 30 MT30 tasks")
    if name not in _TASKS:
        raise UnknownNameError(f"unknown task {name!r}; valid: {', '.join(MT30_TASKS)}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(f"mtdistill_jax.envs.{module}"), cls)


def make(name: str, config=None, config_overrides: dict | None = None, impl: str | None = None):
    """Build the MJX environment of an MT30 task.

    ``impl`` ('jax' or 'warp') overrides the config's MJX implementation; without it (and without an
    explicit ``config``) the measured per-task default of :data:`DEFAULT_IMPL` is used.
    """
    cls = get_env_class(name)
    if impl is None and config is None and "impl" not in (config_overrides or {}):
        impl = default_impl(name)
    if impl is not None:
        config_overrides = {**(config_overrides or {}), "impl": impl}
    return cls(config=config, config_overrides=config_overrides)
