"""On-device replay buffer of whole episodes, for online training inside one compiled program.

Like the offline sampler, the buffer is a stateless object (static sizes) plus a pytree state (:class:`ReplayState`:
the stored episodes, counters and the sampling cursor), so ``start``/``add``/``sample`` are pure, jittable and can
run inside ``lax.scan``; the state is what a checkpoint saves.

Layout: a ring of ``C`` episode slots of ``T+1`` frames each, in the official frame layout (frame 0 the reset
observation, ``action[t]``/``reward[t]`` the step into frame ``t``, frame 0 of action/reward filler). The ``M``
environments of an online run step in lockstep (our tasks have no early termination, every episode lasts ``T``
steps), so their episodes are written side by side into ``M`` consecutive slots, one frame per step, and become
sampleable when their last frame is written — as the official trainer adds an episode to its buffer when it ends.
Sub-trajectories of ``H+1`` frames are drawn from complete episodes only, so they never cross an episode boundary
and never read a frame that is not written yet.

Sampling is the offline sampler's (:func:`~mtdistill_jax.data.offline.uniform_indices` and
:func:`~mtdistill_jax.data.offline.gather_windows`): batch ``i`` of a stream with key ``k`` over ``n`` complete
episodes draws the same windows as :class:`~mtdistill_jax.data.offline.OfflineSampler` over those ``n`` episodes
(oldest first). When the ring is full, each new block of ``M`` episodes overwrites the oldest block, which stops
being sampled as soon as its first frame is overwritten.

Capacity is given in transitions (official: ``min(steps, 1_000_000)``) and rounded down to whole episodes, a
multiple of ``M`` (at least ``2M``).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mtdistill_jax.data.offline import OfflineData, SamplerState, gather_windows, init_cursor, uniform_indices
from mtdistill_jax.errors import UserError
from mtdistill_jax.types import Batch


@flax.struct.dataclass
class ReplayState:
    """Episodes [C, T+1, ...] in ``data``; ``size``: complete episodes stored (<= C); ``ptr``: first slot of the
    block being written; ``t``: frames of that block written so far (0: none, T+1: complete); ``cursor``: the
    sampling stream (key, batches drawn)."""

    data: OfflineData
    size: jax.Array
    ptr: jax.Array
    t: jax.Array
    cursor: SamplerState


class ReplayBuffer:
    """``buf = ReplayBuffer(capacity, episode_length=T, num_envs=M, batch_size=B, horizon=H, obs_dim=O,
    action_dim=A)``; ``s = buf.init(key)``; per episode ``s = buf.start(s, obs0, task)`` then per step
    ``s = buf.add(s, action, reward, next_obs)``; ``batch, s = buf.sample(s)`` once ``buf.num_sampleable(s) > 0``.
    """

    def __init__(self, capacity: int, *, episode_length: int, num_envs: int, batch_size: int, horizon: int,
                 obs_dim: int, action_dim: int):
        if min(episode_length, num_envs, batch_size, horizon, obs_dim, action_dim) < 1:
            raise UserError("episode_length, num_envs, batch_size, horizon, obs_dim and action_dim must be >= 1, got "
                            f"{episode_length}, {num_envs}, {batch_size}, {horizon}, {obs_dim}, {action_dim}")
        if episode_length < horizon + 1:
            raise UserError(f"episodes of {episode_length} steps are too short for horizon {horizon} "
                            f"(sub-trajectories of {horizon + 1} frames)")
        self.T, self.M, self.B, self.H = int(episode_length), int(num_envs), int(batch_size), int(horizon)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        episodes = int(capacity) // self.T
        # episode slots C: a multiple of M, and at least 2M so that a full ring being overwritten still holds
        # a complete block to sample
        self.capacity = max(2 * self.M, episodes // self.M * self.M)

    @property
    def capacity_transitions(self) -> int:
        return self.capacity * self.T

    def init(self, key) -> ReplayState:
        C, F = self.capacity, self.T + 1
        data = OfflineData(obs=jnp.zeros((C, F, self.obs_dim), jnp.float32),
                           action=jnp.zeros((C, F, self.action_dim), jnp.float32),
                           reward=jnp.zeros((C, F), jnp.float32), task=jnp.zeros((C,), jnp.int32))
        zero = jnp.zeros((), jnp.int32)
        return ReplayState(data=data, size=zero, ptr=zero, t=zero, cursor=init_cursor(key))

    def nbytes(self) -> int:
        """Device bytes of the stored episodes."""
        F = self.T + 1
        return 4 * self.capacity * F * (self.obs_dim + self.action_dim + 1) + 4 * self.capacity

    # ------------------------------------------------------------------------------------------ writing
    def _write(self, arr, value, ptr, t):
        """``arr[ptr:ptr+M, t] = value`` (value [M, ...])."""
        start = (ptr, t) + (0,) * (arr.ndim - 2)
        return jax.lax.dynamic_update_slice(arr, value[:, None].astype(arr.dtype), start)

    def start(self, state: ReplayState, obs, task) -> ReplayState:
        """Begin a block of M episodes: frame 0 = ``obs`` [M, O] (the reset observations), task ids ``task`` [M].
        A block still being written (``t`` not 0 or T+1) is abandoned (its slots are reused)."""
        M = self.M
        ptr = jnp.where(state.t == self.T + 1, (state.ptr + M) % self.capacity, state.ptr)
        size = jnp.where(state.t == self.T + 1, jnp.minimum(state.size + M, self.capacity), state.size)
        d = state.data
        data = OfflineData(obs=self._write(d.obs, obs, ptr, 0),
                           action=self._write(d.action, jnp.zeros((M, self.action_dim)), ptr, 0),
                           reward=self._write(d.reward, jnp.zeros((M,)), ptr, 0),
                           task=jax.lax.dynamic_update_slice(d.task, jnp.asarray(task, jnp.int32), (ptr,)))
        return state.replace(data=data, size=size, ptr=ptr, t=jnp.ones((), jnp.int32))

    def add(self, state: ReplayState, action, reward, next_obs) -> ReplayState:
        """Write one step of every env: ``action`` [M, A], ``reward`` [M] and the observation it led to
        ``next_obs`` [M, O] as frame ``t``; after frame T the block is complete and sampleable. Exactly T calls
        follow each :meth:`start` (a further call would overwrite frame T)."""
        d, ptr, t = state.data, state.ptr, state.t
        data = OfflineData(obs=self._write(d.obs, next_obs, ptr, t), action=self._write(d.action, action, ptr, t),
                           reward=self._write(d.reward, reward, ptr, t), task=d.task)
        return state.replace(data=data, t=t + 1)

    # ----------------------------------------------------------------------------------------- sampling
    def _complete(self, state: ReplayState):
        """(number of sampleable episodes, slot of the oldest). The block at ``ptr`` counts once complete; when
        the ring is full, the block being written (it overwrites the oldest) is left out."""
        C, M = self.capacity, self.M
        done = state.t == self.T + 1
        size = jnp.where(done, jnp.minimum(state.size + M, C), state.size)
        writing = ~done & (state.t > 0)
        full = size == C
        n = jnp.where(full & writing, C - M, size)
        oldest = jnp.where(full, (state.ptr + M) % C, 0)  # full: the block after the newest (complete or not)
        return n, oldest

    def num_sampleable(self, state: ReplayState) -> jax.Array:
        """Complete episodes that :meth:`sample` draws from."""
        return self._complete(state)[0]

    def sample_at(self, state: ReplayState, key, i) -> Batch:
        """Batch ``i`` of the stream with raw key ``key``: the windows the offline sampler draws over the
        sampleable episodes, oldest first. Needs ``num_sampleable(state) > 0``."""
        n, oldest = self._complete(state)
        ep, start = uniform_indices(key, i, self.B, n, self.T + 1, self.H)
        return gather_windows(state.data, (oldest + ep) % self.capacity, start, self.H)

    def sample(self, state: ReplayState) -> tuple[Batch, ReplayState]:
        """The next batch of the buffer's stream and the advanced cursor."""
        batch = self.sample_at(state, state.cursor.key, state.cursor.count)
        return batch, state.replace(cursor=state.cursor.replace(count=state.cursor.count + 1))
