"""Offline sub-trajectory sampler over whole episodes (the official MT30/MT80 datasets, or any Episodes).

The sampler is a stateless object plus pytree arguments, like the replay buffer: the episodes live in an
:class:`OfflineData` pytree of device arrays (``sampler.load(episodes)``) and the data cursor in a
:class:`SamplerState` (``sampler.init(key)``); both are *arguments* of the pure ``sample(data, state)``, never
closure constants, so a jitted sampler (or a training loop that samples inside ``lax.scan``) compiles to the
same small program whatever the size of the dataset. Only the array shapes are static (a dataset of another
shape retraces; it does not grow the program).

The cursor is what a checkpoint needs: a PRNG key and the number of batches drawn so far. Batch ``i`` is a
pure function of ``(key, i)`` (:meth:`OfflineSampler.sample_at`), so a restored run draws exactly the
batches the original run would have drawn.

Sampling follows the official ``Buffer`` (a ``SliceSampler`` over episodes): each of the B sub-trajectories is
H+1 consecutive frames of one uniformly chosen episode at a uniformly chosen start, and yields
``obs[s..s+H]``, ``action[s+1..s+H]``, ``reward[s+1..s+H]`` and the episode's task id. Index 0 of action and
reward (filler in the official files) is never read.

Non-finite data: :func:`check_finite` (run by :meth:`OfflineSampler.load` before the copy to the device, and
by ``train_offline`` on data given as :class:`OfflineData`) rejects NaN/inf in any frame the sampler can read
with a :class:`NonFiniteDataError` naming the field, the first episode and frame, and the count.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax.data.tdmpc2_format import Episodes
from mtdistill_jax.errors import UserError
from mtdistill_jax.types import Batch

# Frames the sampler reads, per field: obs from frame 0, action and reward from frame 1 (0 is filler).
FIRST_READ_FRAME = {"obs": 0, "action": 1, "reward": 1}
_BLOCK_ELEMENTS = 1 << 24  # elements scanned at once by check_finite (64 MB of float32, a 16 MB mask)


class NonFiniteDataError(UserError):
    """Episodes hold NaN/inf in frames the sampler reads (the message names the field, the first episode and
    frame, and how many values)."""


def _first_nonfinite(arr: np.ndarray, first: int) -> tuple[int, int, int] | None:
    """``(count, episode, frame)`` of the non-finite values of ``arr[:, first:]`` ([E, T+1, ...]; frame counted
    from 0 of the full episode), or None when all are finite. Scans blocks of episodes, so the temporary mask
    stays small whatever the size of the dataset."""
    num_episodes = arr.shape[0]
    per_episode = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)))
    block = max(1, _BLOCK_ELEMENTS // per_episode)
    count, where = 0, None
    for e0 in range(0, num_episodes, block):
        finite = np.isfinite(arr[e0:e0 + block, first:])
        if finite.all():
            continue
        count += finite.size - int(np.count_nonzero(finite))
        if where is None:
            bad_frames = ~finite.reshape(finite.shape[0], finite.shape[1], -1).all(axis=2)  # [b, T+1-first]
            e, t = np.argwhere(bad_frames)[0]
            where = (e0 + int(e), first + int(t))
    return None if where is None else (count, *where)


@jax.jit
def _finite_flags(obs, action, reward):
    return tuple(jnp.isfinite(x[:, FIRST_READ_FRAME[name]:]).all()
                 for name, x in (("obs", obs), ("action", action), ("reward", reward)))


def check_finite(episodes: Episodes | OfflineData, where: str = "episodes") -> None:
    """Raise :class:`NonFiniteDataError` when a frame the sampler can read holds NaN or inf: any obs frame,
    action and reward from frame 1 on (frame 0 of action/reward is filler, NaN in the official files, and is
    never read). Fields are checked in the order obs, action, reward; the error names the first offending one.

    Host (NumPy) arrays are scanned in blocks of episodes (a boolean mask of at most ~16 MB at a time); device
    arrays (:class:`OfflineData`) are reduced on the device, and only a field that holds a non-finite value is
    copied to the host to locate it.
    """
    arrays = {name: getattr(episodes, name) for name in FIRST_READ_FRAME}
    flags = None
    if any(isinstance(a, jax.Array) for a in arrays.values()):
        flags = dict(zip(FIRST_READ_FRAME, (bool(f) for f in _finite_flags(*arrays.values())), strict=True))
    for name, first in FIRST_READ_FRAME.items():
        if flags is not None and flags[name]:
            continue
        found = _first_nonfinite(np.asarray(arrays[name]), first)
        if found is None:
            continue
        count, ep, frame = found
        skipped = " (frame 0 of action/reward is filler and not checked)" if first else ""
        raise NonFiniteDataError(
            f"{where}: {name} has {count} non-finite value{'s' * (count != 1)} (NaN/inf) in frames the sampler "
            f"reads{skipped}; the first in episode {ep}, frame {frame} (of {arrays[name].shape[0]} episodes x "
            f"{arrays[name].shape[1]} frames); repair or drop those episodes before training")


@flax.struct.dataclass
class OfflineData:
    """Whole episodes on device, frame-aligned as :class:`Episodes` (index 0 of action/reward is filler,
    kept finite here). obs [E, T+1, O] float32, action [E, T+1, A] float32, reward [E, T+1] float32,
    task [E] int32."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    task: jax.Array

    @property
    def num_episodes(self) -> int:
        return int(self.obs.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.obs.shape[1])


@flax.struct.dataclass
class SamplerState:
    key: jax.Array  # raw uint32[2] key (checkpointable as plain data)
    count: jax.Array  # int32 scalar: batches drawn so far (the data cursor)


