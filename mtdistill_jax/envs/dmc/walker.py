"""Planar walker stand / walk / run (dm_control ``walker``) on MJX."""

from __future__ import annotations

import collections

import jax.numpy as jnp
from dm_control.suite import walker as dm_walker
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv, randomize_limited_and_rotational_joints

STAND_HEIGHT = 1.2  # torso height (m) above which the standing term is 1
WALK_SPEED = 1.0  # walk: target horizontal centre-of-mass speed (m/s)
RUN_SPEED = 8.0  # run: target horizontal centre-of-mass speed (m/s)


class _Walker(DMCEnv):
    """Shared model, initialisation, observation and stand/move reward of the walker tasks."""

    ctrl_dt = 0.025  # dm_control walker control timestep (10 physics steps of 0.0025 s)
    move_speed = 0.0  # target horizontal speed; 0: stand task (no move term)

    def model_xml(self):
        return dm_walker.get_model_and_assets()

    def _ids(self):
        m = self._mj_model
        torso = m.body("torso").id
        sensor = m.sensor("torso_subtreelinvel")
        return torso, int(m.sensor_adr[sensor.id])

    def initial_state(self, rng, data):
        # limited joints uniform in range, the free hinge rooty uniform in [-pi, pi]; zero velocity
        qpos = randomize_limited_and_rotational_joints(rng, self._mj_model, data.qpos)
        return data.replace(qpos=qpos), {}

    def observation(self, data, info):
        torso, _ = self._ids()
        obs = collections.OrderedDict()
        obs["orientations"] = jnp.stack([data.xmat[1:, 0, 0], data.xmat[1:, 0, 2]], axis=-1).ravel()  # (xx, xz)
        obs["height"] = data.xpos[torso, 2]
        obs["velocity"] = data.qvel
        return obs

    def _stand_reward(self, data):
        torso, _ = self._ids()
        standing = tolerance(data.xpos[torso, 2], (STAND_HEIGHT, float("inf")), margin=STAND_HEIGHT / 2)
        upright = (1 + data.xmat[torso, 2, 2]) / 2
        return (3 * standing + upright) / 4

    def _horizontal_velocity(self, data):
        _, adr = self._ids()
        return data.sensordata[adr]  # x component of the torso subtree linear velocity

    def _move_reward(self, data):
        return tolerance(self._horizontal_velocity(data), (self.move_speed, float("inf")),
                         margin=self.move_speed / 2, value_at_margin=0.5, sigmoid="linear")

    def reward(self, data, info):
        stand = self._stand_reward(data)
        if self.move_speed == 0:
            return stand
        return stand * (5 * self._move_reward(data) + 1) / 6


class WalkerStand(_Walker):
    """Stand up tall and upright."""

    name = "walker-stand"


class WalkerWalk(_Walker):
    """Stand and move forward at 1 m/s or more."""

    name = "walker-walk"
    move_speed = WALK_SPEED


class WalkerRun(_Walker):
    """Stand and move forward at 8 m/s or more."""

    name = "walker-run"
    move_speed = RUN_SPEED
