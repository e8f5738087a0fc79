"""Reacher easy / hard (dm_control ``reacher``) on MJX.

dm_control randomises the target at reset by writing model fields (the ``target`` geom's position, and its
size for the hard task). Here the target lives in ``state.info`` (``target_pos``: its (x, y, z) world position;
``target_size``: its radius) and enters only the observation and the reward. The target geom cannot collide
(contacts are disabled in the reacher model and the geom is a world geom), so the physics is unaffected.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from dm_control.suite import reacher as dm_reacher
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv, randomize_limited_and_rotational_joints

BIG_TARGET = 0.05  # target radius of the easy task (dm_control _BIG_TARGET)
SMALL_TARGET = 0.015  # target radius of the hard task (dm_control _SMALL_TARGET)
TARGET_RADIUS_RANGE = (0.05, 0.20)  # distance of the target from the shoulder axis, sampled uniformly


class _Reacher(DMCEnv):
    """Planar reacher: bring the fingertip into a randomly placed target (sparse reward)."""

    ctrl_dt = 0.02  # dm_control default control timestep = the model's physics timestep (one substep)
    target_size = BIG_TARGET  # target radius of the task

    def model_xml(self):
        return dm_reacher.get_model_and_assets()

    def customize_model(self, model):
        # the task's target radius, as dm_control writes it at every reset (only seen by renderers here)
        model.geom_size[model.geom("target").id, 0] = self.target_size

    def _target_id(self) -> int:
        return self._mj_model.geom("target").id

    def _finger_id(self) -> int:
        return self._mj_model.geom("finger").id

    def initial_state(self, rng, data):
        k_joints, k_angle, k_radius = jax.random.split(rng, 3)
        qpos = randomize_limited_and_rotational_joints(k_joints, self._mj_model, data.qpos)
        angle = jax.random.uniform(k_angle, (), minval=0.0, maxval=2 * jnp.pi)
        radius = jax.random.uniform(k_radius, (), minval=TARGET_RADIUS_RANGE[0], maxval=TARGET_RADIUS_RANGE[1])
        z = self._mj_model.geom_pos[self._target_id(), 2]
        target_pos = jnp.stack([radius * jnp.sin(angle), radius * jnp.cos(angle), jnp.full((), z)])
        info = {"target_pos": target_pos.astype(jnp.float32), "target_size": jnp.asarray(self.target_size, jnp.float32)}
        return data.replace(qpos=qpos), info

    def info_from_model_fields(self, fields):
        i = self._target_id()
        return {"target_pos": jnp.asarray(fields["geom_pos"][i], jnp.float32),
                "target_size": jnp.asarray(fields["geom_size"][i, 0], jnp.float32)}

    def _finger_to_target(self, data, info) -> jax.Array:
        """Vector (x, y) from the fingertip to the target (dm_control ``finger_to_target``)."""
        return info["target_pos"][:2] - data.geom_xpos[self._finger_id(), :2]

    def observation(self, data, info):
        obs = collections.OrderedDict()
        obs["position"] = data.qpos
        obs["to_target"] = self._finger_to_target(data, info)
        obs["velocity"] = data.qvel
        return obs

    def reward(self, data, info):
        # dm_control: tolerance(dist, (0, radii)); the distance is never negative and the bound is a traced
        # per-episode value (the playground tolerance checks its bounds in Python), so compare dist - radii
        # with 0, which is exact in floating point.
        radii = info["target_size"] + self._mj_model.geom_size[self._finger_id(), 0]
        dist = jnp.linalg.norm(self._finger_to_target(data, info))
        return tolerance(dist - radii, (-np.inf, 0.0))


class ReacherEasy(_Reacher):
    """reacher-easy: target radius 0.05."""

    name = "reacher-easy"
    target_size = BIG_TARGET


class ReacherHard(_Reacher):
    """reacher-hard: target radius 0.015."""

    name = "reacher-hard"
    target_size = SMALL_TARGET
