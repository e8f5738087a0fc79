"""Training checkpoints that resume: orbax ``CheckpointManager`` over the whole run state.

Each step directory holds three items:

- ``state``: the learner state pytree (``TrainingState``: params, target Qs, both optimiser states, running
  scale, step, carried task-embedding gradient), restored onto a ``jax.eval_shape`` target (shapes, dtypes
  and shardings from the target);
- ``extra``: the run's PRNG key (raw ``uint32`` data) and the data cursor (e.g. the offline sampler state, or
  an online run's replay buffer, env and planner state: any pytree of arrays; typed PRNG keys in it are saved as
  their raw data and come back as keys of the target's implementation, zero-size arrays come back as empty
  arrays of the target's shape);
- ``config``: the full run config as JSON.

Saves are asynchronous by default (the device-to-host copy happens before ``save`` returns, the writes go on
in the background); ``keep`` bounds how many step directories stay on disk. Preemption: ``should_stop(step)``
is true once orbax reports ``reached_preemption`` (multi-host TPU preemption notices) or the process got
SIGTERM/SIGINT after :meth:`CheckpointManager.handle_signals`; save with ``force=True`` then and exit.
Restoring a checkpoint made with another model size or task set raises :class:`ConfigMismatchError` naming
the differing fields, before any tensor is read.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtdistill_jax.errors import UserError

log = logging.getLogger(__name__)

# Config fields whose difference makes a checkpoint unusable (the tensors would not fit), by prefix.
STRUCTURAL_PREFIXES = ("model.",)
EXTRA_VERSION = 1  # layout of the 'extra' item


class ConfigMismatchError(UserError):
    """The checkpoint was written for a different model (names the config fields that differ)."""


class DataMismatchError(UserError):
    """The checkpoint's data item (cursor, replay, env states, ...) does not fit this run's (names the arrays)."""


def _path_names(path) -> tuple[str, ...]:
    """A pytree key path as plain names, the same for a target tree and orbax's saved metadata tree."""
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _metadata_shapes(meta):
    """Shape tuples of a saved item's metadata tree (None for the leaves :func:`encode_data` left out)."""
    return jax.tree_util.tree_map(lambda m: tuple(m.shape), meta,
                                  is_leaf=lambda m: hasattr(m, "shape") and not isinstance(m, dict))


def check_data_fits(saved_shapes, target, where: str) -> None:
    """Raise :class:`DataMismatchError` naming the arrays whose saved shapes (``saved_shapes``: see
    :meth:`CheckpointManager.saved_data_shapes`) are not those of ``target`` (abstract, after :func:`_data_target`),
    or that only one of them has; ``where`` says which checkpoint."""
    def flat(tree, is_leaf):
        return {_path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}

    saved = flat(saved_shapes, lambda x: x is None or isinstance(x, tuple))
    want = {k: None if v is None else tuple(v.shape) for k, v in flat(target, lambda x: x is None).items()}
    bad = [f"{'/'.join(k)}: saved {saved[k]}, this run {want[k]}" for k in sorted(set(saved) & set(want))
           if saved[k] != want[k]]
    bad += [f"{'/'.join(k)}: only in the checkpoint" for k in sorted(set(saved) - set(want))]
    bad += [f"{'/'.join(k)}: not in the checkpoint" for k in sorted(set(want) - set(saved))]
    if bad:
        more = f" (and {len(bad) - 6} more)" if len(bad) > 6 else ""
        raise DataMismatchError(
            f"{where} holds data that does not fit this run: {'; '.join(bad[:6])}{more}. It was written with other "
            "settings or by another version of mtdistill-jax; resume it with those, or give another workdir")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_to_dict(config: ml_collections.ConfigDict | dict) -> dict:
    return json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))


def diff_configs(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, current)}`` for every dotted field whose value differs (or exists on one side)."""
    a, b = _flatten(saved), _flatten(current)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _key_data(key) -> jax.Array:
    if key is None:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, jnp.uint32)


def _is_key(x) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _is_empty(x) -> bool:
    return hasattr(x, "shape") and 0 in tuple(x.shape)


def encode_data(tree):
    """``tree`` as orbax saves it: typed PRNG key leaves as their raw ``uint32`` key data, zero-size leaves
    (e.g. an MJX ``Data`` field of a model without actuators) as ``None`` (orbax refuses empty arrays)."""
    def leaf(x):
        if _is_empty(x):
            return None
        return jax.random.key_data(x) if _is_key(x) else x

    return jax.tree_util.tree_map(leaf, tree)


def _data_target(tree):
    """The restore target of :func:`encode_data`'s output for the abstract ``tree``."""
    def leaf(x):
        if _is_empty(x):
            return None
        return jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x

    return jax.tree_util.tree_map(leaf, tree)


def decode_data(tree, target):
    """Inverse of :func:`encode_data` onto ``target`` (abstract): keys wrapped back in the target's
    implementation, zero-size leaves rebuilt as empty arrays of the target's shape and dtype."""
    def none(x):
        return x is None

    leaves, treedef = jax.tree_util.tree_flatten(target, is_leaf=none)  # None in the target stays None
    restored = jax.tree_util.tree_leaves(tree, is_leaf=none)
    if len(restored) != len(leaves):
        raise ValueError(f"restored data has {len(restored)} leaves, the target {len(leaves)}")

    def leaf(x, t):
        if t is None:
            return None
        if _is_empty(t):
            return jnp.zeros(t.shape, t.dtype)
        if _is_key(t):
            # the key dtype of an abstract target carries its implementation (jax has no public accessor for
            # a ShapeDtypeStruct; jax.random.key_impl needs a concrete key)
            return jax.random.wrap_key_data(jnp.asarray(x, jnp.uint32), impl=t.dtype._impl)
        return x

    return treedef.unflatten([leaf(x, t) for x, t in zip(restored, leaves, strict=True)])


