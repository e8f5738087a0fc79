"""Vectorised, fixed-length episodes with auto-reset for one MJX task (TD-MPC2: 500 agent steps, no early
termination).

All ``N`` copies of a task start together and every episode has the same length, so the episode boundary is
shared: when it is reached, the whole batch is reset (fresh random initial states) inside one ``lax.cond``
outside ``vmap`` — the reset is not computed on other steps.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mtdistill_jax.envs.base import DMCEnv, State


@flax.struct.dataclass
class VecState:
    """Batched state of ``N`` copies of one task.

    env:       per-copy :class:`State` (leading axis N)
    obs:       [N, obs_dim] observation to act on (after an auto-reset: the new episode's first one)
    final_obs: [N, obs_dim] the observation the step produced (equals ``obs`` unless the episode ended)
    reward:    [N] reward of the last step
    done:      [N] bool, True on the last step of an episode
    t:         int32 agent steps taken in the current episode
    key:       PRNG key for the next resets
    """

    env: State
    obs: jax.Array
    final_obs: jax.Array
    reward: jax.Array
    done: jax.Array
    t: jax.Array
    key: jax.Array


class VectorEnv:
    """``N`` copies of a :class:`DMCEnv` stepped together, with episodes of ``episode_length`` steps."""

    def __init__(self, env: DMCEnv, num_envs: int, episode_length: int | None = None, auto_reset: bool = True):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env = env
        self.num_envs = num_envs
        self.episode_length = int(episode_length or env._config.episode_length)
        if self.episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {self.episode_length}")
        self.auto_reset = auto_reset

    def _reset_batch(self, key):
        return jax.vmap(self.env.reset)(jax.random.split(key, self.num_envs))

    def reset(self, key) -> VecState:
        key, sub = jax.random.split(key)
        s = self._reset_batch(sub)
        n = self.num_envs
        return VecState(env=s, obs=s.obs, final_obs=s.obs, reward=jnp.zeros((n,), jnp.float32),
                        done=jnp.zeros((n,), bool), t=jnp.zeros((), jnp.int32), key=key)

    def step(self, vs: VecState, action: jax.Array) -> VecState:
        """``action``: [N, action_size] in [-1, 1]."""
        s = jax.vmap(self.env.step)(vs.env, action)
        t = vs.t + 1
        done = t >= self.episode_length
        out = vs.replace(env=s, obs=s.obs, final_obs=s.obs, reward=s.reward,
                         done=jnp.broadcast_to(done, (self.num_envs,)), t=t)
        if not self.auto_reset:
            return out

        def do_reset(o: VecState) -> VecState:
            key, sub = jax.random.split(o.key)
            r = self._reset_batch(sub)
            return o.replace(env=r, obs=r.obs, t=jnp.zeros((), jnp.int32), key=key)

        return jax.lax.cond(done, do_reset, lambda o: o, out)
