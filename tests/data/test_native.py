"""Native dataset (mtdistill_jax.data.native): format round trip, memory maps, manifest checks, bad input, the
import of official chunks (resume, no-op re-run), the host sampler (same windows as the in-memory sampler,
balanced mode, per-host rows), prefetch, a memory bound, and the import CLI."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zipfile

import jax
import numpy as np
import pytest
from refdata import REPO, reference_dir

from mtdistill_jax.configs.tasks import MT30
from mtdistill_jax.data import native
from mtdistill_jax.data.native import (
    DatasetFormatError,
    DatasetWriter,
    NativeSampler,
    Prefetcher,
    import_chunks,
    open_dataset,
)
from mtdistill_jax.data.offline import NonFiniteDataError, OfflineSampler
from mtdistill_jax.data.tdmpc2_format import Episodes, load_chunk
from mtdistill_jax.errors import UserError

CHUNK = reference_dir() / "mt30_tiny_chunk.pt"
T = 20  # agent steps of the synthetic episodes (21 frames)


def synthetic(n: int, seed: int = 0, frames: int = T + 1, nan_filler: bool = True) -> Episodes:
    """``n`` MT30-shaped episodes, zero-padded per task; NaN filler at frame 0 of action/reward (as official)."""
    rng = np.random.default_rng(seed)
    task = rng.integers(0, MT30.num_tasks, n).astype(np.int32)
    obs = rng.normal(size=(n, frames, MT30.obs_pad)).astype(np.float32)
    action = rng.uniform(-1, 1, (n, frames, MT30.action_pad)).astype(np.float32)
    for e, t in enumerate(task):
        obs[e, :, MT30.obs_dims[t]:] = 0
        action[e, :, MT30.action_dims[t]:] = 0
    reward = rng.uniform(0, 1, (n, frames)).astype(np.float32)
    if nan_filler:
        action[:, 0], reward[:, 0] = np.nan, np.nan
    return Episodes(obs, action, reward, task)


def _with_zero_filler(e: Episodes) -> Episodes:
    action, reward = e.action.copy(), e.reward.copy()
    action[:, 0], reward[:, 0] = 0, 0
    return Episodes(e.obs, action, reward, e.task)


def _assert_episodes_equal(a: Episodes, b: Episodes):
    for k in ("obs", "action", "reward", "task"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write(path, eps: Episodes, shard_episodes: int = 10) -> None:
    with DatasetWriter(path, "mt30", T, shard_episodes=shard_episodes) as w:
        w.add(eps)


# ------------------------------------------------------------------------------------------------ format
def test_round_trip_manifest_and_memory_maps(tmp_path):
    eps = synthetic(25)
    w = DatasetWriter(tmp_path / "ds", "mt30", T, shard_episodes=10)
    w.add(Episodes(*(getattr(eps, k)[:13] for k in ("obs", "action", "reward", "task"))))
    assert w.num_episodes == 10 and w.pending == 3  # one full shard on disk
    w.add(Episodes(*(getattr(eps, k)[13:] for k in ("obs", "action", "reward", "task"))))
    w.close()
    ds = open_dataset(tmp_path / "ds")
    m = ds.manifest
    assert m["format"] == native.FORMAT and m["version"] == native.VERSION and m["task_set"] == "mt30"
    assert m["obs_dims"] == list(MT30.obs_dims) and m["action_dims"] == list(MT30.action_dims)
    assert m["episode_length"] == T and m["frames_per_episode"] == T + 1 and m["dtypes"]["task"] == "int32"
    assert [s["episodes"] for s in m["shards"]] == [[0, 10], [10, 20], [20, 25]]
    assert all(len(s["sha256"]) == 4 and all(len(h) == 64 for h in s["sha256"].values()) for s in m["shards"])
    assert ds.num_episodes == 25 and ds.num_frames == T + 1 and ds.num_transitions == 25 * T
    np.testing.assert_array_equal(ds.task_counts, np.bincount(eps.task, minlength=30))
    for shard in ds.shards:
        for k in ("obs", "action", "reward", "task"):
            assert isinstance(getattr(shard, k), np.memmap)
    _assert_episodes_equal(ds.to_episodes(), _with_zero_filler(eps))  # filler stored as 0
    clean = _with_zero_filler(eps)
    _assert_episodes_equal(ds.episode(13), Episodes(*(getattr(clean, k)[13:14] for k in ("obs", "action", "reward",
                                                                                        "task"))))
    ds.verify()
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "ds"))


def test_open_reads_no_shard_content_verify_does(tmp_path):
    _write(tmp_path / "ds", synthetic(12))
    path = tmp_path / "ds" / "shard_000001_obs.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip a data byte (not the header): opening cannot notice, verify must
    path.write_bytes(bytes(raw))
    ds = open_dataset(tmp_path / "ds")
    assert ds.num_episodes == 12
    with pytest.raises(DatasetFormatError, match=r"shard_000001_obs\.npy: sha256 .* differs .*shard 1, obs"):
        ds.verify()


def test_writer_crash_append_and_mismatch(tmp_path):
    eps = synthetic(15)
    w = DatasetWriter(tmp_path, "mt30", T, shard_episodes=10)
    w.add(eps)
    del w  # a crash: the 5 pending episodes are lost, the first shard is on disk and in the manifest
    assert open_dataset(tmp_path).num_episodes == 10
    with pytest.raises(UserError, match="already holds a dataset .*append=True"):
        DatasetWriter(tmp_path, "mt30", T)
    with pytest.raises(UserError, match=r"cannot append: the dataset has task_set 'mt30' \(the writer was given "
                                        r"'mt80'\)"):
        DatasetWriter(tmp_path, "mt80", T, append=True)
    with pytest.raises(UserError, match=r"cannot append: the dataset has episode_length 20 \(the writer was given "
                                        r"100\)"):
        DatasetWriter(tmp_path, "mt30", 100, append=True)
    with DatasetWriter(tmp_path, "mt30", T, append=True) as w:
        w.add(Episodes(*(getattr(eps, k)[10:] for k in ("obs", "action", "reward", "task"))))
    ds = open_dataset(tmp_path)
    _assert_episodes_equal(ds.to_episodes(), _with_zero_filler(eps))


def _bad(kind: str) -> tuple[Episodes, str]:
    e = synthetic(6, nan_filler=True)
    obs, action, reward, task = e.obs.copy(), e.action.copy(), e.reward.copy(), e.task.copy()
    if kind == "obs-width":
        return Episodes(obs[..., :20], action, reward, task), r"obs has width 20; task set mt30 pads obs to 24"
    if kind == "frames":
        return synthetic(2, frames=T), r"episodes have 20 frames; this dataset holds episodes of 21 frames"
    if kind == "task-id":
        task[4] = 30
        return Episodes(obs, action, reward, task), r"episode 4, field task: id 30 outside \[0, 30\) of task set mt30"
    if kind == "nan-action":
        action[2, 3, 0] = np.nan
        return Episodes(obs, action, reward, task), r"episode 2, field action: NaN/inf at frame 3"
    if kind == "inf-reward":
        reward[5, T] = np.inf
        return Episodes(obs, action, reward, task), r"episode 5, field reward: NaN/inf at frame 20"
    if kind == "padding":
        task[:] = 7  # pendulum-swingup: 3 obs dims
        obs[:, :, 3:] = 0
        action[:, 1:, 1:] = 0
        obs[1, 4, 10] = 0.5
        return Episodes(obs, action, reward, task), r"episode 1, field obs: nonzero values beyond the 3 obs dims"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["obs-width", "frames", "task-id", "nan-action", "inf-reward", "padding"])
def test_bad_episodes_are_rejected_naming_episode_and_field(tmp_path, kind):
    eps, pattern = _bad(kind)
    w = DatasetWriter(tmp_path, "mt30", T)
    with pytest.raises(UserError, match=pattern) as e:
        w.add(eps)
    if kind.startswith(("nan", "inf")):
        assert isinstance(e.value, NonFiniteDataError)
    assert w.pending == 0 and open_dataset(tmp_path).num_episodes == 0


def test_open_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such dataset directory"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(DatasetFormatError, match="no manifest.json: not a native dataset"):
        open_dataset(tmp_path)
    _write(tmp_path / "ds", synthetic(25))
    mpath = tmp_path / "ds" / "manifest.json"
    good = json.loads(mpath.read_text())

    def broken(edit):
        m = json.loads(json.dumps(good))
        edit(m)
        mpath.write_text(json.dumps(m))

    broken(lambda m: m.update(version=2))
    with pytest.raises(DatasetFormatError, match="format version 2; this reader knows version 1"):
        open_dataset(tmp_path / "ds")
    broken(lambda m: m["shards"][1].update(episodes=[10, 21]))  # the manifest disagrees with the file's shape
    with pytest.raises(DatasetFormatError, match=r"shard_000001_obs\.npy: float32 \[10, 21, 24\], the manifest says "
                                                 r"float32 \[11, 21, 24\]"):
        open_dataset(tmp_path / "ds")
    mpath.write_text(json.dumps(good))
    obs2 = tmp_path / "ds" / "shard_000002_obs.npy"
    data = obs2.read_bytes()
    obs2.write_bytes(data[:-100])
    with pytest.raises(DatasetFormatError, match=r"shard_000002_obs\.npy: truncated: \d+ bytes, the manifest records"):
        open_dataset(tmp_path / "ds")
    obs2.write_bytes(data)
    os.remove(tmp_path / "ds" / "shard_000001_reward.npy")
    with pytest.raises(DatasetFormatError, match=r"shard_000001_reward\.npy: missing shard file"):
        open_dataset(tmp_path / "ds")
    # a shard file of another dtype (same size): named with what the manifest says
    np.save(tmp_path / "ds" / "shard_000001_reward.npy", np.zeros((10, T + 1), np.int32))
    with pytest.raises(DatasetFormatError, match=r"shard_000001_reward\.npy: int32 \[10, 21\], the manifest says "
                                                 r"float32 \[10, 21\]"):
        open_dataset(tmp_path / "ds")


# ----------------------------------------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    out = tmp_path_factory.mktemp("tiny")
    ds = import_chunks([CHUNK], out, shard_episodes=3, progress=False)  # windows come from 4 shards
    return ds, load_chunk(CHUNK)


def test_sampler_gives_the_in_memory_windows(tiny):
    ds, eps = tiny
    assert len(ds.shards) == 4
    for B, H in ((64, 3), (7, 5)):
        mem = OfflineSampler(B, H, 24, 6)
        data = mem.load(eps)
        sample_at = jax.jit(mem.sample_at)
        host = NativeSampler(ds, B, H)
        for seed in (0, 1, 42):
            key = jax.random.key_data(jax.random.key(seed))
            for i in (0, 1, 2, 999, 2**20 + 3):
                _assert_tree_equal(host.sample_at(key, i), sample_at(data, key, i))
            many = host.sample_many(key, 5, 3)
            for j in range(3):
                _assert_tree_equal(jax.tree_util.tree_map(lambda x, j=j: x[j], many), sample_at(data, key, 5 + j))
    # the cursor: the same SamplerState as in memory
    state = host.init(jax.random.key(3))
    batch, state2 = host.sample(state)
    assert int(state2.count) == 1
    _assert_tree_equal(batch, sample_at(data, state.key, 0))


def test_per_host_rows_make_the_single_host_batch(tiny):
    ds, _ = tiny
    key = jax.random.key_data(jax.random.key(7))
    for mode in ("uniform", "balanced"):
        full = NativeSampler(ds, 64, 3, mode=mode).sample_many(key, 11, 2)
        parts = [NativeSampler(ds, 64, 3, mode=mode, process_index=p, process_count=4).sample_many(key, 11, 2)
                 for p in range(4)]
        assert parts[0].obs.shape == (2, 4, 16, 24)
        joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=-1 if xs[0].ndim == 2 else 2), *parts)
        _assert_tree_equal(joined, full)
    with pytest.raises(UserError, match="batch_size 64 is not divisible by the 3 hosts"):
        NativeSampler(ds, 64, 3, process_count=3)


def test_balanced_mode_shares(tiny):
    ds, eps = tiny
    s = NativeSampler(ds, 64, 3, mode="balanced")  # 5 tasks: 12 rows each + 4 rotating extra rows
    np.testing.assert_array_equal(s.tasks, [0, 7, 8, 12, 29])
    key = jax.random.key_data(jax.random.key(0))
    totals = np.zeros(30, np.int64)
    for i in range(5):
        b = s.sample_at(key, i)
        counts = np.bincount(b.task, minlength=30)[s.tasks]
        extra = np.zeros(5, np.int64)
        extra[(i * 4 + np.arange(4)) % 5] = 1
        np.testing.assert_array_equal(counts, 12 + extra)
        assert (np.diff(b.task) >= 0).all()  # rows grouped by task, ascending
        totals += np.bincount(b.task, minlength=30)
        # every row is a real window of an episode of its task
        ep, start = s.indices(key, i)
        np.testing.assert_array_equal(eps.task[ep[0]], b.task)
        np.testing.assert_array_equal(b.obs[:, 5], eps.obs[ep[0, 5], start[0, 5]:start[0, 5] + 4])
    np.testing.assert_array_equal(totals[s.tasks], [64] * 5)  # equal over any 5 consecutive batches
    with pytest.raises(UserError, match="unknown sampling mode 'tasks'; valid: uniform, balanced"):
        NativeSampler(ds, 64, 3, mode="tasks")


def test_prefetch_order_errors_and_shutdown():
    with Prefetcher(lambda i: (time.sleep(0.001 * (i % 3)), i * i)[1], range(20), depth=3) as p:
        assert list(p) == [i * i for i in range(20)]

    def fail_at_5(i):
        if i == 5:
            raise KeyError("item 5")
        return i

    p = Prefetcher(fail_at_5, range(10), depth=2)
    assert [next(p) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="item 5"):
        next(p)
    assert not p.alive
    with pytest.raises(StopIteration):
        next(p)
    # an endless producer blocked on a full queue stops on close
    started = threading.active_count()
    p = Prefetcher(lambda i: i, iter(int, 1), depth=2)
    assert next(p) == 0 and next(p) == 0
    p.close()
    assert not p.alive and threading.active_count() == started


def test_sampler_prefetch_matches_direct(tiny):
    ds, _ = tiny
    s = NativeSampler(ds, 32, 3)
    key = jax.random.key_data(jax.random.key(1))
    with s.batches(key, start=4, prefetch=3, to_device=jax.device_put) as it:
        got = [next(it) for _ in range(6)]
    for j, b in enumerate(got):
        assert isinstance(b.obs, jax.Array)
        _assert_tree_equal(b, s.sample_at(key, 4 + j))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    pytest.skip("/proc/self/status has no " + field)


RSS_BOUND_MB = 64  # anonymous memory (heap) growth allowed while sampling 2000 batches from a 250 MB dataset


def test_sampling_memory_stays_bounded(tmp_path):
    """The maps are file-backed: sampled pages count in VmRSS as page cache the kernel can drop, never in the
    process's anonymous memory. 2000 batches of 256 x 4 frames from a ~250 MB dataset (more than its size in
    windows) must not grow anonymous RSS by more than RSS_BOUND_MB."""
    with DatasetWriter(tmp_path, "mt30", 500, shard_episodes=500) as w:
        for k in range(8):
            w.add(synthetic(500, seed=k, frames=501))
    ds = open_dataset(tmp_path)
    assert ds.nbytes > 240e6
    s = NativeSampler(ds, 256, 3)
    key = jax.random.key_data(jax.random.key(0))
    s.sample_many(key, 0, 10)  # compile the index draw
    before = _rss_kb("RssAnon")
    for i in range(0, 2000, 100):
        s.sample_many(key, i, 100)
    grown_mb = (_rss_kb("RssAnon") - before) / 1024
    assert grown_mb < RSS_BOUND_MB, grown_mb


# ------------------------------------------------------------------------------------------------ import
class _Pickle:
    """Protocol-2 opcodes for a tensordict chunk as torch.save writes it (no torch needed)."""

    def __init__(self):
        self.parts = [b"\x80\x02"]

    def op(self, b):
        self.parts.append(b)
        return self

    def glob(self, module, name):
        return self.op(b"c" + f"{module}\n{name}\n".encode())

    def str_(self, s):
        d = s.encode()
        return self.op(b"X" + struct.pack("<I", len(d)) + d)

    def int_(self, v):
        return self.op(b"J" + struct.pack("<i", v))

    def ints(self, vs):
        self.op(b"(")
        for v in vs:
            self.int_(v)
        return self.op(b"t")

    def tensor(self, storage, key, shape):
        numel = int(np.prod(shape))
        stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self.glob("torch._utils", "_rebuild_tensor_v2").op(b"(")
        self.op(b"(").str_("storage").glob("torch", storage).str_(key).str_("cpu").int_(numel).op(b"t").op(b"Q")
        self.int_(0).ints(shape).ints(stride).op(b"\x89")
        return self.glob("collections", "OrderedDict").op(b")R").op(b"tR")


def write_chunk(path, eps: Episodes, task_2d: np.ndarray | None = None) -> None:
    """An official-format chunk file (tensordict of obs/action/reward/task [E, T+1])."""
    E, F = eps.obs.shape[:2]
    task = np.repeat(eps.task[:, None], F, 1).astype(np.int64) if task_2d is None else task_2d.astype(np.int64)
    arrays = {"obs": eps.obs, "action": eps.action, "reward": eps.reward, "task": task}
    p = _Pickle().glob("tensordict._reductions", "_make_td").op(b"(").glob("tensordict._td", "TensorDict")
    p.op(b"}(").str_("_tensordict").op(b"}(")
    for i, (k, a) in enumerate(arrays.items()):
        p.str_(k).tensor("LongStorage" if a.dtype == np.int64 else "FloatStorage", str(i), a.shape)
    p.op(b"u").str_("_batch_size").ints((E, F)).op(b"u").op(b"tR")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"".join(p.parts) + b".")
        z.writestr("archive/byteorder", b"little")
        for i, a in enumerate(arrays.values()):
            z.writestr(f"archive/data/{i}", np.ascontiguousarray(a).tobytes())
        z.writestr("archive/version", b"3\n")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture
def chunks(tmp_path):
    parts = [synthetic(5, seed=s) for s in range(3)]
    paths = []
    for i, e in enumerate(parts):
        paths.append(tmp_path / f"chunk_{i}.pt")
        write_chunk(paths[-1], e)
    return paths, parts


def test_chunk_writer_reads_back(chunks):
    paths, parts = chunks
    _assert_episodes_equal(load_chunk(paths[1]), parts[1])


def test_import_resume_and_rerun(tmp_path, chunks, monkeypatch, caplog):
    paths, parts = chunks
    clean = import_chunks(paths, tmp_path / "clean", shard_episodes=2, progress=False)
    m = clean.manifest
    assert [s["name"] for s in m["sources"]] == ["chunk_0.pt", "chunk_1.pt", "chunk_2.pt"]
    assert m["sources"][1]["shards"] == [3, 4, 5] and m["shards"][4]["source"] == "chunk_1.pt"
    assert m["sources"][0]["size"] == os.path.getsize(paths[0])
    assert m["sources"][0]["sha256"] == native.sha256_file(str(paths[0]))
    whole = Episodes(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("obs", "action", "reward", "task")))
    _assert_episodes_equal(clean.to_episodes(), _with_zero_filler(whole))

    # a crash in the middle of chunk_1: its first shards are on disk and in the manifest, it is not recorded done
    out = tmp_path / "out"
    real_end = DatasetWriter.end_source

    def crash(self):
        if self._source["name"] == "chunk_1.pt":
            self.flush()
            raise KeyboardInterrupt
        real_end(self)

    monkeypatch.setattr(DatasetWriter, "end_source", crash)
    with pytest.raises(KeyboardInterrupt):
        import_chunks(paths, out, shard_episodes=2, progress=False)
    half = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in half["sources"]] == ["chunk_0.pt"] and half["num_episodes"] == 10
    monkeypatch.setattr(DatasetWriter, "end_source", real_end)
    resumed = import_chunks(paths, out, shard_episodes=2, progress=False)
    assert resumed.manifest["shards"] == m["shards"] and resumed.manifest["sources"] == m["sources"]
    resumed.verify()

    before = (out / "manifest.json").read_text()
    with caplog.at_level("INFO", logger=native.__name__):
        again = import_chunks(paths, out, progress=False)
    assert "nothing to do: all 3 chunk file(s) are already in" in caplog.text
    assert (out / "manifest.json").read_text() == before and again.num_episodes == 15


def test_import_rejects_bad_chunks_naming_the_file(tmp_path):
    e = synthetic(3)
    task = np.repeat(e.task[:, None], T + 1, 1)
    task[1, 7] = (task[1, 7] + 1) % 30
    write_chunk(tmp_path / "mixed.pt", e, task_2d=task)
    with pytest.raises(UserError, match=r"mixed\.pt: an episode mixes task ids"):
        import_chunks([tmp_path / "mixed.pt"], tmp_path / "out", progress=False)
    obs = e.obs.copy()
    obs[2, 9, 0] = np.inf
    write_chunk(tmp_path / "nan.pt", Episodes(obs, e.action, e.reward, e.task))
    with pytest.raises(NonFiniteDataError, match=r"nan\.pt: episode 2, field obs: NaN/inf at frame 9"):
        import_chunks([tmp_path / "nan.pt"], tmp_path / "out", progress=False)
    assert open_dataset(tmp_path / "out").num_episodes == 0


# --------------------------------------------------------------------------------------------------- CLI
def _cli(args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("MTDISTILL_TRACEBACK", None)
    return subprocess.run([sys.executable, "launch/import_dataset.py", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_cli(tmp_path, chunks):
    paths, _ = chunks
    r = _cli([f"--from={tmp_path}/chunk_*.pt", f"--out={tmp_path}/ds", "--shard_episodes=4", "--noprogress"])
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path}/ds: 15 episodes (300 transitions) of mt30 in 6 shards" in r.stdout
    for args, code, pattern in [
        ([f"--from={tmp_path}/none_*.pt", f"--out={tmp_path}/x"], 1,
         r"error: no such file or directory: .*none_\*\.pt"),
        ([f"--out={tmp_path}/x"], 2, r"error: give --from=CHUNKS and --out=DIR \(or --verify=DIR\)"),
        ([f"--verify={tmp_path}"], 1, r"error: .*: no manifest.json: not a native dataset .*"),
        ([f"--from={tmp_path}", f"--out={tmp_path}/x"], 2, r"error: --from=.* is a directory; give chunk files .*"),
    ]:
        r = _cli(args)
        assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and re.fullmatch(pattern, r.stderr.strip()), r.stderr
