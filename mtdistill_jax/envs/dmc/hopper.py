"""Planar hopper stand / hop (dm_control ``hopper``) on MJX."""

from __future__ import annotations

import collections

import jax.numpy as jnp
from dm_control.suite import hopper as dm_hopper
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv, randomize_limited_and_rotational_joints

STAND_HEIGHT = 0.6  # torso-over-foot height (m) above which the standing term is 1 (upper bound 2)
HOP_SPEED = 2.0  # hop: target forward centre-of-mass speed (m/s)


class _Hopper(DMCEnv):
    """Shared model, initialisation, observation and standing term of the hopper tasks."""

    ctrl_dt = 0.02  # dm_control hopper control timestep (4 physics steps of 0.005 s)
    touch_sensors = ("touch_toe", "touch_heel")  # acceleration-stage sensors of the 'touch' observation

    def model_xml(self):
        return dm_hopper.get_model_and_assets()

    def _ids(self):
        m = self._mj_model
        speed_adr = int(m.sensor_adr[m.sensor("torso_subtreelinvel").id])
        touch_adr = [int(m.sensor_adr[m.sensor(s).id]) for s in self.touch_sensors]
        return m.body("torso").id, m.body("foot").id, speed_adr, touch_adr

    def initial_state(self, rng, data):
        # limited joints uniform in range, the free hinge rooty uniform in [-pi, pi]; rootx/rootz and qvel zero
        qpos = randomize_limited_and_rotational_joints(rng, self._mj_model, data.qpos)
        return data.replace(qpos=qpos), {}

    def observation(self, data, info):
        _, _, _, touch_adr = self._ids()
        obs = collections.OrderedDict()
        obs["position"] = data.qpos[1:]  # all but rootx (translation invariance)
        obs["velocity"] = data.qvel
        obs["touch"] = jnp.log1p(data.sensordata[jnp.asarray(touch_adr)])
        return obs

    def _height(self, data):
        torso, foot, _, _ = self._ids()
        return data.xipos[torso, 2] - data.xipos[foot, 2]

    def _speed(self, data):
        _, _, adr, _ = self._ids()
        return data.sensordata[adr]  # x component of the torso subtree linear velocity

    def _standing(self, data):
        return tolerance(self._height(data), (STAND_HEIGHT, 2.0))


class HopperStand(_Hopper):
    """Stand upright with small controls."""

    name = "hopper-stand"

    def reward(self, data, info):
        small_control = jnp.mean(tolerance(data.ctrl, margin=1, value_at_margin=0, sigmoid="quadratic"))
        return self._standing(data) * (small_control + 4) / 5


class HopperHop(_Hopper):
    """Hop forward at 2 m/s or more."""

    name = "hopper-hop"

    def reward(self, data, info):
        hopping = tolerance(self._speed(data), (HOP_SPEED, float("inf")), margin=HOP_SPEED / 2,
                            value_at_margin=0.5, sigmoid="linear")
        return self._standing(data) * hopping
