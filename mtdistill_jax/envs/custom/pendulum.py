"""pendulum-spin (TD-MPC2 custom task): spin the pendulum as fast as possible."""

from __future__ import annotations

import jax.numpy as jnp
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.dmc.pendulum import _Pendulum


class PendulumSpin(_Pendulum):
    """Swing-up initialisation and observations; reward tol(|w|, (9, inf), margin 4.5, 0.5, linear)."""

    name = "pendulum-spin"

    def reward(self, data, info):
        return tolerance(jnp.abs(data.qvel[0]), (9.0, float("inf")), margin=4.5, value_at_margin=0.5,
                         sigmoid="linear")
