"""Pack the simulation dependencies that a GPU machine without package access lacks into one archive.

GPU images for JAX usually carry jax (CUDA), flax, optax, orbax-checkpoint, chex, numpy, scipy, absl-py, etils,
lxml and tqdm, but not MuJoCo, MJX, dm_control or MuJoCo Playground, and often no way to reach a package index.
This script downloads the wheels of those distributions, at the versions installed here (the set the test suite
passed with), for the GPU machine's CPython and platform, unpacks them into one folder, drops the large asset
folders no MT30 task reads (dm_control's locomotion and dog assets, MJX's test data, MuJoCo's studio,
Playground's robot meshes; their Python modules stay, since the packages import them), and writes a
``tar.xz`` of that folder (about 20 MB against 250 MB of wheels).

On the GPU machine: ``mkdir -p /tmp/site && tar xJf deps.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site``
(``benchmarks/gpu/run.sh`` does this itself).

Usage: ``python benchmarks/gpu/pack_deps.py [--python_version 3.12] [--official] [--out .gpu/deps.tar.xz]``.
``--official`` adds what the official PyTorch TD-MPC2 code needs beside torch for ``compare_official.py``
(tensordict, whose compiled helper does not link against torch, and gymnasium for its envs).
``warp-lang`` (150 MB) is left out: MJX and Playground import it only if present and run without it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Distributions the environments, the online loop and the benchmarks import that JAX GPU images lack.
DISTRIBUTIONS = (
    "mujoco", "mujoco-mjx", "dm_control", "playground",
    # what those import at module level
    "brax", "jaxopt", "trimesh", "dm-env", "dm-tree", "labmaze", "glfw", "PyOpenGL", "websockets", "mediapy",
    # ours
    "ml_collections", "tensorboardX",
)

# What the official TD-MPC2 code imports beside torch, numpy and pyyaml (compare_official.py; --official).
OFFICIAL_DISTRIBUTIONS = ("tensordict", "orjson", "gymnasium", "farama-notifications")

# Folders of assets (meshes, textures, test models) that no MT30 task loads; relative to the unpacked site.
PRUNE_DIRS = (
    "dm_control/locomotion",
    "dm_control/blender",
    "dm_control/suite/dog_assets",
    "mujoco/mjx/test_data",
    "mujoco/experimental",
    "learning",  # Playground's notebooks
)
# Folders whose Python modules are imported (package __init__s) but whose other files are robot assets.
PRUNE_NON_PY_UNDER = (
    "mujoco_playground/_src/locomotion",
    "mujoco_playground/_src/manipulation",
)

PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")


def pinned(dists=DISTRIBUTIONS) -> list[str]:
    """``name==version`` for each distribution, at the version installed in this environment."""
    out, missing = [], []
    for name in dists:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed here, so no tested version to pin: {', '.join(missing)} "
                         "(run `make venv` first)")
    return out


def download(requirements: list[str], dest: Path, python_version: str) -> list[Path]:
    """Wheels only, no dependencies resolved (the list above is the closure the GPU image lacks)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, "-d", str(dest), "-q"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + ["--platform", "any", *requirements], check=True)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(requirements):
        raise SystemExit(f"expected {len(requirements)} wheels, got {len(wheels)}: {[w.name for w in wheels]}")
    return wheels


def prune(site: Path) -> int:
    """Remove the asset folders; returns bytes removed. A listed folder that is absent is an error (the layout
    of a package changed, so the list needs a look)."""
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    removed = 0
    for rel in PRUNE_DIRS:
        d = site / rel
        if not d.is_dir():
            raise FileNotFoundError(f"{rel} not in the unpacked wheels: check PRUNE_DIRS against this version")
        removed += size(d)
        shutil.rmtree(d)
    for rel in PRUNE_NON_PY_UNDER:
        d = site / rel
        if not d.is_dir():
            raise FileNotFoundError(f"{rel} not in the unpacked wheels: check PRUNE_NON_PY_UNDER")
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix != ".py":
                removed += f.stat().st_size
                f.unlink()
    return removed


def pack(wheels: list[Path], out: Path, workdir: Path) -> tuple[int, int]:
    """Unpack ``wheels`` into one folder, prune it, write ``out`` (tar.xz). Returns (bytes unpacked, bytes kept)."""
    site = workdir / "site"
    site.mkdir()
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    total = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    kept = total - prune(site)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    with tarfile.open(tmp, "w:xz") as tar:
        for entry in sorted(site.iterdir()):
            tar.add(entry, arcname=entry.name)
    os.replace(tmp, out)
    return total, kept


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python_version", default="3.12", help="the GPU machine's CPython, e.g. 3.12")
    p.add_argument("--official", action="store_true",
                   help="also pack the official TD-MPC2 code's needs (benchmarks/compare_official.py)")
    p.add_argument("--out", default=".gpu/deps.tar.xz")
    args = p.parse_args(argv)
    reqs = pinned(DISTRIBUTIONS + (OFFICIAL_DISTRIBUTIONS if args.official else ()))
    print("packing", " ".join(reqs), f"for CPython {args.python_version}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download(reqs, Path(tmp) / "wheels", args.python_version)
        total, kept = pack(wheels, Path(args.out), Path(tmp))
    print(f"{args.out}: {Path(args.out).stat().st_size / 2**20:.1f} MiB "
          f"({len(wheels)} wheels, {total / 2**20:.0f} MiB unpacked, {kept / 2**20:.0f} MiB kept)")


if __name__ == "__main__":
    main()
