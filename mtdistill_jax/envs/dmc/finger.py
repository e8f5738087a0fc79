"""Finger spin / turn-easy / turn-hard (dm_control ``finger``) on MJX.

All observations are the ones dm_control reads from the model's sensors, computed here from ``data`` directly
(joint positions/velocities, the ``tip`` site and the ``spinner`` body frame), except ``touch``: the two touch
sensors are taken from ``data.sensordata`` (log1p), and after a step the base class substitutes the values of
the last physics substep, like dm_control.

The turn tasks randomise the ``target`` site at reset (its position on a circle around the hinge, and its size).
Here the target lives in ``state.info`` (``target_pos``: its world position; ``target_size``: its radius). It is
a site: it never collides, and no sensor that the physics uses depends on it (the ``target`` framepos sensor
of the model still reports the XML position and is not used), so the physics is unaffected.

Initial joint angles are drawn like dm_control's ``_set_random_joint_angles``: rejection sampling until no
geoms penetrate, as a bounded ``lax.while_loop`` (dm_control raises after 1000 failed attempts; here the last
sample is kept; about 9% of the samples penetrate, so this does not happen in practice).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from dm_control.suite import finger as dm_finger
from mujoco import mjx
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv, randomize_limited_and_rotational_joints

CONTROL_TIMESTEP = 0.02  # dm_control finger control timestep (two 0.01 s physics steps)
EASY_TARGET_SIZE = 0.07  # target radius of turn-easy
HARD_TARGET_SIZE = 0.03  # target radius of turn-hard
SPIN_VELOCITY = 15.0  # spin: reward 1 while the hinge turns at <= -15 rad/s
SPIN_HINGE_DAMPING = 0.03  # spin: the hinge damping dm_control sets at reset (XML: 0.5)
MAX_ATTEMPTS = 1000  # rejection sampling of a contact-free initial configuration: attempts at most


class _Finger(DMCEnv):
    """Finger: a two-link planar finger and a free-spinning body on a hinge (no gravity)."""

    ctrl_dt = CONTROL_TIMESTEP  # dm_control finger control timestep
    touch_sensors = ("touchtop", "touchbottom")  # acceleration-stage sensors: taken from the last substep

    def __init__(self, config=None, config_overrides=None):
        super().__init__(config, config_overrides)
        # the rejection sampling of initial angles runs MJX's JAX collision pipeline whatever ``impl`` is
        self._collision_model = (self._mjx_model if self._config.impl == "jax"
                                 else mjx.put_model(self._mj_model, impl="jax"))

    def model_xml(self):
        return dm_finger.get_model_and_assets()

    def _target_id(self) -> int:
        return self._mj_model.site("target").id

    def _penetrating(self, qpos: jax.Array) -> jax.Array:
        """Whether any two geoms penetrate at ``qpos`` (dm_control: ``physics.data.ncon > 0``)."""
        m = self._collision_model
        data = mjx.make_data(m).replace(qpos=qpos)
        data = mjx.collision(m, mjx.kinematics(m, data))
        dist = data._impl.contact.dist
        return jnp.any(dist < 0) if dist.size else jnp.zeros((), bool)

    def _random_joint_angles(self, rng: jax.Array, data: mjx.Data) -> mjx.Data:
        """dm_control ``_set_random_joint_angles``: resample all joint angles until no geoms penetrate."""
        qpos0 = jnp.asarray(self._mj_model.qpos0, jnp.float32)

        def sample(carry):
            rng, _, attempt = carry
            rng, key = jax.random.split(rng)
            return rng, randomize_limited_and_rotational_joints(key, self._mj_model, qpos0), attempt + 1

        def retry(carry):
            _, qpos, attempt = carry
            return self._penetrating(qpos) & (attempt < MAX_ATTEMPTS)

        _, qpos, _ = jax.lax.while_loop(retry, sample, sample((rng, qpos0, jnp.zeros((), jnp.int32))))
        return data.replace(qpos=qpos.astype(data.qpos.dtype))

    def _target_info(self, rng: jax.Array) -> dict:
        """Per-episode target (the XML target for spin, which does not use it)."""
        i = self._target_id()
        return {"target_pos": jnp.asarray(self._mj_model.site_pos[i], jnp.float32),
                "target_size": jnp.asarray(self._mj_model.site_size[i, 0], jnp.float32)}

    def initial_state(self, rng, data):
        k_target, k_joints = jax.random.split(rng)
        info = self._target_info(k_target)
        return self._random_joint_angles(k_joints, data), info

    def _spinner_xz(self, data) -> jax.Array:
        return data.xpos[self._mj_model.body("spinner").id][jnp.array([0, 2])]

    def _tip_position(self, data) -> jax.Array:
        """(x, z) of the tip relative to the hinge."""
        return data.site_xpos[self._mj_model.site("tip").id][jnp.array([0, 2])] - self._spinner_xz(data)

    def _target_position(self, data, info) -> jax.Array:
        """(x, z) of the target relative to the hinge."""
        return info["target_pos"][jnp.array([0, 2])] - self._spinner_xz(data)

    def _dist_to_target(self, data, info) -> jax.Array:
        """Signed distance from the tip to the target surface (negative inside)."""
        return jnp.linalg.norm(self._target_position(data, info) - self._tip_position(data)) - info["target_size"]

    def _touch(self, data) -> jax.Array:
        adr = [self._mj_model.sensor(s).adr[0] for s in self.touch_sensors]
        return jnp.log1p(data.sensordata[jnp.array(adr)])

    def observation(self, data, info):
        m = self._mj_model
        obs = collections.OrderedDict()
        joints = jnp.array([m.jnt_qposadr[m.joint(j).id] for j in ("proximal", "distal")])
        obs["position"] = jnp.concatenate([data.qpos[joints], self._tip_position(data)])
        dofs = jnp.array([m.jnt_dofadr[m.joint(j).id] for j in ("proximal", "distal", "hinge")])
        obs["velocity"] = data.qvel[dofs]
        obs["touch"] = self._touch(data)
        return obs

    def _hinge_velocity(self, data) -> jax.Array:
        return data.qvel[self._mj_model.jnt_dofadr[self._mj_model.joint("hinge").id]]


class FingerSpin(_Finger):
    """finger-spin: reward 1 while the body spins at hinge velocity <= -15 rad/s."""

    name = "finger-spin"

    def customize_model(self, model):
        # dm_control Spin.initialize_episode: hide the target and tip sites, lower the hinge damping
        model.site_rgba[model.site("target").id, 3] = 0
        model.site_rgba[model.site("tip").id, 3] = 0
        model.dof_damping[model.jnt_dofadr[model.joint("hinge").id]] = SPIN_HINGE_DAMPING

    def reward(self, data, info):
        return tolerance(self._hinge_velocity(data), (-np.inf, -SPIN_VELOCITY))


class _FingerTurn(_Finger):
    """finger-turn: reward 1 while the tip is inside a target placed at random on the tip's circle."""

    target_radius = EASY_TARGET_SIZE  # radius of the target site

    def customize_model(self, model):
        # the task's target radius, as dm_control writes it at every reset (only seen by renderers here)
        model.site_size[model.site("target").id, 0] = self.target_radius

    def _target_info(self, rng):
        m = self._mj_model
        angle = jax.random.uniform(rng, (), minval=-jnp.pi, maxval=jnp.pi)
        # the hinge anchor is fixed in the world (the spinner hangs off the world body); the tip's circle
        # radius is that of the spinner's capsule cap1 (dm_control: geom_size['cap1'].sum())
        hinge = m.body_pos[m.jnt_bodyid[m.joint("hinge").id]] + m.jnt_pos[m.joint("hinge").id]
        radius = float(m.geom_size[m.geom("cap1").id].sum())
        pos = jnp.asarray(m.site_pos[self._target_id()], jnp.float32)
        pos = pos.at[0].set(hinge[0] + radius * jnp.sin(angle)).at[2].set(hinge[2] + radius * jnp.cos(angle))
        return {"target_pos": pos, "target_size": jnp.asarray(self.target_radius, jnp.float32)}

    def info_from_model_fields(self, fields):
        i = self._target_id()
        return {"target_pos": jnp.asarray(fields["site_pos"][i], jnp.float32),
                "target_size": jnp.asarray(fields["site_size"][i, 0], jnp.float32)}

    def observation(self, data, info):
        obs = super().observation(data, info)
        obs["target_position"] = self._target_position(data, info)
        obs["dist_to_target"] = self._dist_to_target(data, info)[None]
        return obs

    def reward(self, data, info):
        return tolerance(self._dist_to_target(data, info), (-np.inf, 0.0))


class FingerTurnEasy(_FingerTurn):
    """finger-turn-easy: target radius 0.07."""

    name = "finger-turn-easy"
    target_radius = EASY_TARGET_SIZE


class FingerTurnHard(_FingerTurn):
    """finger-turn-hard: target radius 0.03."""

    name = "finger-turn-hard"
    target_radius = HARD_TARGET_SIZE
