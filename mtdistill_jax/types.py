"""Shared types. Shapes: H horizon, B batch, O padded obs dim, A padded action dim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax

Params = Mapping[str, Any]  # nested dict of arrays (Flax params without the 'params' collection key)
PRNGKey = jax.Array  # a typed or raw uint32[2] key
Metrics = Mapping[str, jax.Array]  # scalar metrics named 'train/...', 'eval/<task>/...', 'distill/...'


@flax.struct.dataclass
class Batch:
    """A batch of sub-trajectories, time-major as the official sampler returns them.

    obs:    [H+1, B, O] float32 observations (zero-padded to O)
    action: [H, B, A]   float32 actions taken from obs[t] (zero beyond each task's action dim)
    reward: [H, B, 1]   float32 rewards of those actions
    task:   [B]         int32 task ids (one task per sub-trajectory)
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    task: jax.Array
