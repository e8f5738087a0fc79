"""Data parallelism over a ``jax.sharding.Mesh``: batch sharded over the ``data`` axis, params replicated.

:func:`compile_step` is the one place where steps are jitted with shardings (the learner's update, a scanned
training chunk, ...). Works the same on one host (CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
one GPU node) and on a multi-host pod after ``jax.distributed.initialize()``. XLA inserts the gradient
all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from mtdistill_jax.types import Batch

DATA_AXIS = "data"


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


def batch_specs() -> Batch:
    """Partition specs of a time-major :class:`Batch`: the B axis (1 for obs/action/reward, 0 for task) split."""
    tb = P(None, DATA_AXIS)
    return Batch(obs=tb, action=tb, reward=tb, task=P(DATA_AXIS))


def to_shardings(specs, mesh: Mesh):
    """Shardings on ``mesh`` of a pytree (prefix) of ``PartitionSpec`` / ``Sharding`` / ``None`` (= replicated)."""
    def one(spec):
        if spec is None:
            return NamedSharding(mesh, P())
        return spec if isinstance(spec, Sharding) else NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(one, specs, is_leaf=lambda x: x is None or isinstance(x, (P, Sharding)))


def sharded_param_specs(tree, mesh: Mesh, min_size: int = 1 << 16):
    """PartitionSpecs that split every leaf of ``tree`` with at least ``min_size`` elements and a last axis
    divisible by the mesh size along that last axis over ``data`` (a Linear's output features); other leaves
    replicated. For read-only params (a frozen teacher): each device holds 1/n of the large kernels and XLA
    gathers them where they are used, so per-device memory falls while every step moves the kernels once."""
    n = mesh.devices.size

    def spec(x):
        shape = np.shape(x)
        if len(shape) >= 2 and int(np.prod(shape)) >= min_size and shape[-1] % n == 0:
            return P(*([None] * (len(shape) - 1) + [DATA_AXIS]))
        return P()

    return jax.tree_util.tree_map(spec, tree)


def batch_sharding(mesh: Mesh) -> Batch:
    """Shardings of a time-major :class:`Batch` on ``mesh`` (:func:`batch_specs`)."""
    return to_shardings(batch_specs(), mesh)


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


class _ShardedStep:
    """``jax.jit`` of a step for each number of positional arguments it is called with (optional trailing
    arguments such as ``draws`` / ``aux``), all with the same leading shardings; has ``lower`` like a jit."""

    def __init__(self, fn: Callable, mesh: Mesh, in_specs: Sequence, out_specs, donate_argnums: tuple[int, ...],
                 compiler_options: dict | None = None):
        self._fn, self._mesh, self._in_specs = fn, mesh, tuple(in_specs)
        self._options = compiler_options
        self._out = to_shardings(out_specs, mesh)
        self._donate = donate_argnums
        self._jits: dict[int, Any] = {}
        self.__wrapped__ = fn

    def _jit(self, n: int):
        if n not in self._jits:
            specs = (self._in_specs + (None,) * n)[:n]
            self._jits[n] = jax.jit(self._fn, in_shardings=tuple(to_shardings(s, self._mesh) for s in specs),
                                    out_shardings=self._out, donate_argnums=self._donate,
                                    compiler_options=self._options)
        return self._jits[n]

    def __call__(self, *args):
        return self._jit(len(args))(*args)

    def lower(self, *args):
        return self._jit(len(args)).lower(*args)


def compile_step(fn: Callable, mesh: Mesh | None = None, *, in_specs: Sequence = (), out_specs=None,
                 donate_argnums: int | Sequence[int] = (), compiler_options: dict | None = None):
    """The one jit of a step ``fn(*args)``, with shardings on ``mesh`` (plain ``jax.jit`` without one).

    ``in_specs``: one entry per leading positional argument, each a ``PartitionSpec`` / ``Sharding`` or a
    pytree prefix of them (e.g. :func:`batch_specs` for a batch), ``None`` for replicated; arguments past
    the tuple (e.g. optional ``draws`` / ``aux``) are replicated. ``out_specs`` likewise for the whole
    output (default: replicated). With a mesh, pass arguments positionally. ``compiler_options``: XLA options of
    the step's programs (e.g. :func:`mtdistill_jax.xla_cpu.bf16_dot_options`).
    """
    donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate, compiler_options=compiler_options)
    return _ShardedStep(fn, mesh, in_specs, out_specs, donate, compiler_options)
