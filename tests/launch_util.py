"""Running the offline launch mains (launch/train.py, launch/distill.py) as a user does, in a subprocess."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
from refdata import REPO, reference_dir

from mtdistill_jax import cli

CHUNK = reference_dir() / "mt30_tiny_chunk.pt"
SMOKE = ["--config.steps=4", "--config.train.batch_size=8", "--config.train.steps_per_dispatch=2",
         "--config.log_every=2", "--save_every=2"]


def chunk():
    if not CHUNK.is_file():
        pytest.skip(f"{CHUNK} not found")
    return CHUNK


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """The environment of a child process on CPU with ``devices`` virtual devices (1: as in a user's run; conftest
    asks for 8 in the test process) and the suite's other XLA flags (LLVM -O0) and persistent cache."""
    env = {**{k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}, "JAX_PLATFORMS": "cpu"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if devices > 1:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["XLA_FLAGS"] = flags
    return env


def launch(script: str, args: list[str], timeout: int = 300, devices: int = 1) -> subprocess.CompletedProcess:
    """``python launch/<script> args`` in a :func:`subprocess_env` child."""
    return subprocess.run([sys.executable, f"launch/{script}", *args], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(devices), timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
