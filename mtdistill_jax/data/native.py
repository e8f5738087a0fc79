"""Native episode dataset: shards of plain ``.npy`` arrays on disk, memory-mapped, sampled on the host.

For datasets far beyond RAM (the official MT30 set: 690,000 episodes, 345,690,000 transitions, ~41 GB as
float32). A dataset is a directory::

    manifest.json                  format name + version, task set (names, per-task obs/action dims, padding),
                                   episode length, episodes per task, dtypes, and one record per shard
    shard_000000_obs.npy           obs    [E, T+1, O] float32 (zero-padded to the task set's obs_pad)
    shard_000000_action.npy        action [E, T+1, A] float32 (index 0 filler, stored as 0)
    shard_000000_reward.npy        reward [E, T+1]    float32 (index 0 filler, stored as 0)
    shard_000000_task.npy          task   [E]         int32
    shard_000001_...

the layout of :class:`~mtdistill_jax.data.tdmpc2_format.Episodes`. A shard record holds its episode range
``[start, stop)``, its file names, their sizes and sha256, and (for imported data) the source chunk file.

- :class:`DatasetWriter` writes one (or continues one with ``append=True``). Episodes are validated when added
  (shapes and widths of the task set, zero padding beyond each task's dims, task ids in range, no NaN/inf in a
  frame the sampler reads: the error names the episode within the added batch and the field). Each shard file
  is written to a temporary name, fsync'ed and renamed, and the manifest is rewritten the same way after each
  shard, so a crash loses at most the episodes not yet flushed.
- :func:`open_dataset` reads only the manifest and the ``.npy`` headers (``np.load(mmap_mode="r")``): opening
  the full MT30 set takes milliseconds and no memory. File sizes, shapes and dtypes are checked against the
  manifest on open; the content (sha256) only by :meth:`NativeDataset.verify`.
- :func:`import_chunks` converts official ``chunk_*.pt`` files (one in memory at a time, through the safe
  reader), resumable and idempotent; ``mtdistill-import-dataset`` is its command line.
- :class:`NativeSampler` draws the windows of :class:`~mtdistill_jax.data.offline.OfflineSampler` (the same
  ``jax.random`` calls, so the same windows for the same key and batch number) and gathers them from the
  memory maps with NumPy; ``mode="balanced"`` gives each task present an equal share of every batch; a host of
  a multi-host run gathers only its rows. :class:`Prefetcher` computes batches in a background thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax.configs.tasks import TaskSet, get_task_set
from mtdistill_jax.data.offline import (
    FIRST_READ_FRAME,
    NonFiniteDataError,
    SamplerState,
    _first_nonfinite,
    init_cursor,
    uniform_indices,
)
from mtdistill_jax.data.tdmpc2_format import KEYS, Episodes, load_chunk
from mtdistill_jax.errors import UserError
from mtdistill_jax.types import Batch

log = logging.getLogger(__name__)

FORMAT = "mtdistill-episodes"  # manifest["format"]
VERSION = 1  # manifest["version"]; readers refuse other versions
MANIFEST = "manifest.json"
DTYPES = {"obs": "float32", "action": "float32", "reward": "float32", "task": "int32"}
MODES = ("uniform", "balanced")
_BLOCK = 1024  # episodes checked at once for padding


class DatasetFormatError(UserError):
    """A native dataset directory does not match its manifest (or has none); the message names the file."""


# ------------------------------------------------------------------------------------------------ file helpers
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


class _HashingFile:
    """A write-only file object that feeds sha256 with what it writes."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def _write_npy(path: str, arr: np.ndarray) -> str:
    """Write ``arr`` as ``.npy`` atomically (temporary name, fsync, rename); returns the file's sha256."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        h = _HashingFile(f)
        np.lib.format.write_array(h, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return h.sha.hexdigest()


def sha256_file(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _shard_files(index: int) -> dict[str, str]:
    return {k: f"shard_{index:06d}_{k}.npy" for k in KEYS}


def _read_manifest(path: str) -> dict:
    """The manifest of the dataset directory ``path``, its format and version checked."""
    if not os.path.isdir(path):
        raise DatasetFormatError(f"{path}: no such dataset directory" if not os.path.exists(path)
                                 else f"{path}: not a directory (a native dataset is a directory with {MANIFEST})")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise DatasetFormatError(f"{path}: no {MANIFEST}: not a native dataset (write one with DatasetWriter or "
                                 "mtdistill-import-dataset)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetFormatError(f"{mpath}: format {found!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DatasetFormatError(f"{mpath}: format version {manifest.get('version')!r}; this reader knows version "
                                 f"{VERSION} (write the dataset again with this version, or upgrade mtdistill-jax)")
    for field in ("task_set", "episode_length", "shards", "num_episodes"):
        if field not in manifest:
            raise DatasetFormatError(f"{mpath}: missing field {field!r}")
    return manifest


def _task_set_info(ts: TaskSet) -> dict:
    return {"task_set": ts.name, "tasks": list(ts.tasks), "obs_dims": list(ts.obs_dims),
            "action_dims": list(ts.action_dims), "obs_pad": ts.obs_pad, "action_pad": ts.action_pad}


# ------------------------------------------------------------------------------------------------- validation
def prepare_episodes(episodes: Episodes, ts: TaskSet, num_frames: int, where: str = "episodes") -> Episodes:
    """``episodes`` checked against the task set and episode length, as float32/int32 arrays (frame-0 filler
    untouched). Errors name the episode (index within ``episodes``) and the field:

    - shapes (:meth:`Episodes.validate`), ``num_frames`` frames, obs/action widths equal to the task set's
      padding;
    - task ids in ``[0, num_tasks)``;
    - no NaN/inf in a frame the sampler reads (frame 0 of action/reward is filler and not checked);
    - zero padding: obs beyond the task's obs dim and action beyond its action dim (frames >= 1) are 0.
    """
    if not isinstance(episodes, Episodes):
        raise UserError(f"{where}: expected Episodes, got {type(episodes).__name__}")
    episodes.validate(where)
    E, frames = episodes.obs.shape[:2]
    if frames != num_frames:
        raise UserError(f"{where}: episodes have {frames} frames; this dataset holds episodes of {num_frames} frames "
                        f"(episode_length {num_frames - 1} + the reset frame)")
    for name, pad in (("obs", ts.obs_pad), ("action", ts.action_pad)):
        width = getattr(episodes, name).shape[-1]
        if width != pad:
            raise UserError(f"{where}: {name} has width {width}; task set {ts.name} pads {name} to {pad}")
    task = np.asarray(episodes.task)
    if not np.issubdtype(task.dtype, np.integer):
        raise UserError(f"{where}: task has dtype {task.dtype}, expected integer task ids")
    bad = np.flatnonzero((task < 0) | (task >= ts.num_tasks))
    if bad.size:
        raise UserError(f"{where}: episode {bad[0]}, field task: id {task[bad[0]]} outside [0, {ts.num_tasks}) of "
                        f"task set {ts.name}")
    out = Episodes(obs=np.asarray(episodes.obs, np.float32), action=np.asarray(episodes.action, np.float32),
                   reward=np.asarray(episodes.reward, np.float32), task=task.astype(np.int32))
    for name, first in FIRST_READ_FRAME.items():
        found = _first_nonfinite(getattr(out, name), first)
        if found is not None:
            count, ep, frame = found
            raise NonFiniteDataError(
                f"{where}: episode {ep}, field {name}: NaN/inf at frame {frame} ({count} non-finite value"
                f"{'s' * (count != 1)} in these {E} episodes; frame 0 of action/reward is filler and not checked)")
    for name, dims, first in (("obs", ts.obs_dims, 0), ("action", ts.action_dims, 1)):
        arr = getattr(out, name)
        limit = np.asarray(dims)[out.task]  # [E]
        for e0 in range(0, E, _BLOCK):
            peak = np.abs(arr[e0:e0 + _BLOCK, first:]).max(axis=1)  # [b, width]
            beyond = peak * (np.arange(arr.shape[-1])[None, :] >= limit[e0:e0 + _BLOCK, None])
            rows = np.flatnonzero(beyond.any(axis=1))
            if rows.size:
                e = e0 + int(rows[0])
                t = int(out.task[e])
                raise UserError(f"{where}: episode {e}, field {name}: nonzero values beyond the {dims[t]} {name} "
                                f"dims of task {ts.tasks[t]} (id {t}); {ts.name} data is zero-padded to "
                                f"{arr.shape[-1]}")
    return out


# ----------------------------------------------------------------------------------------------------- writer
class DatasetWriter:
    """Write (or, with ``append=True``, continue) a native dataset in ``out_dir``.

    ``writer = DatasetWriter(out_dir, "mt30", episode_length=500); writer.add(episodes); ...; writer.close()``
    (or ``with DatasetWriter(...) as writer:``). ``episode_length`` is the number of agent steps T; episodes
    have T+1 frames. Episodes are buffered until ``shard_episodes`` are pending, then written as one shard;
    :meth:`flush` writes what is pending as a (smaller) shard. The manifest is written when the writer is made
    (an empty dataset) and rewritten after each shard.
    """

    def __init__(self, out_dir: str | os.PathLike, task_set: str | TaskSet, episode_length: int, *,
                 shard_episodes: int = 1000, append: bool = False):
        self.path = os.fspath(out_dir)
        self.task_set = task_set if isinstance(task_set, TaskSet) else get_task_set(task_set)
        self.episode_length = int(episode_length)
        if self.episode_length < 1:
            raise UserError(f"episode_length must be >= 1, got {episode_length}")
        if int(shard_episodes) < 1:
            raise UserError(f"shard_episodes must be >= 1, got {shard_episodes}")
        self.shard_episodes = int(shard_episodes)
        self._pending: list[Episodes] = []
        self._pending_n = 0
        self._source: dict | None = None  # import bookkeeping: the chunk file the next shards come from
        self._closed = False
        if os.path.exists(os.path.join(self.path, MANIFEST)):
            if not append:
                raise UserError(f"{self.path} already holds a dataset ({MANIFEST}); pass append=True to continue "
                                "it, or choose another directory")
            self.manifest = _read_manifest(self.path)
            diffs = [f"{k} {self.manifest.get(k)!r} (the writer was given {v!r})"
                     for k, v in (("task_set", self.task_set.name), ("episode_length", self.episode_length))
                     if self.manifest.get(k) != v]
            if diffs:
                raise UserError(f"{self.path}: cannot append: the dataset has " + " and ".join(diffs))
        else:
            os.makedirs(self.path, exist_ok=True)
            self.manifest = {"format": FORMAT, "version": VERSION, **_task_set_info(self.task_set),
                             "episode_length": self.episode_length, "frames_per_episode": self.episode_length + 1,
                             "num_episodes": 0, "task_counts": [0] * self.task_set.num_tasks,
                             "dtypes": dict(DTYPES), "shards": [], "sources": []}
            self._write_manifest()

    @property
    def num_episodes(self) -> int:
        """Episodes on disk (flushed)."""
        return int(self.manifest["num_episodes"])

    @property
    def pending(self) -> int:
        """Episodes added but not yet on disk."""
        return self._pending_n

    def _write_manifest(self) -> None:
        _atomic_write_json(os.path.join(self.path, MANIFEST), self.manifest)

    def add(self, episodes: Episodes, *, where: str = "episodes") -> None:
        """Validate ``episodes`` (any number; see :func:`prepare_episodes`; errors start with ``where``) and
        buffer them; writes every shard that fills up."""
        if self._closed:
            raise UserError("the DatasetWriter is closed")
        eps = prepare_episodes(episodes, self.task_set, self.episode_length + 1, where)
        i, E = 0, eps.num_episodes
        while i < E:
            take = min(E - i, self.shard_episodes - self._pending_n)
            self._pending.append(Episodes(*(np.array(getattr(eps, k)[i:i + take]) for k in KEYS)))
            self._pending_n += take
            i += take
            if self._pending_n >= self.shard_episodes:
                self._write_shard()

    def flush(self) -> None:
        """Write everything pending as one shard (nothing when nothing is pending)."""
        if self._pending_n:
            self._write_shard()

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what is on disk consistent; drop the pending episodes
            self._closed = True

    def _write_shard(self) -> None:
        parts, self._pending, self._pending_n = self._pending, [], 0
        arrays = {k: np.concatenate([getattr(p, k) for p in parts]) if len(parts) > 1 else getattr(parts[0], k)
                  for k in KEYS}
        arrays["action"][:, 0] = 0.0  # filler: never read, stored finite
        arrays["reward"][:, 0] = 0.0
        index = len(self.manifest["shards"])
        start = self.num_episodes
        n = arrays["task"].shape[0]
        files = _shard_files(index)
        sha, sizes = {}, {}
        for k in KEYS:
            full = os.path.join(self.path, files[k])
            sha[k] = _write_npy(full, arrays[k])
            sizes[k] = os.path.getsize(full)
        _fsync_dir(self.path)
        record = {"index": index, "episodes": [start, start + n], "files": files, "bytes": sizes, "sha256": sha,
                  "shapes": {k: list(arrays[k].shape) for k in KEYS}}
        if self._source is not None:
            record["source"] = self._source["name"]
        counts = np.bincount(arrays["task"], minlength=self.task_set.num_tasks)
        self.manifest["shards"].append(record)
        self.manifest["num_episodes"] = start + n
        self.manifest["task_counts"] = [int(a) + int(b) for a, b in zip(self.manifest["task_counts"], counts,
                                                                         strict=True)]
        self._write_manifest()

    # source bookkeeping (import_chunks, collection): shards written between begin_source and end_source are
    # attributed to that source file, which is recorded as done together with its last shard.
    def begin_source(self, record: dict) -> None:
        """Tag the shards written from now on with ``record['name']`` (a chunk file, a collection run).
        :meth:`end_source` flushes and records ``record`` (plus its shard indices) in the manifest's
        ``sources``: a source listed there is complete."""
        self._source = dict(record)

    def end_source(self) -> None:
        self.flush()
        name = self._source["name"]
        shards = [s["index"] for s in self.manifest["shards"] if s.get("source") == name]
        self.manifest["sources"].append({**self._source, "shards": shards})
        self._source = None
        self._write_manifest()


# ---------------------------------------------------------------------------------------------------- reading
def _open_npy(path: str, name: str, shape: Sequence[int], dtype: str, size: int | None) -> np.memmap:
    if not os.path.isfile(path):
        raise DatasetFormatError(f"{path}: missing shard file (listed in the manifest as {name}); the dataset is "
                                 "incomplete: copy it again or re-run the import")
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        what = "truncated" if actual < size else "larger than recorded"
        raise DatasetFormatError(f"{path}: {what}: {actual} bytes, the manifest records {size}; copy the dataset "
                                 "again or re-run the import")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetFormatError(f"{path}: unreadable .npy shard ({e}); copy the dataset again") from e
    if not isinstance(arr, np.memmap) or list(arr.shape) != list(shape) or arr.dtype != np.dtype(dtype):
        raise DatasetFormatError(f"{path}: {getattr(arr, 'dtype', '?')} {list(getattr(arr, 'shape', ()))}, the "
                                 f"manifest says {dtype} {list(shape)}")
    return arr


class NativeDataset:
    """An opened native dataset (see :func:`open_dataset`): memory maps of every shard plus the manifest.

    ``num_frames`` is the number of frames per episode (T+1, as :attr:`Episodes.num_frames`); ``shards`` is a
    list of :class:`Episodes` whose arrays are ``np.memmap``; episode ``i`` of the dataset is episode
    ``i - offsets[s]`` of shard ``s``.
    """

    def __init__(self, path: str, manifest: dict, shards: list[Episodes]):
        self.path, self.manifest, self.shards = path, manifest, shards
        self.task_set = get_task_set(manifest["task_set"])
        self.episode_length = int(manifest["episode_length"])
        self.num_frames = self.episode_length + 1
        self.num_episodes = int(manifest["num_episodes"])
        self.offsets = np.asarray([0] + [s["episodes"][1] for s in manifest["shards"]], np.int64)
        self.task_counts = np.asarray(manifest["task_counts"], np.int64)
        # plain ndarray views of the maps: slicing an np.memmap subclass costs more than the copy of a window
        self._views = [tuple(np.asarray(getattr(s, k)) for k in KEYS) for s in shards]

    @property
    def num_transitions(self) -> int:
        return self.num_episodes * self.episode_length

    @property
    def nbytes(self) -> int:
        return sum(int(b) for s in self.manifest["shards"] for b in s["bytes"].values())

    @functools.cached_property
    def task(self) -> np.ndarray:
        """Task id of every episode, [E] int32 (reads the small task files once)."""
        if not self.shards:
            return np.zeros((0,), np.int32)
        return np.concatenate([np.asarray(s.task) for s in self.shards])

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return (f"NativeDataset({self.path!r}: {self.num_episodes} episodes x {self.num_frames} frames of "
                f"{self.task_set.name}, {len(self.shards)} shards, {self.nbytes / 1e9:.2f} GB)")

    def locate(self, ep) -> tuple[np.ndarray, np.ndarray]:
        """Shard and index within the shard of dataset episode(s) ``ep``."""
        ep = np.asarray(ep, np.int64)
        if ep.size and (ep.min() < 0 or ep.max() >= self.num_episodes):
            raise IndexError(f"episode index out of range [0, {self.num_episodes})")
        shard = np.searchsorted(self.offsets, ep, side="right") - 1
        return shard, ep - self.offsets[shard]

    def episode(self, i: int) -> Episodes:
        """Episode ``i`` as :class:`Episodes` of one episode (copied into memory)."""
        (s,), (e,) = self.locate([i])
        return Episodes(*(np.array(v[e:e + 1]) for v in self._views[s]))

    def episodes(self, index: Sequence[int]) -> Episodes:
        """Episodes ``index`` (in that order) copied into memory."""
        shard, local = self.locate(index)
        rows = [tuple(v[e] for v in self._views[s]) for s, e in zip(shard, local, strict=True)]
        return Episodes(*(np.stack([r[j] for r in rows]) if rows else np.zeros((0,)) for j in range(4)))

    def to_episodes(self) -> Episodes:
        """The whole dataset in memory (small datasets only)."""
        return self.episodes(np.arange(self.num_episodes))

    def windows(self, ep: np.ndarray, start: np.ndarray, horizon: int) -> Batch:
        """Sub-trajectories ``obs[s..s+H]``, ``action[s+1..s+H]``, ``reward[s+1..s+H]`` of episodes ``ep`` at
        starts ``start`` as a time-major NumPy :class:`Batch` (obs [H+1, n, O], action [H, n, A], reward
        [H, n, 1], task [n]); reads only those frames from the maps."""
        H = int(horizon)
        shard, local = self.locate(ep)
        start = np.asarray(start, np.int64)
        n = shard.shape[0]
        obs = np.empty((H + 1, n, self.task_set.obs_pad), np.float32)
        action = np.empty((H, n, self.task_set.action_pad), np.float32)
        reward = np.empty((H, n, 1), np.float32)
        task = np.empty((n,), np.int32)
        views = self._views
        for b in range(n):
            o, a, r, t = views[shard[b]]
            e, s = local[b], start[b]
            obs[:, b] = o[e, s:s + H + 1]
            action[:, b] = a[e, s + 1:s + H + 1]
            reward[:, b, 0] = r[e, s + 1:s + H + 1]
            task[b] = t[e]
        return Batch(obs=obs, action=action, reward=reward, task=task)

    def verify(self, progress: bool = False) -> None:
        """Check the sha256 of every shard file against the manifest (reads the whole dataset); a
        :class:`DatasetFormatError` names the first shard file that differs."""
        from tqdm import tqdm

        files = [(s, k) for s in self.manifest["shards"] for k in KEYS]
        with tqdm(total=self.nbytes, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
            for s, k in files:
                path = os.path.join(self.path, s["files"][k])
                digest = sha256_file(path)
                if digest != s["sha256"][k]:
                    raise DatasetFormatError(f"{path}: sha256 {digest} differs from the manifest's {s['sha256'][k]} "
                                             f"(shard {s['index']}, {k}): the file is corrupt; copy the dataset "
                                             "again or re-run the import")
                bar.update(s["bytes"][k])


def open_dataset(path: str | os.PathLike) -> NativeDataset:
    """Open the native dataset in directory ``path``: reads the manifest and memory-maps every shard (reading
    only the ``.npy`` headers). Missing directory/manifest, another format version, or shard files that do not
    match the manifest (missing, truncated, other shape/dtype) raise :class:`DatasetFormatError`."""
    path = os.fspath(path)
    manifest = _read_manifest(path)
    try:
        ts = get_task_set(manifest["task_set"])
    except KeyError as e:
        raise DatasetFormatError(f"{path}/{MANIFEST}: {e}") from e
    if list(manifest.get("tasks", ts.tasks)) != list(ts.tasks):
        raise DatasetFormatError(f"{path}/{MANIFEST}: the task list differs from this version's {ts.name}")
    F = int(manifest["episode_length"]) + 1
    shapes = {"obs": lambda n: [n, F, ts.obs_pad], "action": lambda n: [n, F, ts.action_pad],
              "reward": lambda n: [n, F], "task": lambda n: [n]}
    shards, expected_start = [], 0
    for rec in manifest["shards"]:
        a, b = rec["episodes"]
        if a != expected_start or b < a:
            raise DatasetFormatError(f"{path}/{MANIFEST}: shard {rec.get('index')} covers episodes [{a}, {b}), "
                                     f"expected to start at {expected_start}")
        expected_start = b
        arrays = {k: _open_npy(os.path.join(path, rec["files"][k]), f"shard {rec['index']} {k}", shapes[k](b - a),
                               manifest.get("dtypes", DTYPES)[k], rec.get("bytes", {}).get(k)) for k in KEYS}
        shards.append(Episodes(**arrays))
    if expected_start != manifest["num_episodes"]:
        raise DatasetFormatError(f"{path}/{MANIFEST}: shards hold {expected_start} episodes, num_episodes says "
                                 f"{manifest['num_episodes']}")
    return NativeDataset(path, manifest, shards)


def is_dataset_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


# ----------------------------------------------------------------------------------------------------- import
def _source_record(path: str) -> dict:
    return {"name": os.path.basename(path), "size": os.path.getsize(path), "sha256": sha256_file(path)}


def _infer_task_set(eps: Episodes, where: str) -> str:
    widths = (eps.obs.shape[-1], eps.action.shape[-1])
    for name in ("mt30", "mt80"):
        ts = get_task_set(name)
        if widths == (ts.obs_pad, ts.action_pad):
            return name
    raise UserError(f"{where}: obs/action widths {widths} match no task set (mt30: (24, 6), mt80: (39, 6))")


def import_chunks(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, task_set: str | None = None,
                  shard_episodes: int = 1000, progress: bool = True) -> NativeDataset:
    """Convert official chunk files ``paths`` into the native dataset ``out`` (created if needed); returns it
    opened.

    One chunk is in memory at a time (read by the safe :func:`~mtdistill_jax.data.tdmpc2_format.load_chunk`,
    validated by :func:`prepare_episodes`; errors name the file). Each chunk's shards are attributed to it in
    the manifest, and the chunk (name, size, sha256) is recorded as done with its last shard. Re-running on a
    finished output is a no-op that says so; on a half-written one, chunks recorded as done (same name and
    size) are skipped and the others (re)imported (shards of an unfinished chunk are dropped first).
    ``task_set``: default from an existing output, else from the chunks' widths (24/6: mt30, 39/6: mt80).
    """
    from tqdm import tqdm

    out = os.fspath(out)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no chunk files to import")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(2, "No such file or directory", p)
    names = [os.path.basename(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"chunk files must have distinct names (the manifest records names): {', '.join(dup)}")
    done: dict[str, dict] = {}
    if is_dataset_dir(out):
        manifest = _read_manifest(out)
        done = {s["name"]: s for s in manifest.get("sources", [])}
        _drop_unfinished(out, manifest)
        task_set = task_set or manifest["task_set"]
    changed = [p for p in paths if os.path.basename(p) in done and done[os.path.basename(p)]["size"]
               != os.path.getsize(p)]
    if changed:
        raise UserError(f"{changed[0]}: a chunk of that name but another size is already in {out}; import it into "
                        "a new directory")
    todo = [p for p in paths if os.path.basename(p) not in done]
    skipped = len(paths) - len(todo)
    if not todo:
        log.info("nothing to do: all %d chunk file(s) are already in %s", len(paths), out)
        return open_dataset(out)
    if skipped:
        log.info("%s: %d chunk file(s) already imported, importing %d", out, skipped, len(todo))
    writer = None
    total = sum(os.path.getsize(p) for p in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="import", disable=not progress,
              dynamic_ncols=True) as bar:
        for p in todo:
            eps = load_chunk(p)
            if writer is None:
                ts = task_set or _infer_task_set(eps, p)
                writer = DatasetWriter(out, ts, eps.num_frames - 1, shard_episodes=shard_episodes, append=True)
            writer.begin_source(_source_record(p))
            _check_length(eps, writer, p)
            writer.add(eps, where=p)  # validated; errors name the file
            writer.end_source()
            del eps
            bar.update(os.path.getsize(p))
            bar.set_postfix(episodes=writer.num_episodes, refresh=False)
    writer.close()
    ds = open_dataset(out)
    log.info("%s: %d episodes in %d shards (%.2f GB)", out, ds.num_episodes, len(ds.shards), ds.nbytes / 1e9)
    return ds


def _check_length(eps: Episodes, writer: DatasetWriter, where: str) -> None:
    if eps.num_frames != writer.episode_length + 1:
        raise UserError(f"{where}: episodes of {eps.num_frames} frames; {writer.path} holds episodes of "
                        f"{writer.episode_length + 1} frames (import chunks of another length into another "
                        "directory)")


def _drop_unfinished(out: str, manifest: dict) -> None:
    """Remove from the manifest (and disk) the trailing shards of a chunk whose import did not finish."""
    done = {s["name"] for s in manifest.get("sources", [])}
    keep = [s for s in manifest["shards"] if s.get("source") is None or s.get("source") in done]
    if len(keep) == len(manifest["shards"]):
        return
    drop = manifest["shards"][len(keep):]
    if keep != manifest["shards"][:len(keep)]:
        raise DatasetFormatError(f"{out}/{MANIFEST}: shards of an unfinished import are not the last ones")
    log.info("%s: dropping %d shard(s) of the unfinished import of %s", out, len(drop),
             ", ".join(sorted({s["source"] for s in drop})))
    counts = np.asarray(manifest["task_counts"], np.int64)
    for s in drop:
        task = np.load(os.path.join(out, s["files"]["task"]), allow_pickle=False) \
            if os.path.isfile(os.path.join(out, s["files"]["task"])) else np.zeros((0,), np.int32)
        counts -= np.bincount(task, minlength=counts.shape[0])[:counts.shape[0]]
    manifest["shards"] = keep
    manifest["num_episodes"] = keep[-1]["episodes"][1] if keep else 0
    manifest["task_counts"] = [int(c) for c in counts]
    _atomic_write_json(os.path.join(out, MANIFEST), manifest)
    for s in drop:
        for f in s["files"].values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, f))


# ---------------------------------------------------------------------------------------------------- sampler
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _uniform_many(key, counts, batch_size, num_episodes, num_frames, horizon):
    return jax.vmap(lambda i: uniform_indices(key, i, batch_size, num_episodes, num_frames, horizon))(counts)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _balanced_many(key, counts, maxvals, num_frames, horizon):
    """Per batch: an index below ``maxvals[b]`` (the row's task's episode count) and a start per row."""

    def one(i, maxval):
        k = jax.random.fold_in(jax.random.wrap_key_data(key), i)
        k_ep, k_start = jax.random.split(k)
        u = jax.random.randint(k_ep, maxval.shape, 0, maxval)
        start = jax.random.randint(k_start, maxval.shape, 0, num_frames - horizon)
        return u, start

    return jax.vmap(one)(counts, maxvals)


class NativeSampler:
    """Host-side sub-trajectory sampler over a :class:`NativeDataset` (NumPy batches, time-major
    :class:`Batch`).

    ``mode="uniform"`` (the official sampler): every row a uniformly chosen episode at a uniformly chosen start;
    batch ``i`` of key ``k`` holds exactly the windows of ``OfflineSampler.sample_at(data, k, i)`` on the same
    episodes (same ``jax.random`` calls, see :func:`~mtdistill_jax.data.offline.uniform_indices`).

    ``mode="balanced"``: each of the P tasks present gets ``B // P`` rows of every batch (rows grouped by task
    id, ascending); the ``r = B % P`` remaining rows go one each to tasks ``(i*r + j) % P`` (j < r) of batch
    ``i``, so over any P consecutive batches every task gets exactly ``B/P`` rows on average. Within a task the
    episode and start are uniform.

    Multi-host: with ``process_count = n`` the host ``process_index = p`` returns rows ``[p*B/n, (p+1)*B/n)`` of
    every batch (it draws all B indices, which is cheap, and gathers only its rows), so the hosts' rows
    together are the single-host batch.

    The data cursor is :class:`~mtdistill_jax.data.offline.SamplerState` (raw key + count), as in memory.
    """

    def __init__(self, dataset: NativeDataset, batch_size: int, horizon: int, *, mode: str = "uniform",
                 process_index: int = 0, process_count: int = 1):
        if mode not in MODES:
            raise UserError(f"unknown sampling mode {mode!r}; valid: {', '.join(MODES)}")
        if batch_size <= 0 or horizon <= 0:
            raise UserError(f"batch_size and horizon must be positive, got {batch_size}, {horizon}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise UserError(f"process_index {process_index} outside [0, {process_count})")
        if batch_size % process_count:
            raise UserError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
        if dataset.num_episodes == 0:
            raise UserError(f"{dataset.path}: the dataset holds no episodes")
        if dataset.num_frames < horizon + 2:
            raise UserError(f"{dataset.path}: episodes have {dataset.num_frames} frames; horizon {horizon} needs at "
                            f"least {horizon + 2} (reset frame + H+1 steps)")
        self.dataset, self.batch_size, self.horizon, self.mode = dataset, int(batch_size), int(horizon), mode
        self.process_index, self.process_count = int(process_index), int(process_count)
        per = self.batch_size // self.process_count
        self.rows = slice(self.process_index * per, (self.process_index + 1) * per)
        if mode == "balanced":
            order = np.argsort(dataset.task, kind="stable")
            self._by_task = order.astype(np.int64)  # episode ids grouped by task
            self.tasks = np.flatnonzero(dataset.task_counts)  # tasks present, ascending
            counts = dataset.task_counts[self.tasks]
            self._first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each task's episodes start
            self._counts = counts
        else:
            self.tasks = np.flatnonzero(dataset.task_counts)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def init(self, key) -> SamplerState:
        return init_cursor(key)

    def task_slots(self, i: int) -> np.ndarray:
        """Balanced mode: index into :attr:`tasks` of each row of batch ``i`` ([B], ascending)."""
        P, B = len(self.tasks), self.batch_size
        base, r = divmod(B, P)
        extra = np.zeros(P, np.int64)
        extra[(int(i) * r + np.arange(r)) % P] = 1
        return np.repeat(np.arange(P), base + extra)

    def indices(self, key, i0: int, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Episode and start indices ``[n, B]`` of batches ``i0 .. i0+n-1`` (all hosts' rows)."""
        key = np.asarray(jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
                         else key, np.uint32)
        counts = np.arange(int(i0), int(i0) + int(n), dtype=np.int32)
        ds, B, H = self.dataset, self.batch_size, self.horizon
        if self.mode == "uniform":
            ep, start = _uniform_many(key, counts, B, ds.num_episodes, ds.num_frames, H)
            return np.asarray(ep), np.asarray(start)
        slots = np.stack([self.task_slots(i) for i in counts])  # [n, B]
        u, start = _balanced_many(key, counts, self._counts[slots].astype(np.int32), ds.num_frames, H)
        ep = self._by_task[self._first[slots] + np.asarray(u)]
        return ep, np.asarray(start)

    def sample_at(self, key, i: int) -> Batch:
        """Batch ``i`` of the stream with raw key ``key``: this host's rows, NumPy, time-major."""
        return self.sample_many(key, i, 1, squeeze=True)

    def sample_many(self, key, i0: int, n: int, pad_to: int | None = None, squeeze: bool = False) -> Batch:
        """Batches ``i0 .. i0+n-1`` stacked on a leading axis (obs [n, H+1, b, O], action [n, H, b, A], reward
        [n, H, b, 1], task [n, b]; b the host's rows), zero-padded to ``pad_to`` batches when given."""
        if n:
            ep, start = self.indices(key, i0, n)
            ep, start = ep[:, self.rows], start[:, self.rows]
        k = n if pad_to is None else max(int(pad_to), n)
        H, b, ts = self.horizon, self.local_batch_size, self.dataset.task_set
        out = Batch(obs=np.zeros((k, H + 1, b, ts.obs_pad), np.float32),
                    action=np.zeros((k, H, b, ts.action_pad), np.float32),
                    reward=np.zeros((k, H, b, 1), np.float32), task=np.zeros((k, b), np.int32))
        for j in range(n):
            w = self.dataset.windows(ep[j], start[j], H)
            for name in ("obs", "action", "reward", "task"):
                getattr(out, name)[j] = getattr(w, name)
        if squeeze:
            return jax.tree_util.tree_map(lambda x: x[0], out)
        return out

    def sample(self, state: SamplerState) -> tuple[Batch, SamplerState]:
        """Batch number ``state.count`` and the advanced cursor (host-side)."""
        batch = self.sample_at(state.key, int(state.count))
        return batch, state.replace(count=jnp.asarray(state.count, jnp.int32) + 1)

    def batches(self, key, start: int = 0, *, prefetch: int = 2, to_device: Callable | None = None) -> Prefetcher:
        """Batches ``start, start+1, ...`` (this host's rows) computed ``prefetch`` ahead in a background thread;
        ``to_device`` (e.g. ``jax.device_put``) is applied there too. Close it (or use ``with``) when done."""

        def make(i):
            batch = self.sample_at(key, i)
            return batch if to_device is None else to_device(batch)

        return Prefetcher(make, _count_from(start), depth=prefetch)


def _count_from(i: int) -> Iterator[int]:
    while True:
        yield i
        i += 1


# -------------------------------------------------------------------------------------------------- prefetch
_DONE = object()


class Prefetcher:
    """``fn(item)`` for each ``item`` of ``items``, computed by one background thread up to ``depth`` items
    ahead and returned in order by ``next()``.

    An exception raised by ``fn`` (or by ``items``) is re-raised by the ``next()`` that would have returned
    that item; ``close()`` (also on ``with`` exit and garbage collection) stops the thread and waits for it.
    One producer thread keeps the order deterministic; ``fn`` runs NumPy gathers and device copies, which
    release the GIL for the large copies.
    """

    def __init__(self, fn: Callable, items: Iterable, depth: int = 2, name: str = "prefetch"):
        if depth < 1:
            raise UserError(f"prefetch depth must be >= 1, got {depth}")
        self._fn, self._items = fn, iter(items)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                if not self._put((True, self._fn(item))):
                    return
            self._put((True, _DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((False, e))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        ok, value = self._queue.get()
        if not ok:
            self._finished = True
            self.close()
            raise value
        if value is _DONE:
            self._finished = True
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

