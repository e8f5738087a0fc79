"""Safe reader of the official TD-MPC2 offline-dataset chunk files (MT30/MT80 ``chunk_*.pt``).

A chunk is a ``tensordict.TensorDict`` saved with ``torch.save``: batch size ``[episodes, frames]`` and keys
``obs [E, T+1, O]`` float32, ``action [E, T+1, A]`` float32, ``reward [E, T+1]`` float32, ``task [E, T+1]``
int (one id per episode). Frame 0 holds the reset observation; ``action[:, i]``/``reward[:, i]`` for i >= 1 are
the action taken from ``obs[:, i-1]`` and its reward, so index 0 of action and reward is filler (NaN or
uninitialised memory) and is never read.

The file is read by the allow-list unpickler of :mod:`mtdistill_jax.checkpoint.torch_pickle`: the only extra
globals allowed are tensordict's ``_make_td`` reducer and the ``TensorDict`` class marker, both replaced by
inert stand-ins that return the tensors as a dict. Nothing from the file is executed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtdistill_jax.checkpoint.torch_pickle import CheckpointFormatError, load_pt
from mtdistill_jax.errors import UserError

KEYS = ("obs", "action", "reward", "task")


class _TensorDictMarker:
    """Stands in for ``tensordict._td.TensorDict``; never instantiated."""


def _make_td(cls: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(state, Mapping) or "_tensordict" not in state:
        raise CheckpointFormatError("TensorDict record without '_tensordict' entries (unsupported tensordict version)")
    out = dict(state["_tensordict"])
    out["__batch_size"] = tuple(state.get("_batch_size") or ())
    return out


_TD_GLOBALS = {
    ("tensordict._reductions", "_make_td"): _make_td,
    ("tensordict._td", "TensorDict"): _TensorDictMarker,
}


@dataclasses.dataclass
class Episodes:
    """Whole episodes, frame-aligned as in the official files (index 0 of action/reward is filler).

    obs [E, T+1, O] float32, action [E, T+1, A] float32, reward [E, T+1] float32, task [E] int32.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    task: np.ndarray

    @property
    def num_episodes(self) -> int:
        return int(self.obs.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.obs.shape[1])

    def validate(self, where: str = "episodes") -> None:
        E, T1 = self.obs.shape[:2]
        for name, arr, ndim in (("obs", self.obs, 3), ("action", self.action, 3), ("reward", self.reward, 2)):
            if arr.ndim != ndim or arr.shape[:2] != (E, T1):
                raise UserError(f"{where}: {name} has shape {list(arr.shape)}, expected [{E}, {T1}, ...] "
                                 f"({ndim}-D, like obs)")
        if self.task.shape != (E,):
            raise UserError(f"{where}: task has shape {list(self.task.shape)}, expected [{E}]")
        if T1 < 2:
            raise UserError(f"{where}: episodes have {T1} frames; at least 2 are needed")


def load_chunk(path: str | os.PathLike) -> Episodes:
    """Read one official chunk file into :class:`Episodes` (no torch, no code execution)."""
    obj = load_pt(path, extra_globals=_TD_GLOBALS)
    where = os.fspath(path)
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{where}: expected a TensorDict of episodes, found {type(obj).__name__}")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise CheckpointFormatError(f"{where}: missing keys {missing}; found {sorted(k for k in obj if k[:2] != '__')}")
    task = np.asarray(obj["task"])
    if task.ndim == 2:
        if not (task == task[:, :1]).all():
            raise CheckpointFormatError(f"{where}: an episode mixes task ids")
        task = task[:, 0]
    eps = Episodes(obs=np.asarray(obj["obs"], np.float32), action=np.asarray(obj["action"], np.float32),
                   reward=np.asarray(obj["reward"], np.float32), task=task.astype(np.int32))
    eps.validate(where)
    return eps


def concat(parts: Sequence[Episodes]) -> Episodes:
    if not parts:
        raise UserError("no episodes to concatenate")
    frames = {p.num_frames for p in parts}
    if len(frames) > 1:
        raise UserError(f"chunks have different episode lengths {sorted(frames)}; load them separately")
    return Episodes(*(np.concatenate([getattr(p, k) for p in parts]) for k in KEYS))


def load_chunks(paths: Sequence[str | os.PathLike]) -> Episodes:
    """Several chunk files as one set of episodes (same episode length)."""
    return concat([load_chunk(p) for p in paths])
