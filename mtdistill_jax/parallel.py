"""Data parallelism over a ``jax.sharding.Mesh``: batch sharded over the ``data`` axis, params replicated.

Works the same on one host (CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, one GPU node)
and on a multi-host pod after :func:`initialize_distributed`. XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtdistill_jax.types import Batch

DATA_AXIS = "data"


def initialize_distributed(**kwargs) -> None:
    """Multi-host init (``jax.distributed.initialize``); a no-op for a single process."""
    if kwargs or jax.process_count() > 1:
        jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """1-D mesh over ``num_devices`` devices (all by default) with axis name ``data``."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} available")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> Batch:
    """Shardings of a time-major :class:`Batch`: the B axis (1 for obs/action/reward, 0 for task) split."""
    tb = NamedSharding(mesh, P(None, DATA_AXIS))
    return Batch(obs=tb, action=tb, reward=tb, task=NamedSharding(mesh, P(DATA_AXIS)))


def check_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the mesh")


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Place a host or device batch on the mesh (B split across devices)."""
    check_divisible(batch.task.shape[0], mesh)
    return jax.tree_util.tree_map(jax.device_put, batch, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """Copy a pytree to every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def fold_in_process(key):
    """Per-host key (convention 5: ``fold_in(process_index)``)."""
    return jax.random.fold_in(key, jax.process_index())
