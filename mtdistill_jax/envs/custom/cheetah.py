"""cheetah-run-backwards / -run-front / -run-back / -jump (TD-MPC2 custom tasks) on MJX.

All four use the stock cheetah (reset, observations, speed) with a ground plane twice as long; only the
reward differs (see ``CUSTOM_TASKS.md``).
"""

from __future__ import annotations

from dm_control.suite import cheetah as dm_cheetah
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import with_plane_half_length
from mtdistill_jax.envs.dmc.cheetah import RUN_SPEED, _Cheetah

GROUND_HALF_LENGTH = 200.0  # TD-MPC2's cheetah ground half-length (m); the stock ground is 100
BACKWARDS_SPEED = 0.8 * RUN_SPEED  # run-backwards target speed towards -x (8 m/s)
ONE_FOOT_SPEED = 0.6 * RUN_SPEED  # run-front / run-back target speed (6 m/s)
JUMP_SPEED = 0.5  # jump: horizontal speed band (-0.5, 0.5) m/s, linear margin 0.5
UP_HEIGHT = 1.2  # height (m) above which torso / lifted foot count as up (gaussian margin UP_HEIGHT / 2)


def custom_cheetah_xml() -> tuple[str, dict[str, bytes]]:
    """The stock dm_control cheetah with the ground plane's half-length set to ``GROUND_HALF_LENGTH``."""
    xml, assets = dm_cheetah.get_model_and_assets()
    return with_plane_half_length(xml, "ground", GROUND_HALF_LENGTH), assets


def _up(height):
    """1 at or above ``UP_HEIGHT``, gaussian fall-off (0.1 at ``UP_HEIGHT / 2`` below)."""
    return tolerance(height, (UP_HEIGHT, float("inf")), margin=UP_HEIGHT / 2)


class _CustomCheetah(_Cheetah):
    """Stock cheetah with TD-MPC2's longer ground."""

    def model_xml(self):
        return custom_cheetah_xml()

    def _z(self, data, body):
        return data.xpos[body, 2]

    def _run_on_one_foot(self, data, lifted_foot):
        """Torso and ``lifted_foot`` high, moving forwards at ``ONE_FOOT_SPEED`` or faster."""
        up = (3 * _up(self._z(data, lifted_foot)) + 2 * _up(self._z(data, self._torso))) / 5
        move = tolerance(self.speed(data), (ONE_FOOT_SPEED, float("inf")), margin=ONE_FOOT_SPEED,
                         value_at_margin=0.0, sigmoid="linear")
        return up * (5 * move + 1) / 6

    def _stand_on_one_foot(self, data, lifted_foot):
        """Mean height of torso and ``lifted_foot`` high, with little horizontal speed."""
        height = _up((self._z(data, self._torso) + self._z(data, lifted_foot)) / 2)
        still = tolerance(self.speed(data), (-JUMP_SPEED, JUMP_SPEED), margin=JUMP_SPEED, value_at_margin=0.0,
                          sigmoid="linear")
        return (5 * height + still) / 6


class CheetahRunBackwards(_CustomCheetah):
    """Run towards -x at ``BACKWARDS_SPEED`` or faster."""

    name = "cheetah-run-backwards"

    def reward(self, data, info):
        return tolerance(self.speed(data), (-float("inf"), -BACKWARDS_SPEED), margin=BACKWARDS_SPEED,
                         value_at_margin=0.0, sigmoid="linear")


class CheetahRunFront(_CustomCheetah):
    """Run forwards on the front foot (back foot lifted)."""

    name = "cheetah-run-front"

    def reward(self, data, info):
        return self._run_on_one_foot(data, self._bfoot)


class CheetahRunBack(_CustomCheetah):
    """Run forwards on the back foot (front foot lifted)."""

    name = "cheetah-run-back"

    def reward(self, data, info):
        return self._run_on_one_foot(data, self._ffoot)


class CheetahJump(_CustomCheetah):
    """Mean of standing on the front foot and standing on the back foot (i.e. jump up in place)."""

    name = "cheetah-jump"

    def reward(self, data, info):
        return (self._stand_on_one_foot(data, self._bfoot) + self._stand_on_one_foot(data, self._ffoot)) / 2
