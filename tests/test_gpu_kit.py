"""benchmarks/gpu: the dependency packer's pinning and pruning, and run.sh's refusals (no GPU, no network)."""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import pack_deps  # noqa: E402


def test_pinned_uses_the_installed_versions_and_names_missing_ones():
    assert pack_deps.pinned(("mujoco", "ml_collections")) == [
        f"mujoco=={importlib.metadata.version('mujoco')}",
        f"ml_collections=={importlib.metadata.version('ml_collections')}"]
    with pytest.raises(SystemExit, match="no-such-dist-xyz"):
        pack_deps.pinned(("mujoco", "no-such-dist-xyz"))


def test_every_packed_distribution_is_installed_here():
    assert len(pack_deps.pinned()) == len(pack_deps.DISTRIBUTIONS)


def _fake_site(root: Path) -> None:
    for rel in pack_deps.PRUNE_DIRS:
        (root / rel).mkdir(parents=True)
        (root / rel / "big.bin").write_bytes(b"x" * 1000)
    for rel in pack_deps.PRUNE_NON_PY_UNDER:
        (root / rel / "robot").mkdir(parents=True)
        (root / rel / "__init__.py").write_text("")
        (root / rel / "robot" / "env.py").write_text("X = 1\n")
        (root / rel / "robot" / "mesh.stl").write_bytes(b"y" * 500)
    (root / "dm_control" / "suite").mkdir(parents=True, exist_ok=True)
    (root / "dm_control" / "suite" / "walker.xml").write_text("<mujoco/>")


def test_prune_drops_assets_and_keeps_modules(tmp_path):
    _fake_site(tmp_path)
    removed = pack_deps.prune(tmp_path)
    assert removed == 1000 * len(pack_deps.PRUNE_DIRS) + 500 * len(pack_deps.PRUNE_NON_PY_UNDER)
    for rel in pack_deps.PRUNE_DIRS:
        assert not (tmp_path / rel).exists()
    for rel in pack_deps.PRUNE_NON_PY_UNDER:
        assert (tmp_path / rel / "robot" / "env.py").is_file()
        assert not (tmp_path / rel / "robot" / "mesh.stl").exists()
    assert (tmp_path / "dm_control" / "suite" / "walker.xml").is_file()


def test_prune_refuses_a_layout_it_does_not_know(tmp_path):
    _fake_site(tmp_path)
    (tmp_path / pack_deps.PRUNE_DIRS[0] / "big.bin").unlink()
    (tmp_path / pack_deps.PRUNE_DIRS[0]).rmdir()
    with pytest.raises(FileNotFoundError, match=pack_deps.PRUNE_DIRS[0]):
        pack_deps.prune(tmp_path)


def test_pack_writes_one_archive_of_the_pruned_wheels(tmp_path):
    src = tmp_path / "src"
    _fake_site(src)
    wheels = []
    for top in sorted({Path(rel).parts[0] for rel in (*pack_deps.PRUNE_DIRS, *pack_deps.PRUNE_NON_PY_UNDER)}):
        w = tmp_path / f"{top}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            for f in (src / top).rglob("*"):
                if f.is_file():
                    z.write(f, f.relative_to(src).as_posix())
        wheels.append(w)
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "deps" / "deps.tar.xz"
    total, kept = pack_deps.pack(wheels, out, work)
    assert total - kept == 1000 * len(pack_deps.PRUNE_DIRS) + 500 * len(pack_deps.PRUNE_NON_PY_UNDER)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert "dm_control/suite/walker.xml" in names
    assert "mujoco_playground/_src/locomotion/robot/env.py" in names
    assert not any(n.endswith((".bin", ".stl")) for n in names)


def _run_sh(tmp_path, fake_python: str, *parts, **env):
    py = tmp_path / "python"
    py.write_text("#!/bin/sh\n" + fake_python)
    py.chmod(0o755)
    full = {**os.environ, "PYTHON": str(py), "GPU_DEPS": str(tmp_path / "absent.tar.xz"), **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(tmp_path / "out"),
                           *([" ".join(parts)] if parts else [])],
                          capture_output=True, text=True, env=full, timeout=60)


def test_run_sh_without_the_simulators_or_their_archive_says_how_to_make_it(tmp_path):
    r = _run_sh(tmp_path, "exit 1\n")  # `import mujoco` fails
    assert r.returncode == 2
    assert "pack_deps.py" in r.stderr and "absent.tar.xz" in r.stderr


def test_run_sh_refuses_a_cpu_backend_unless_asked(tmp_path):
    r = _run_sh(tmp_path, "echo cpu\n")  # imports succeed, jax's backend is cpu
    assert r.returncode == 3
    assert "not gpu" in r.stderr and "ALLOW_CPU=1" in r.stderr
    assert (tmp_path / "out" / "machine.log").is_file()


def test_run_sh_compare_parts_run_the_gpu_comparison(tmp_path):
    """The compare parts call compare_official.py on the GPU (checks + rows; then the 300-env evaluation row) with
    the documented defaults; an unknown part is refused."""
    calls = tmp_path / "calls.txt"
    # a fake interpreter: every call succeeds and prints "gpu" (jax's backend); the benchmark calls are logged
    fake = f'case "$1" in benchmarks/*) echo "$@" >> {calls}; echo "[GPU] a row";; esac\necho gpu\n'
    r = _run_sh(tmp_path, fake, "compare", "compare_eval")
    assert r.returncode == 0, r.stderr
    main, ev = calls.read_text().splitlines()
    for arg in ("benchmarks/compare_official.py", "--tdmpc2_repo=.gpu/tdmpc2", "--device=gpu", "--parts=main",
                "--sizes=1,5", "--teachers=317", "--teacher_bf16", "--no-torch_compile", "--repeats=6"):
        assert arg in main.split(), arg
    assert "--threads" not in main
    for arg in ("--device=gpu", "--parts=eval", "--eval_steps=10", "--eval_episodes=10"):
        assert arg in ev.split(), arg
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## compare (exit 0" in summary and "## compare_eval (exit 0" in summary
    assert summary.count("[GPU] a row") == 2  # the progress lines: rows finished before a timeout are kept
    calls.unlink()
    r = _run_sh(tmp_path, fake, "compare", COMPARE_TORCH_COMPILE="1", COMPARE_SIZES="1,5,19")
    assert r.returncode == 0 and {"--torch_compile", "--sizes=1,5,19"} <= set(calls.read_text().split())
    r = _run_sh(tmp_path, "echo gpu\n", "bogus")
    assert r.returncode == 2 and "compare_eval" in r.stderr
    r = _run_sh(tmp_path, 'case "$2" in *tensordict*) exit 1;; esac\necho gpu\n', "compare")
    assert r.returncode == 2 and "pack_deps.py --official" in r.stderr


def test_official_distributions_cover_the_official_extra():
    """``pack_deps.py --official`` packs the ``[official]`` extra's packages that GPU images lack (they carry torch
    and pyyaml), pinned at this machine's versions where they are installed."""
    import re

    extra = re.search(r'"official": \[([^\]]*)\]', (ROOT / "setup.py").read_text()).group(1)
    names = {re.split(r"[<>=!]", req)[0] for req in re.findall(r'"([^"]+)"', extra)}
    assert names - {"torch", "pyyaml"} <= set(pack_deps.OFFICIAL_DISTRIBUTIONS), names
    with pytest.raises(SystemExit, match="not installed here"):
        pack_deps.pinned(("no-such-dist-xyz",) + pack_deps.OFFICIAL_DISTRIBUTIONS)