def _with_sharding(tree):
    """Abstract leaves (ShapeDtypeStruct/arrays) with a sharding: the leaf's own, else the default device's."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


class CheckpointManager:
    """``mngr = CheckpointManager(workdir, config)``; ``mngr.save(step, state, rng=key, data=cursor)``;
    ``state, rng, data = mngr.restore(state_target, data_target)`` (latest step by default)."""

    def __init__(self, directory: str | os.PathLike, config: ml_collections.ConfigDict | dict, *, keep: int = 3,
                 save_every: int = 1000, async_save: bool = True, keep_every: int | None = None):
        import orbax.checkpoint as ocp

        if keep is not None and keep < 1:
            raise UserError(f"keep must be >= 1 (or None for all), got {keep}")
        if save_every < 1:
            raise UserError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config_to_dict(config)
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               keep_period=keep_every, enable_async_checkpointing=async_save,
                                               create=True)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("state", "extra"):
            registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
            registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
        registry.add("config", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
        registry.add("config", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
        self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._signalled: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, state, *, rng=None, data=None, force: bool = False) -> bool:
        """Save at ``step`` when the interval says so (or ``force``); returns whether a save started."""
        args = self._ocp.args
        extra = {"rng": _key_data(rng), "data": None if data is None else encode_data(data)}
        extra = {k: v for k, v in extra.items() if v is not None}
        extra["version"] = np.asarray(EXTRA_VERSION, np.int32)  # never an empty item
        return self._mngr.save(int(step), args=args.Composite(
            state=args.StandardSave(state), extra=args.StandardSave(extra), config=args.JsonSave(self.config)),
            force=force)

    def wait_until_finished(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
        self.restore_signal_handlers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------- query
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def saved_data_shapes(self, step: int | None = None):
        """The shapes of the data item saved at ``step`` (latest by default): its tree with a shape tuple per
        array (None for the leaves :func:`encode_data` left out), read from the metadata without loading it."""
        meta = self._mngr.item_metadata(self._resolve(step))["extra"]
        return _metadata_shapes(None if meta is None else meta.get("data"))

    def saved_config(self, step: int | None = None) -> dict:
        step = self._resolve(step)
        return self._mngr.restore(step, args=self._ocp.args.Composite(config=self._ocp.args.JsonRestore()))["config"]

    def _resolve(self, step: int | None) -> int:
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        return step

    def check_config(self, step: int | None = None) -> dict[str, tuple[Any, Any]]:
        """Compare the saved config with this run's: model fields must agree (else
        :class:`ConfigMismatchError` naming them); other differences are returned (and logged)."""
        diff = diff_configs(self.saved_config(step), self.config)
        fatal = {k: v for k, v in diff.items() if k.startswith(STRUCTURAL_PREFIXES)}
        if fatal:
            fields = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in fatal.items())
            raise ConfigMismatchError(f"checkpoint in {self.directory} was written for another model ({fields}); "
                                      "use a matching config or a fresh workdir")
        for k, (a, b) in diff.items():
            log.warning("config field %s differs from the checkpoint's (%r -> %r)", k, a, b)
        return diff

    # --------------------------------------------------------------------------------------------- restore
    def restore(self, state_target, data_target=None, step: int | None = None):
        """Restore ``(state, rng, data)`` at ``step`` (latest by default) onto abstract targets.

        ``state_target``/``data_target`` are pytrees of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the
        init functions) or arrays; leaves come back with the target's shapes, dtypes and shardings. ``rng`` is a
        typed PRNG key (None if none was saved).
        """
        args = self._ocp.args
        step = self._resolve(step)
        self.check_config(step)
        extra_target = {"rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
                        "version": jax.ShapeDtypeStruct((), jnp.int32)}
        if data_target is not None:
            extra_target["data"] = _data_target(data_target)
        saved_extra = self._mngr.item_metadata(step)["extra"]
        if data_target is not None and saved_extra is not None and saved_extra.get("data") is not None:
            check_data_fits(_metadata_shapes(saved_extra["data"]), extra_target["data"],
                            f"checkpoint step {step} in {self.directory}")
        extra_target = {k: v for k, v in extra_target.items() if saved_extra is None or k in saved_extra}
        out = self._mngr.restore(step, args=args.Composite(
            state=args.StandardRestore(_with_sharding(state_target)),
            extra=args.StandardRestore(_with_sharding(extra_target))))
        extra = out["extra"] or {}
        rng = extra.get("rng")
        rng = None if rng is None else jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
        if data_target is not None and "data" not in extra:
            raise ValueError(f"checkpoint step {step} in {self.directory} has no data cursor to restore")
        data = extra.get("data")
        return out["state"], rng, None if data is None else decode_data(data, data_target)

    # ------------------------------------------------------------------------------------------ preemption
    def handle_signals(self, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
        """Turn SIGTERM/SIGINT into a graceful stop: :meth:`should_stop` becomes true (main thread only)."""

        def handler(signum, frame):
            log.warning("received signal %d: will checkpoint and stop at the next step", signum)
            self._signalled = signum

        for s in signals:
            self._old_handlers[s] = signal.signal(s, handler)

    def restore_signal_handlers(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    def should_stop(self, step: int) -> bool:
        """True when the run must checkpoint now and exit (preemption notice or a handled signal)."""
        return self._signalled is not None or bool(self._mngr.reached_preemption(int(step)))
