"""walker-walk-backwards / walker-run-backwards (TD-MPC2 custom tasks) on MJX."""

from __future__ import annotations

from dm_control.suite import walker as dm_walker
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import with_plane_half_length
from mtdistill_jax.envs.dmc.walker import RUN_SPEED, WALK_SPEED, _Walker

FLOOR_HALF_LENGTH = 500.0  # TD-MPC2's walker floor half-length (m); the stock floor is 250


def backwards_walker_xml() -> tuple[str, dict[str, bytes]]:
    """The stock dm_control walker with the floor plane's half-length set to ``FLOOR_HALF_LENGTH``."""
    xml, assets = dm_walker.get_model_and_assets()
    return with_plane_half_length(xml, "floor", FLOOR_HALF_LENGTH), assets


class _BackwardsWalker(_Walker):
    """Stock walker observations and stand reward; the move term rewards speed towards -x."""

    def model_xml(self):
        return backwards_walker_xml()

    def _move_reward(self, data):
        return tolerance(self._horizontal_velocity(data), (-float("inf"), -self.move_speed),
                         margin=self.move_speed / 2, value_at_margin=0.5, sigmoid="linear")


class WalkerWalkBackwards(_BackwardsWalker):
    """Stand and move backwards at 1 m/s or more."""

    name = "walker-walk-backwards"
    move_speed = WALK_SPEED


class WalkerRunBackwards(_BackwardsWalker):
    """Stand and move backwards at 8 m/s or more."""

    name = "walker-run-backwards"
    move_speed = RUN_SPEED
