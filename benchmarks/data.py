"""Benchmark: host sampling from a native (memory-mapped) dataset, cold and warm page cache, with and without
prefetch, beside the update steps/s it has to feed.

Writes (once; reused if present) a synthetic dataset of MT30 shapes (episodes of 501 frames, obs 24, action 6)
of ``--gb`` GB with :class:`~mtdistill_jax.data.native.DatasetWriter` in ``--dir`` (default: a directory in the
system temp dir, outside the repository), then draws ``--batches`` batches (batch 256, H 3) of the official
uniform sampler:

- cold: the dataset's pages dropped from the page cache first (``posix_fadvise(DONTNEED)`` on every shard file;
  no root needed) - every window is a read from disk;
- warm: the same batches again right after (every page they touch is cached);

each without prefetch (sample then copy to the device, in the loop) and with a prefetch thread ``--prefetch``
batches ahead (the consumer only takes the batches). It prints the process RSS (current VmRSS, its anonymous
and file-backed parts, and the max RSS from getrusage) before and after sampling, the update steps/s of the 1M
and 5M models on this CPU (benchmarks/update_step.py's batch and timing), and the batches/s an accelerator
needs at ``--accel_ms`` per update, with whether the loader reaches it.

Usage: ``python benchmarks/data.py [--gb 10] [--dir DIR] [--batches 2000] [--prefetch 4] [--sizes 1,5]
[--accel_ms 1=3,5=5] [--delete]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import header, time_jitted  # noqa: E402
from benchmarks.update_step import random_batch  # noqa: E402
from mtdistill_jax.configs import MT30, get_config  # noqa: E402
from mtdistill_jax.data import native  # noqa: E402
from mtdistill_jax.data.tdmpc2_format import Episodes  # noqa: E402

FRAMES = 501
EPISODE_BYTES = FRAMES * (MT30.obs_pad + MT30.action_pad + 1) * 4 + 4


def write_synthetic(path: str, gb: float, block: int = 1000) -> None:
    n = int(gb * 1e9 / EPISODE_BYTES)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with native.DatasetWriter(path, "mt30", FRAMES - 1, shard_episodes=block) as w:
        for e0 in range(0, n, block):
            b = min(block, n - e0)
            task = rng.integers(0, MT30.num_tasks, b).astype(np.int32)
            obs = rng.standard_normal((b, FRAMES, MT30.obs_pad), np.float32)
            action = rng.uniform(-1, 1, (b, FRAMES, MT30.action_pad)).astype(np.float32)
            obs *= np.arange(MT30.obs_pad) < np.asarray(MT30.obs_dims)[task][:, None, None]
            action *= np.arange(MT30.action_pad) < np.asarray(MT30.action_dims)[task][:, None, None]
            reward = rng.uniform(0, 1, (b, FRAMES)).astype(np.float32)
            w.add(Episodes(obs, action, reward, task))
            print(f"\rwriting {path}: {e0 + b}/{n} episodes ({time.perf_counter() - t:.0f} s)", end="", flush=True)
    print(f"\nwrote {n} episodes in {time.perf_counter() - t:.0f} s")


def drop_cache(ds) -> None:
    for s in ds.manifest["shards"]:
        for f in s["files"].values():
            fd = os.open(os.path.join(ds.path, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rss() -> dict[str, float]:
    out = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def fmt_rss(r: dict[str, float]) -> str:
    return (f"VmRSS {r.get('VmRSS', 0):.0f} MB (anon {r.get('RssAnon', 0):.0f}, file {r.get('RssFile', 0):.0f}), "
            f"max RSS {r['maxrss']:.0f} MB")


def rate(sampler: native.NativeSampler, key, n: int, prefetch: int) -> float:
    """Batches/s of ``n`` batches copied to the device, without (0) or with a prefetch thread."""
    def make(i):
        return jax.device_put(sampler.sample_at(key, i))

    t = time.perf_counter()
    if prefetch:
        with native.Prefetcher(make, range(n), depth=prefetch) as it:
            for b in it:
                jax.block_until_ready(b)
    else:
        for i in range(n):
            jax.block_until_ready(make(i))
    return n / (time.perf_counter() - t)


def update_rates(sizes, batch: int, repeats: int) -> dict[int, float]:
    from mtdistill_jax.tdmpc2.train import Learner

    out = {}
    for size in sizes:
        cfg = get_config(size, "mt30")
        cfg.train.batch_size = batch
        learner = Learner(cfg, donate=False)
        state = learner.init(jax.random.key(0))
        b = jax.device_put(random_batch(np.random.default_rng(0), batch, cfg.train.horizon))
        def args_fn(i, state=state, b=b):
            return state, b, jax.random.key(i)

        _, med, _, _ = time_jitted(learner.update_jit, args_fn, repeats)
        out[size] = 1.0 / med
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=10.0)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--sizes", default="1,5")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--accel_ms", default="1=3,5=5", help="assumed accelerator ms per update, size=ms")
    ap.add_argument("--delete", action="store_true", help="delete the dataset at the end")
    args = ap.parse_args()
    path = args.dir or os.path.join(tempfile.gettempdir(), f"mtdistill_bench_data_{args.gb:g}gb")
    print(header())
    if not native.is_dataset_dir(path):
        write_synthetic(path, args.gb)
    t = time.perf_counter()
    ds = native.open_dataset(path)
    print(f"{ds}; opened in {(time.perf_counter() - t) * 1e3:.1f} ms")
    sampler = native.NativeSampler(ds, args.batch, args.horizon)
    key = jax.random.key_data(jax.random.key(0))
    sampler.sample_at(key, 0)  # compile the index draw
    r0 = rss()
    print(f"RSS before sampling: {fmt_rss(r0)}")
    n = args.batches
    results = {}
    for pf in (0, args.prefetch):
        k = jax.random.key_data(jax.random.key(pf + 1))  # other windows for each pass
        drop_cache(ds)
        results[("cold", pf)] = rate(sampler, k, n, pf)
        results[("warm", pf)] = rate(sampler, k, n, pf)
    r1 = rss()
    print(f"RSS after sampling {4 * n} batches: {fmt_rss(r1)}")
    print(f"\n{'cache':>5} {'prefetch':>8} {'batches/s':>10}   (batch {args.batch}, H {args.horizon}, {n} batches)")
    for (cache, pf), v in results.items():
        print(f"{cache:>5} {pf:>8} {v:>10.0f}")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    steps = update_rates(sizes, args.batch, args.repeats)
    accel = {int(a): float(b) for a, b in (x.split("=") for x in args.accel_ms.split(",") if x)}
    best_cold = max(v for (c, _), v in results.items() if c == "cold")
    best_warm = max(v for (c, _), v in results.items() if c == "warm")
    print(f"\n{'size':>5} {'CPU updates/s':>13} {'accel ms':>8} {'needs batches/s':>15} {'cold':>5} {'warm':>5}")
    for size in sizes:
        need = 1e3 / accel[size] if size in accel else float("nan")
        print(f"{size:>4}M {steps[size]:>13.1f} {accel.get(size, float('nan')):>8.1f} {need:>15.0f} "
              f"{'yes' if best_cold >= need else 'no':>5} {'yes' if best_warm >= need else 'no':>5}")
    print(f"(this CPU: the loader's {best_warm:.0f} batches/s warm vs {max(steps.values()):.1f} updates/s)")
    if args.delete:
        import shutil

        shutil.rmtree(path)
        print(f"deleted {path}")


if __name__ == "__main__":
    main()
