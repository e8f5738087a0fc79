"""Discovery of the reference data made with the official TD-MPC2 code.

The directory comes from ``MTDISTILL_REFERENCE_DIR`` (default ``<repo>/../shared/reference``); files are
found by pattern, so further files of the same kinds are tested without code changes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    return Path(os.environ.get("MTDISTILL_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def world_model_cases() -> list[str]:
    """Names ``<name>`` with ``wm_<name>.pt``, ``_release.pt``, ``_config.json`` and ``_io.npz`` all present."""
    d = reference_dir()
    if not d.is_dir():
        return []
    names = []
    for p in sorted(d.glob("wm_*.pt")):
        m = re.fullmatch(r"wm_(.+)\.pt", p.name)
        if not m or m.group(1).endswith("_release"):
            continue
        name = m.group(1)
        if all((d / f"wm_{name}{suffix}").is_file() for suffix in ("_release.pt", "_config.json", "_io.npz")):
            names.append(name)
    return names


def load_case(name: str):
    d = reference_dir()
    cfg = json.loads((d / f"wm_{name}_config.json").read_text())
    io = dict(np.load(d / f"wm_{name}_io.npz"))
    return cfg, io


def env_episode_files() -> list[Path]:
    """Every ``envs/<task>_seed<k>.npz`` recorded from the official TD-MPC2 environments."""
    d = reference_dir() / "envs"
    return sorted(d.glob("*_seed*.npz")) if d.is_dir() else []


def env_index() -> dict:
    p = reference_dir() / "envs" / "index.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def update_cases() -> list[str]:
    """Names ``<name>`` with ``update_<name>.npz`` and ``update_<name>_config.json`` both present."""
    d = reference_dir()
    if not d.is_dir():
        return []
    names = []
    for p in sorted(d.glob("update_*.npz")):
        name = re.fullmatch(r"update_(.+)\.npz", p.name).group(1)
        if (d / f"update_{name}_config.json").is_file():
            names.append(name)
    return names


def load_update_case(name: str):
    """``(config json, npz arrays)`` of an update-step reference."""
    d = reference_dir()
    cfg = json.loads((d / f"update_{name}_config.json").read_text())
    return cfg, dict(np.load(d / f"update_{name}.npz"))


def load_experiment(name: str):
    """The module of ``experiments/<name>.py`` (experiment scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
