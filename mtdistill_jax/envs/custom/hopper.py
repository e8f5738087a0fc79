"""hopper-hop-backwards (TD-MPC2 custom task) on MJX."""

from __future__ import annotations

from mujoco_playground._src.reward import tolerance

from mtdistill_jax.envs.dmc.hopper import HOP_SPEED, _Hopper


class HopperHopBackwards(_Hopper):
    """Stock hopper (model, observations, standing term); reward tol(speed, (-inf, -1), margin 0.5, 0.5, linear)."""

    name = "hopper-hop-backwards"

    def reward(self, data, info):
        hopping = tolerance(self._speed(data), (-float("inf"), -HOP_SPEED / 2), margin=HOP_SPEED / 4,
                            value_at_margin=0.5, sigmoid="linear")
        return self._standing(data) * hopping
