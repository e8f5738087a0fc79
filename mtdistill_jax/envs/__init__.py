"""MT30 tasks as MJX environments with TD-MPC2 semantics (see registry.make).

Rendering uses MuJoCo's renderer; without a display it needs ``MUJOCO_GL=egl`` (the default set here when
unset, before mujoco is imported) or ``osmesa``.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from mtdistill_jax.envs.registry import make, task_names  # noqa: E402

__all__ = ["make", "task_names"]
