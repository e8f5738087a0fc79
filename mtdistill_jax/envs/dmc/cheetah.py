"""Cheetah run (dm_control ``cheetah.run``) on MJX.

Reset follows dm_control exactly: every limited joint gets an angle uniform in its range, then the model
settles for ``SETTLE_STEPS`` physics steps with zero control and the clock is set back to 0. The settling
runs in MJX with dm_control's legacy stepping: its first step is an ``mj_step2`` whose forces, mass matrix
and constraints are still those of the default pose (computed by ``Physics.reset``), integrated from the
randomised ``qpos``; the remaining steps are ordinary ``mj_step``s.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from dm_control.suite import cheetah as dm_cheetah
from mujoco import mjx
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.base import DMCEnv

RUN_SPEED = 10.0  # dm_control's target running speed (m/s)
SETTLE_STEPS = 200  # physics steps the model settles for at reset (dm_control)


class _Cheetah(DMCEnv):
    """Shared cheetah machinery: reset with settling, observations, speed and heights."""

    ctrl_dt = 0.01  # dm_control default: one physics step (0.01 s) per control step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = self._mj_model
        if m.nq != m.njnt:
            raise ValueError(f"{self.name}: reset assumes one-dof joints (nq {m.nq}, njnt {m.njnt})")
        limited = np.flatnonzero(m.jnt_limited == 1)
        self._limited_qadr = jnp.asarray(m.jnt_qposadr[limited], jnp.int32)  # qpos slots of the limited joints
        self._limited_lo = jnp.asarray(m.jnt_range[limited, 0], jnp.float32)
        self._limited_hi = jnp.asarray(m.jnt_range[limited, 1], jnp.float32)
        sid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SENSOR, "torso_subtreelinvel")
        self._speed_adr = int(m.sensor_adr[sid])  # x component of the torso's subtree linear velocity
        self._torso = m.body("torso").id
        self._bfoot = m.body("bfoot").id
        self._ffoot = m.body("ffoot").id

    def model_xml(self):
        return dm_cheetah.get_model_and_assets()

    def settle(self, data: mjx.Data, qpos: jax.Array, model: mjx.Model | None = None) -> mjx.Data:
        """dm_control's settling from ``qpos``, starting at the forwarded default-pose ``data``.

        ``data`` must hold ``mj_forward`` of the default pose (what ``Physics.reset`` leaves); the first step
        integrates its accelerations from ``qpos`` (legacy ``mj_step2``), the others are full steps. Time is
        reset to 0 with the dtype (and strong type) ``data.time`` had. ``model``: as in ``forward``.
        """
        model = self._mjx_model if model is None else model
        time0 = data.time
        n_full = SETTLE_STEPS - 1
        if self._config.impl == "jax":
            data = mjx.euler(model, data.replace(qpos=qpos))
        else:  # mjx.euler is JAX-only: plain steps (the first one then sees the randomised pose's forces)
            data, n_full = data.replace(qpos=qpos), SETTLE_STEPS

        def body(d, _):
            return mjx.step(model, d), None

        data, _ = jax.lax.scan(body, data, None, length=n_full)
        return data.replace(time=jnp.zeros_like(time0))

    def initial_state(self, rng, data):
        # limited joints ~ U[lower, upper] (radians); the settling happens in finish_reset
        angles = jax.random.uniform(rng, self._limited_lo.shape, minval=self._limited_lo, maxval=self._limited_hi)
        return data.replace(qpos=data.qpos.at[self._limited_qadr].set(angles.astype(data.qpos.dtype))), {}

    def finish_reset(self, data, model=None):
        # SETTLE_STEPS physics steps with zero control from the drawn pose, starting at the forwarded default
        # pose (make_data's qpos is the model's qpos0), then the forward of the settled state
        model = self._mjx_model if model is None else model
        default = self.forward(data.replace(qpos=jnp.asarray(model.qpos0, data.qpos.dtype)), model)
        return self.forward(self.settle(default, data.qpos, model), model)

    def speed(self, data):
        """Horizontal speed of the torso subtree (dm_control ``Physics.speed``)."""
        return data.sensordata[self._speed_adr]

    def observation(self, data, info):
        obs = collections.OrderedDict()
        obs["position"] = data.qpos[1:]  # all but the horizontal root position
        obs["velocity"] = data.qvel
        return obs


class CheetahRun(_Cheetah):
    """Run forwards: reward rises linearly from 0 at rest to 1 at ``RUN_SPEED`` and above."""

    name = "cheetah-run"

    def reward(self, data, info):
        return tolerance(self.speed(data), (RUN_SPEED, float("inf")), margin=RUN_SPEED, value_at_margin=0.0,
                         sigmoid="linear")
