"""Offline sub-trajectory sampler over whole episodes (the official MT30/MT80 datasets, or any Episodes).

The sampler is a stateless object plus a pytree state (``init(key)``, ``sample(state)``), like the replay
buffer. Its state is the data cursor a checkpoint needs: a PRNG key and the number of batches drawn so far;
batch ``i`` is a pure function of ``(key, i)``, so a restored run draws exactly the batches the original run
would have drawn.

Sampling follows the official ``Buffer`` (a ``SliceSampler`` over episodes): each of the B sub-trajectories is
H+1 consecutive frames of one uniformly chosen episode at a uniformly chosen start, and yields
``obs[s..s+H]``, ``action[s+1..s+H]``, ``reward[s+1..s+H]`` and the episode's task id. Index 0 of action and
reward (filler in the official files) is never read.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax.data.tdmpc2_format import Episodes
from mtdistill_jax.errors import UserError
from mtdistill_jax.types import Batch


@flax.struct.dataclass
class SamplerState:
    key: jax.Array  # raw uint32[2] key (checkpointable as plain data)
    count: jax.Array  # int32 scalar: batches drawn so far (the data cursor)


class OfflineSampler:
    """``sampler = OfflineSampler(episodes, batch_size=256, horizon=3); s = sampler.init(key);
    batch, s = sampler.sample(s)`` (``sample`` is pure and jittable; the episodes live on device)."""

    def __init__(self, episodes: Episodes, batch_size: int, horizon: int, obs_pad: int | None = None,
                 action_pad: int | None = None):
        episodes.validate()
        if batch_size <= 0 or horizon <= 0:
            raise UserError(f"batch_size and horizon must be positive, got {batch_size}, {horizon}")
        if episodes.num_frames < horizon + 2:
            raise UserError(f"episodes have {episodes.num_frames} frames; horizon {horizon} needs at least "
                             f"{horizon + 2} (reset frame + H+1 steps)")
        for name, arr, pad in (("obs", episodes.obs, obs_pad), ("action", episodes.action, action_pad)):
            if pad is not None and arr.shape[-1] != pad:
                raise UserError(f"episodes' {name} width is {arr.shape[-1]}, the task set pads to {pad}")
        self.batch_size, self.horizon = batch_size, horizon
        self.num_episodes, self.num_frames = episodes.num_episodes, episodes.num_frames
        self.obs = jnp.asarray(episodes.obs)
        # Filler at index 0 may be NaN; it is never gathered, but keep it finite so a bug cannot hide as NaN.
        self.action = jnp.asarray(np.nan_to_num(episodes.action))
        self.reward = jnp.asarray(np.nan_to_num(episodes.reward))
        self.task = jnp.asarray(episodes.task, jnp.int32)

    def init(self, key) -> SamplerState:
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        return SamplerState(key=jnp.asarray(key, jnp.uint32), count=jnp.zeros((), jnp.int32))

    def sample(self, state: SamplerState) -> tuple[Batch, SamplerState]:
        """Batch number ``state.count`` (time-major, see :class:`Batch`) and the advanced state."""
        B, H = self.batch_size, self.horizon
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        k_ep, k_start = jax.random.split(key)
        ep = jax.random.randint(k_ep, (B,), 0, self.num_episodes)
        # last frame index is T = num_frames-1; the window s..s+H must fit: s in [0, T-H]
        start = jax.random.randint(k_start, (B,), 0, self.num_frames - H)
        frames = start[None, :] + jnp.arange(H + 1)[:, None]  # [H+1, B]
        obs = self.obs[ep[None, :], frames]  # [H+1, B, O]
        action = self.action[ep[None, :], frames[1:]]  # [H, B, A]
        reward = self.reward[ep[None, :], frames[1:]][..., None]  # [H, B, 1]
        batch = Batch(obs=obs, action=action, reward=reward, task=self.task[ep])
        return batch, state.replace(count=state.count + 1)
