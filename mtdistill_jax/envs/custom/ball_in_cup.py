"""cup-spin (TD-MPC2 custom task): spin the ball around the cup, fast and far from the target."""

from __future__ import annotations

import jax.numpy as jnp
from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.dmc.ball_in_cup import _BallInCup

DIST_TARGET = 0.5  # ball-to-target distance (m) above which the distance term is 1
TARGET_SPEED = 6.0  # ball speed |(v_x, v_z)| (m/s) above which the speed term is 1


class CupSpin(_BallInCup):
    """Stock ball-in-cup model and observations; the ball starts in the cup with probability 0.9.

    Reward: (1 - in_target) * (tol(dist, (0.5, inf), margin 0.25, 0.5, linear)
    + 2 * tol(|(v_x, v_z)|, (6, inf), margin 3, 0.5, linear)) / 3.
    """

    name = "cup-spin"
    in_cup_start_prob = 0.9  # TD-MPC2: with probability 0.1 the ball may start anywhere (stock reset)

    def reward(self, data, info):
        dist = jnp.linalg.norm(self.ball_to_target(data))
        dist_reward = tolerance(dist, (DIST_TARGET, float("inf")), margin=DIST_TARGET / 2, value_at_margin=0.5,
                                sigmoid="linear")
        vx, vz = self._ball_dadr
        speed = jnp.linalg.norm(jnp.stack([data.qvel[vx], data.qvel[vz]]))
        vel_reward = tolerance(speed, (TARGET_SPEED, float("inf")), margin=TARGET_SPEED / 2, value_at_margin=0.5,
                               sigmoid="linear")
        return (1.0 - self.in_target(data)) * (dist_reward + 2.0 * vel_reward) / 3.0
