"""Fish swim (dm_control ``fish.swim``) on MJX.

The fish model disables constraints (``<flag constraint="disable"/>``), so MuJoCo never runs collision
detection for it: ``mj_collision`` returns early and ``ncon`` stays 0 even when geoms overlap. MJX instead
builds collision functions for every geom pair that contype/conaffinity allow (it ignores the disable flags
there) and has none for ellipsoid-box pairs, so it cannot even build the stock model.
:meth:`FishSwim.customize_model` therefore clears contype/conaffinity of all geoms, which changes nothing
physically: with MuJoCo C, stepping the model with and without that change gives bit-identical trajectories.
The fluid forces (density 5000, viscosity 0, inertia-box model) are computed by MJX's ``passive._fluid`` as
by MuJoCo C.

The target is a world geom whose position dm_control randomises at reset; here it lives in
``state.info["target_pos"]`` (the geom is collision-free because constraints are disabled, so moving it does
not affect the physics).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from dm_control.suite import fish as dm_fish
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv

JOINTS = ("tail1", "tail_twist", "tail2", "finright_roll", "finright_pitch", "finleft_roll",
          "finleft_pitch")  # observed joint angles, in dm_control's order
JOINT_RANGE = (-0.2, 0.2)  # reset: each observed joint angle drawn uniformly in this range (rad)
TARGET_XY_RANGE = (-0.4, 0.4)  # reset: target x and y drawn uniformly in this range (m)
TARGET_Z_RANGE = (0.1, 0.3)  # reset: target z drawn uniformly in this range (m)


class FishSwim(DMCEnv):
    """Swim the fish's mouth to a random target; reward (7 * in_target + (1 + upright) / 2) / 8."""

    name = "fish-swim"
    ctrl_dt = 0.04  # dm_control fish control timestep (10 physics steps of 0.004 s)

    def __init__(self, config=None, config_overrides=None):
        super().__init__(config, config_overrides)
        m = self._mj_model
        self._torso = m.body("torso").id
        self._mouth = m.geom("mouth").id
        self._target = m.geom("target").id
        if m.geom_bodyid[self._target] != 0:
            raise ValueError(f"{self.name}: the target geom must belong to the world body")
        root = m.joint("root")
        if root.type[0] != mujoco.mjtJoint.mjJNT_FREE:
            raise ValueError(f"{self.name}: the root joint must be free")
        self._root_quat_adr = int(m.jnt_qposadr[root.id]) + 3  # free joint qpos: position (3), quaternion (4)
        self._joint_qadr = np.array([m.jnt_qposadr[m.joint(j).id] for j in JOINTS])  # qpos of the JOINTS
        self._radii = float(m.geom_size[self._mouth, 0] + m.geom_size[self._target, 0])  # mouth + target radii

    def model_xml(self):
        return dm_fish.get_model_and_assets()

    def customize_model(self, model):
        # Constraints are disabled in the XML, so MuJoCo C never collides geoms; MJX needs collision-free
        # geoms for that (see the module docstring). Physically a no-op.
        if not model.opt.disableflags & mujoco.mjtDisableBit.mjDSBL_CONSTRAINT:
            raise ValueError(f"{self.name}: expected constraints to be disabled in the fish model")
        model.geom_contype[:] = 0
        model.geom_conaffinity[:] = 0

    def initial_state(self, rng, data):
        k_quat, k_joints, k_xy, k_z = jax.random.split(rng, 4)
        # root orientation: a normalised standard-normal 4-vector (uniform on the rotations)
        quat = jax.random.normal(k_quat, (4,))
        quat = quat / jnp.linalg.norm(quat)
        qpos = data.qpos.at[self._root_quat_adr:self._root_quat_adr + 4].set(quat.astype(data.qpos.dtype))
        angles = jax.random.uniform(k_joints, (len(JOINTS),), minval=JOINT_RANGE[0], maxval=JOINT_RANGE[1])
        qpos = qpos.at[self._joint_qadr].set(angles.astype(qpos.dtype))
        xy = jax.random.uniform(k_xy, (2,), minval=TARGET_XY_RANGE[0], maxval=TARGET_XY_RANGE[1])
        z = jax.random.uniform(k_z, (1,), minval=TARGET_Z_RANGE[0], maxval=TARGET_Z_RANGE[1])
        target = jnp.concatenate([xy, z]).astype(jnp.float32)
        return data.replace(qpos=qpos), {"target_pos": target}

    def info_from_model_fields(self, fields):
        return {"target_pos": jnp.asarray(fields["geom_pos"][self._target], jnp.float32)}

    def _mouth_to_target(self, data, info):
        """Vector from the mouth to the target in the mouth's frame."""
        # the target hangs from the world body, so its world position is its (per-episode) geom_pos
        return (info["target_pos"] - data.geom_xpos[self._mouth]) @ data.geom_xmat[self._mouth]

    def _upright(self, data):
        return data.xmat[self._torso, 2, 2]

    def observation(self, data, info):
        obs = collections.OrderedDict()
        obs["joint_angles"] = data.qpos[self._joint_qadr]
        obs["upright"] = self._upright(data)
        obs["target"] = self._mouth_to_target(data, info)
        obs["velocity"] = data.qvel
        return obs

    def reward(self, data, info):
        dist = jnp.linalg.norm(self._mouth_to_target(data, info))
        in_target = tolerance(dist, (0.0, self._radii), margin=2 * self._radii)
        is_upright = 0.5 * (self._upright(data) + 1.0)
        return (7.0 * in_target + is_upright) / 8.0
