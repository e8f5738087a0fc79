"""Ball-in-cup catch (dm_control ``ball_in_cup.catch``) on MJX.

The reset places the ball at a uniformly random point in the air and redraws until it penetrates nothing
(dm_control's ``ncon > 0`` rejection loop). Here the loop is a bounded ``lax.while_loop`` and the contact test
is exact closed-form geometry of the ball against the geoms it can touch (the cup's capsules and the ground
plane), posed at the reset configuration: the cup's slide joints are at their ``qpos0`` during the reset, so
only the ball moves. This is the same test MuJoCo's sphere-capsule / sphere-plane collision functions make,
it is cheap, and it does not depend on the MJX implementation ('jax' or 'warp').
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from dm_control.suite import ball_in_cup as dm_ball_in_cup

from mtdistill_jax.envs.base import DMCEnv

BALL_X_RANGE = (-0.2, 0.2)  # reset: ball_x slide position drawn uniformly in this range (m)
BALL_Z_RANGE = (0.2, 0.5)  # reset: ball_z slide position drawn uniformly in this range (m)
MAX_RESET_DRAWS = 100  # bound of the rejection loop (rejection rate: 0.18 stock, 0.44 in-cup start)


class _BallInCup(DMCEnv):
    """Shared model, reset, observation and ``in_target`` test of the ball-in-cup tasks."""

    ctrl_dt = 0.02  # dm_control ball_in_cup control timestep (10 physics steps of 0.002 s)
    in_cup_start_prob = 0.0  # probability that the reset also requires the ball to start inside the cup

    def __init__(self, config=None, config_overrides=None):
        super().__init__(config, config_overrides)
        self._setup_reset_geometry()

    def model_xml(self):
        return dm_ball_in_cup.get_model_and_assets()

    # ----------------------------------------------------------------------------------------------------
    # Model constants.

    def _setup_reset_geometry(self):
        """Numpy constants of the reset: ball joints, in-target box and the geoms the ball can collide with."""
        m = self._mj_model
        d = mujoco.MjData(m)
        mujoco.mj_forward(m, d)  # qpos0: the configuration every reset starts from
        if d.ncon:
            raise ValueError(f"{self.name}: contacts at qpos0; the closed-form reset test assumes none")
        self._ball_body = m.body("ball").id
        self._target_site = m.site("target").id
        ball_geom = m.geom("ball")
        if ball_geom.type[0] != mujoco.mjtGeom.mjGEOM_SPHERE:
            raise ValueError(f"{self.name}: the ball geom must be a sphere")
        self._ball_radius = float(m.geom_size[ball_geom.id, 0])
        # in_target: |target - ball| (x, z) < target half-sizes (x, z) - ball radius
        self._target_half = np.asarray(m.site_size[self._target_site, [0, 2]] - self._ball_radius)
        # ball slide joints: qpos address and world axis (the ball body hangs from the world)
        jx, jz = m.joint("ball_x"), m.joint("ball_z")
        self._ball_qadr = (int(m.jnt_qposadr[jx.id]), int(m.jnt_qposadr[jz.id]))
        self._ball_dadr = (int(m.jnt_dofadr[jx.id]), int(m.jnt_dofadr[jz.id]))
        self._ball_axes = np.stack([d.xaxis[jx.id], d.xaxis[jz.id]])  # (2, 3)
        self._ball_pos0 = d.geom_xpos[ball_geom.id].copy()  # ball centre at ball qpos 0 (+ axes @ q)
        q0 = np.array([d.qpos[a] for a in self._ball_qadr])
        self._ball_pos0 -= q0 @ self._ball_axes
        # the ball-in-target box in (ball_x, ball_z) joint coordinates (axes are x and z of the world)
        if not np.allclose(self._ball_axes, [[1, 0, 0], [0, 0, 1]]):
            raise ValueError(f"{self.name}: ball slide axes must be the world x and z axes")
        centre = d.site_xpos[self._target_site, [0, 2]] - self._ball_pos0[[0, 2]]
        self._in_cup_lo = np.maximum([BALL_X_RANGE[0], BALL_Z_RANGE[0]], centre - self._target_half)
        self._in_cup_hi = np.minimum([BALL_X_RANGE[1], BALL_Z_RANGE[1]], centre + self._target_half)
        # geoms that can collide with the ball (contype/conaffinity, other body), posed at qpos0
        caps, planes = [], []
        b = ball_geom.id
        for g in range(m.ngeom):
            if m.geom_bodyid[g] == m.geom_bodyid[b]:
                continue
            if not (m.geom_contype[g] & m.geom_conaffinity[b] or m.geom_contype[b] & m.geom_conaffinity[g]):
                continue
            margin = max(m.geom_margin[g], m.geom_margin[b])  # MuJoCo reports a contact when dist < margin
            axis = d.geom_xmat[g].reshape(3, 3)[:, 2]
            if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_CAPSULE:
                half = m.geom_size[g, 1] * axis
                caps.append((d.geom_xpos[g] - half, d.geom_xpos[g] + half, m.geom_size[g, 0] + margin))
            elif m.geom_type[g] == mujoco.mjtGeom.mjGEOM_PLANE:
                planes.append((d.geom_xpos[g], axis, margin))
            else:
                raise ValueError(f"{self.name}: geom {m.geom(g).name!r}: only capsules and planes are supported")
        self._cap_a = np.array([c[0] for c in caps])  # capsule segment start points (n, 3)
        self._cap_b = np.array([c[1] for c in caps])  # capsule segment end points (n, 3)
        self._cap_r = np.array([c[2] for c in caps])  # capsule radii (+ margin) (n,)
        self._plane_p = np.array([p[0] for p in planes]).reshape(-1, 3)  # plane points
        self._plane_n = np.array([p[1] for p in planes]).reshape(-1, 3)  # plane normals
        self._plane_margin = np.array([p[2] for p in planes])  # plane margins

    # ----------------------------------------------------------------------------------------------------
    # Reset.

    def _ball_at(self, q):
        """World position of the ball centre at ball slide positions ``q`` = (ball_x, ball_z)."""
        return jnp.asarray(self._ball_pos0) + q @ jnp.asarray(self._ball_axes)

    def _penetrating(self, q):
        """Whether the ball at slide positions ``q`` touches the cup or the ground (MuJoCo's ``ncon > 0``)."""
        p = self._ball_at(q)
        a, b = jnp.asarray(self._cap_a), jnp.asarray(self._cap_b)
        ab = b - a
        t = jnp.clip(jnp.sum((p - a) * ab, -1) / jnp.sum(ab * ab, -1), 0.0, 1.0)
        dist_cap = jnp.linalg.norm(p - (a + t[:, None] * ab), axis=-1) - self._cap_r - self._ball_radius
        dist_plane = jnp.sum((p - self._plane_p) * self._plane_n, -1) - self._ball_radius - self._plane_margin
        return jnp.any(dist_cap < 0) | jnp.any(dist_plane < 0)

    def _in_target_q(self, q):
        """``in_target`` at the reset configuration (cup at qpos0) with the ball at slide positions ``q``."""
        lo = jnp.asarray(self._in_cup_lo)
        hi = jnp.asarray(self._in_cup_hi)
        return jnp.all((q > lo) & (q < hi))

    def initial_state(self, rng, data):
        # in_cup: whether this episode must start with the ball in the cup (cup-spin), else anywhere (stock)
        k_flag, k_draws = jax.random.split(rng)
        in_cup = jax.random.uniform(k_flag) >= 1.0 - self.in_cup_start_prob if self.in_cup_start_prob else False
        stock_lo = jnp.array([BALL_X_RANGE[0], BALL_Z_RANGE[0]])
        stock_hi = jnp.array([BALL_X_RANGE[1], BALL_Z_RANGE[1]])
        # Drawing uniformly in (stock range ∩ in-target box) and rejecting penetrations gives the same
        # distribution as dm_control's drawing in the stock range and rejecting (penetrating or not in target).
        lo = jnp.where(in_cup, jnp.asarray(self._in_cup_lo), stock_lo)
        hi = jnp.where(in_cup, jnp.asarray(self._in_cup_hi), stock_hi)

        def draw(key):
            return jax.random.uniform(key, (2,), minval=lo, maxval=hi)

        def rejected(q):
            return self._penetrating(q) | (in_cup & ~self._in_target_q(q))

        def cond(carry):
            i, _, _, bad = carry
            return bad & (i < MAX_RESET_DRAWS)

        def body(carry):
            i, key, _, _ = carry
            key, sub = jax.random.split(key)
            q = draw(sub)
            return i + 1, key, q, rejected(q)

        key, sub = jax.random.split(k_draws)
        q = draw(sub)
        _, _, q, _ = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), key, q, rejected(q)))
        qpos = data.qpos.at[self._ball_qadr[0]].set(q[0]).at[self._ball_qadr[1]].set(q[1])
        return data.replace(qpos=qpos.astype(data.qpos.dtype)), {}

    # ----------------------------------------------------------------------------------------------------
    # Observation and reward helpers.

    def observation(self, data, info):
        obs = collections.OrderedDict()
        obs["position"] = data.qpos
        obs["velocity"] = data.qvel
        return obs

    def ball_to_target(self, data):
        """(x, z) vector from the ball to the target site."""
        return data.site_xpos[self._target_site, jnp.array([0, 2])] - data.xpos[self._ball_body, jnp.array([0, 2])]

    def in_target(self, data):
        """1.0 if the ball is inside the target box, else 0.0."""
        inside = jnp.all(jnp.abs(self.ball_to_target(data)) < jnp.asarray(self._target_half))
        return inside.astype(jnp.float32)


class CupCatch(_BallInCup):
    """Swing the ball into the cup; sparse reward ``in_target``."""

    name = "cup-catch"

    def reward(self, data, info):
        return self.in_target(data)