def init_cursor(key) -> SamplerState:
    """The data cursor of a new stream: the raw ``uint32[2]`` data of ``key`` (typed or raw) and count 0."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return SamplerState(key=jnp.asarray(key, jnp.uint32), count=jnp.zeros((), jnp.int32))


def uniform_indices(key, i, batch_size: int, num_episodes: int, num_frames: int, horizon: int):
    """Episode and start indices ``(ep [B], start [B])`` of batch ``i`` of the stream with raw key ``key``: B
    uniformly chosen episodes, each at a uniformly chosen start ``s`` in ``[0, T-H]`` (T = num_frames - 1, the
    last frame), so the window ``s..s+H`` fits. Shared by the in-memory and the memory-mapped samplers, so both
    draw the same windows for the same ``(key, i)``; jittable (``batch_size``, ``num_frames`` and ``horizon``
    static; ``num_episodes`` may be traced, as the replay buffer's count of complete episodes)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(key), i)
    k_ep, k_start = jax.random.split(key)
    ep = jax.random.randint(k_ep, (batch_size,), 0, num_episodes)
    start = jax.random.randint(k_start, (batch_size,), 0, num_frames - horizon)
    return ep, start


def gather_windows(data: OfflineData, ep, start, horizon: int) -> Batch:
    """The time-major :class:`Batch` of the windows ``start[b] .. start[b]+H`` of episodes ``ep[b]`` of
    ``data``: ``obs[s..s+H]``, ``action[s+1..s+H]``, ``reward[s+1..s+H]`` and the episode's task (frame 0 of
    action/reward, the filler, is never read). Shared by the offline sampler and the replay buffer."""
    frames = start[None, :] + jnp.arange(horizon + 1)[:, None]  # [H+1, B]
    obs = data.obs[ep[None, :], frames]  # [H+1, B, O]
    action = data.action[ep[None, :], frames[1:]]  # [H, B, A]
    reward = data.reward[ep[None, :], frames[1:]][..., None]  # [H, B, 1]
    return Batch(obs=obs, action=action, reward=reward, task=data.task[ep])


class OfflineSampler:
    """``sampler = OfflineSampler(batch_size=256, horizon=3); data = sampler.load(episodes);
    s = sampler.init(key); batch, s = sampler.sample(data, s)``.

    The object holds only static sizes; ``sample``/``sample_at`` are pure and jittable with the data as an
    argument (``jax.jit(sampler.sample)(data, s)``).
    """

    def __init__(self, batch_size: int, horizon: int, obs_pad: int | None = None, action_pad: int | None = None):
        if isinstance(batch_size, Episodes):
            raise TypeError("OfflineSampler no longer holds the episodes: use "
                            "OfflineSampler(batch_size, horizon, ...) and data = sampler.load(episodes)")
        if batch_size <= 0 or horizon <= 0:
            raise UserError(f"batch_size and horizon must be positive, got {batch_size}, {horizon}")
        self.batch_size, self.horizon = int(batch_size), int(horizon)
        self.obs_pad, self.action_pad = obs_pad, action_pad

    # ------------------------------------------------------------------------------------------- data
    def _check_shapes(self, obs_shape, action_shape, where: str) -> None:
        H = self.horizon
        if obs_shape[1] < H + 2:
            raise UserError(f"{where} have {obs_shape[1]} frames; horizon {H} needs at least "
                            f"{H + 2} (reset frame + H+1 steps)")
        for name, shape, pad in (("obs", obs_shape, self.obs_pad), ("action", action_shape, self.action_pad)):
            if pad is not None and shape[-1] != pad:
                raise UserError(f"{where}' {name} width is {shape[-1]}, the task set pads to {pad}")

    def load(self, episodes: Episodes, device=None) -> OfflineData:
        """Check ``episodes`` against the sampler (shapes; no NaN/inf where the sampler reads, see
        :func:`check_finite`) and copy them to ``device`` (a device or sharding; default device if None) as an
        :class:`OfflineData` pytree."""
        episodes.validate()
        self._check_shapes(episodes.obs.shape, episodes.action.shape, "episodes")
        check_finite(episodes)
        # Filler at index 0 may be NaN; it is never gathered, but keep it finite so a bug cannot hide as NaN.
        host = OfflineData(obs=np.asarray(episodes.obs, np.float32),
                           action=np.nan_to_num(np.asarray(episodes.action, np.float32)),
                           reward=np.nan_to_num(np.asarray(episodes.reward, np.float32)),
                           task=np.asarray(episodes.task, np.int32))
        return jax.device_put(host, device)

    # ------------------------------------------------------------------------------------------ cursor
    def init(self, key) -> SamplerState:
        return init_cursor(key)

    # ---------------------------------------------------------------------------------------- sampling
    def sample_at(self, data: OfflineData, key, i) -> Batch:
        """Batch number ``i`` of the stream with raw ``uint32[2]`` key ``key`` (time-major, see :class:`Batch`).

        obs [H+1, B, O], action [H, B, A], reward [H, B, 1], task [B]; a pure function of ``(data, key, i)``.
        """
        B, H = self.batch_size, self.horizon
        self._check_shapes(data.obs.shape, data.action.shape, "data")  # static shapes: checked at trace time
        num_episodes, num_frames = data.obs.shape[:2]
        ep, start = uniform_indices(key, i, B, num_episodes, num_frames, H)
        return gather_windows(data, ep, start, H)

    def sample(self, data: OfflineData, state: SamplerState) -> tuple[Batch, SamplerState]:
        """Batch number ``state.count`` and the advanced cursor."""
        batch = self.sample_at(data, state.key, state.count)
        return batch, state.replace(count=state.count + 1)
