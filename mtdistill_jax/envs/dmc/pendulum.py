"""Pendulum swing-up (dm_control ``pendulum.swingup``) on MJX."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from dm_control.suite import pendulum as dm_pendulum
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv

COSINE_BOUND = float(np.cos(np.deg2rad(8)))  # upright within 8 degrees


class _Pendulum(DMCEnv):
    ctrl_dt = 0.02  # dm_control default: one physics step per control step

    def model_xml(self):
        return dm_pendulum.get_model_and_assets()

    def initial_state(self, rng, data):
        # hinge angle ~ U[-pi, pi), zero velocity
        angle = jax.random.uniform(rng, (), minval=-jnp.pi, maxval=jnp.pi)
        return data.replace(qpos=data.qpos.at[0].set(angle)), {}

    def _pole(self):
        return self._mj_model.body("pole").id

    def observation(self, data, info):
        xmat = data.xmat[self._pole()]
        obs = collections.OrderedDict()
        obs["orientation"] = jnp.stack([xmat[2, 2], xmat[0, 2]])  # (zz, xz)
        obs["velocity"] = data.qvel[:1]
        return obs


class PendulumSwingup(_Pendulum):
    name = "pendulum-swingup"

    def reward(self, data, info):
        return tolerance(data.xmat[self._pole()][2, 2], (COSINE_BOUND, 1.0))
