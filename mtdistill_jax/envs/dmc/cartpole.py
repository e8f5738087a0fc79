"""Cartpole balance / swing-up, smooth and sparse (dm_control ``cartpole``) on MJX."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from dm_control.suite import cartpole as dm_cartpole
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv

CART_RANGE = (-0.25, 0.25)  # sparse reward: cart within
ANGLE_COSINE_RANGE = (0.995, 1.0)  # sparse reward: pole cosine within


class _Cartpole(DMCEnv):
    ctrl_dt = 0.01  # one physics step per control step
    swing_up = False
    sparse = False

    def model_xml(self):
        return dm_cartpole.get_model_and_assets(num_poles=1)

    def initial_state(self, rng, data):
        k1, k2, k3 = jax.random.split(rng, 3)
        nv = self._mj_model.nv
        if self.swing_up:
            slider = 0.01 * jax.random.normal(k1)
            hinge = jnp.pi + 0.01 * jax.random.normal(k2)
        else:
            slider = jax.random.uniform(k1, minval=-0.1, maxval=0.1)
            hinge = jax.random.uniform(k2, minval=-0.034, maxval=0.034)
        qpos = data.qpos.at[0].set(slider).at[1].set(hinge)
        qvel = 0.01 * jax.random.normal(k3, (nv,))
        return data.replace(qpos=qpos, qvel=qvel.astype(data.qvel.dtype)), {}

    def _pole_zz_xz(self, data):
        xmat = data.xmat[2:]  # bodies after world and cart: the pole(s)
        return xmat[:, 2, 2], xmat[:, 0, 2]

    def observation(self, data, info):
        zz, xz = self._pole_zz_xz(data)
        obs = collections.OrderedDict()
        obs["position"] = jnp.concatenate([data.qpos[:1], jnp.stack([zz, xz], axis=-1).ravel()])
        obs["velocity"] = data.qvel
        return obs

    def reward(self, data, info):
        cart = data.qpos[0]
        cos, _ = self._pole_zz_xz(data)
        if self.sparse:
            return tolerance(cart, CART_RANGE) * jnp.prod(tolerance(cos, ANGLE_COSINE_RANGE))
        upright = (cos + 1) / 2
        centered = (1 + tolerance(cart, margin=2)) / 2
        small_control = tolerance(data.ctrl, margin=1, value_at_margin=0, sigmoid="quadratic")[0]
        small_control = (4 + small_control) / 5
        small_velocity = (1 + jnp.min(tolerance(data.qvel[1:], margin=5))) / 2
        return jnp.mean(upright) * small_control * small_velocity * centered


class CartpoleBalance(_Cartpole):
    name = "cartpole-balance"


class CartpoleBalanceSparse(_Cartpole):
    name = "cartpole-balance-sparse"
    sparse = True


class CartpoleSwingup(_Cartpole):
    name = "cartpole-swingup"
    swing_up = True


class CartpoleSwingupSparse(_Cartpole):
    name = "cartpole-swingup-sparse"
    swing_up = True
    sparse = True
