"""Acrobot swing-up (dm_control ``acrobot.swingup``) on MJX.

The model keeps the XML's RK4 integrator (MJX implements it) and its disabled constraints.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from dm_control.suite import acrobot as dm_acrobot
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv

TARGET_MARGIN = 1.0  # smooth reward: gaussian margin (m) beyond the target radius


class AcrobotSwingup(DMCEnv):
    """Bring the tip of the two-link pendulum into the target sphere above the shoulder."""

    name = "acrobot-swingup"
    ctrl_dt = 0.01  # dm_control default: one physics step (0.01 s) per control step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = self._mj_model
        self._arms = jnp.asarray([m.body("upper_arm").id, m.body("lower_arm").id], jnp.int32)
        self._qadr = jnp.asarray([m.joint("shoulder").qposadr[0], m.joint("elbow").qposadr[0]], jnp.int32)
        self._target = m.site("target").id
        self._tip = m.site("tip").id
        self._target_radius = float(m.site_size[self._target, 0])  # 0.2 m in the stock XML

    def model_xml(self):
        return dm_acrobot.get_model_and_assets()

    def initial_state(self, rng, data):
        # shoulder and elbow angles ~ U[-pi, pi), zero velocity
        angles = jax.random.uniform(rng, (2,), minval=-jnp.pi, maxval=jnp.pi)
        return data.replace(qpos=data.qpos.at[self._qadr].set(angles.astype(data.qpos.dtype))), {}

    def observation(self, data, info):
        xmat = data.xmat[self._arms]
        obs = collections.OrderedDict()
        obs["orientations"] = jnp.concatenate([xmat[:, 0, 2], xmat[:, 2, 2]])  # (xz, xz, zz, zz)
        obs["velocity"] = data.qvel
        return obs

    def reward(self, data, info):
        dist = jnp.linalg.norm(data.site_xpos[self._target] - data.site_xpos[self._tip])
        return tolerance(dist, (0.0, self._target_radius), margin=TARGET_MARGIN)
