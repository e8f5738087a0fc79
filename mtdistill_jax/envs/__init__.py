"""MT30 tasks as MJX environments with TD-MPC2 semantics (see registry.make)."""

from mtdistill_jax.envs.registry import make, task_names

__all__ = ["make", "task_names"]
