"""Agent exports, official-format .pt export and the conversion CLI (launch/convert.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from refdata import REPO, reference_dir, world_model_cases

from mtdistill_jax.checkpoint import convert, transforms
from mtdistill_jax.checkpoint.export import AgentExport, ExportError, load_agent, load_agent_stored, save_agent
from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint, params_to_state_dict, save_tdmpc2_checkpoint
from mtdistill_jax.checkpoint.torch_pickle import load_pt

STUDENT = reference_dir() / "paper_student_fp16.pt"
CASES = world_model_cases()


def _need(path):
    if not Path(path).is_file():
        pytest.skip(f"{path} not found")


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def assert_trees_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_paper_student_round_trip_is_exact(tmp_path):
    _need(STUDENT)
    ck = load_tdmpc2_checkpoint(STUDENT, dtype=None)
    report = convert.import_torch(str(STUDENT), str(tmp_path / "student"))
    assert "1,426,427 parameters" in report and "release key format" in report
    stored = load_agent_stored(tmp_path / "student")
    assert stored.dtype == "float16" and stored.config.to_dict() == ck.config.to_dict()
    assert_trees_identical(stored.params, ck.params)
    assert_trees_identical(stored.target_q_params, ck.target_q_params)
    compute = load_agent(tmp_path / "student")  # float32 for the model, same values
    assert_trees_identical(compute.params, transforms.cast_params(ck.params, "float32"))
    # the same through a .pt path directly
    assert_trees_identical(load_agent(STUDENT).params, compute.params)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_transformed_exports_reload_exactly(tmp_path, dtype):
    _need(STUDENT)
    convert.import_torch(str(STUDENT), str(tmp_path / "a"))
    report = convert.convert_dtype(str(tmp_path / "a"), str(tmp_path / "b"), dtype)
    assert f"float16 -> {dtype}" in report
    b = load_agent_stored(tmp_path / "b")
    assert b.dtype == dtype and transforms.is_quantized(b.params) == (dtype == "int8")
    assert_trees_identical(b.params, transforms.transform(load_agent_stored(tmp_path / "a").params, dtype))
    total = [line for line in report.splitlines() if line.startswith("total")][0]
    ratio = float(total.split()[-1].rstrip("%")) / 100
    assert (ratio <= 0.30) if dtype == "int8" else ratio == pytest.approx(0.5)


def test_export_errors(tmp_path):
    _need(STUDENT)
    with pytest.raises(ExportError, match="not an agent export"):
        load_agent(tmp_path)
    ck = load_tdmpc2_checkpoint(STUDENT)
    save_agent(tmp_path / "x", AgentExport(config=ck.config, params=ck.params))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_agent(tmp_path / "x", AgentExport(config=ck.config, params=ck.params))
    # a config that does not fit the tensors: error names the tensor and both shapes
    bad = ck.config.copy_and_resolve_references()
    with bad.unlocked():
        bad.mlp_dim = 512
    save_agent(tmp_path / "y", AgentExport(config=bad, params=ck.params))
    with pytest.raises(ExportError, match=r"tensor /\w+/layer\d/\w+ has shape \[.*\], the config implies"):
        load_agent(tmp_path / "y")


@pytest.mark.parametrize("suffix,fmt", [("", "current"), ("_release", "release")])
def test_state_dict_writer_reproduces_official_files(suffix, fmt):
    """Our writer gives the official files entry for entry: same keys, order, dtypes, shapes and values."""
    if not CASES:
        pytest.skip("no world-model reference files")
    path = reference_dir() / f"wm_{CASES[0]}{suffix}.pt"
    ref = load_pt(path)["model"]
    ck = load_tdmpc2_checkpoint(path, dtype=None)
    sd = params_to_state_dict(ck.config, ck.params, ck.target_q_params, key_format=fmt)
    assert list(sd) == list(ref)
    for k, v in ref.items():
        if isinstance(v, np.ndarray):
            assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
            np.testing.assert_array_equal(sd[k], v, err_msg=k)
        else:
            assert sd[k] == v, k


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_to_torch_reloads_identical(tmp_path, dtype):
    pytest.importorskip("torch")
    import torch

    _need(STUDENT)
    ck = load_tdmpc2_checkpoint(STUDENT, dtype=None)
    params = transforms.cast_params(ck.params, dtype)
    target = transforms.cast_params(ck.target_q_params, dtype)
    save_tdmpc2_checkpoint(tmp_path / "s.pt", ck.config, params, target)
    back = load_tdmpc2_checkpoint(tmp_path / "s.pt", dtype=None)
    assert back.key_format == "current" and back.source_dtype == dtype
    assert_trees_identical(back.params, params)
    assert_trees_identical(back.target_q_params, target)
    sd = torch.load(tmp_path / "s.pt", weights_only=True)["model"]  # loads in torch's safe mode too
    assert sd["_Qs.params.__batch_size"] == torch.Size([ck.config.num_q]) and len(sd) == 80


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_cli_end_to_end(tmp_path):
    """--from_torch (no target Qs) -> --dtype int8 -> --to_torch -> --inspect, through the real CLI."""
    pytest.importorskip("torch")
    _need(STUDENT)
    ck = load_tdmpc2_checkpoint(STUDENT, dtype=None)
    # an official-format file without target Qs (as some td-mpc-opt students are saved)
    sd = params_to_state_dict(ck.config, ck.params, ck.target_q_params, key_format="release")
    import torch

    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith("_target_Qs")}},
               tmp_path / "no_target.pt")
    r = _cli(f"--from_torch={tmp_path / 'no_target.pt'}", f"--out={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr
    assert "online Qs were copied as target Qs" in r.stdout and "on disk" in r.stdout
    a = load_agent_stored(tmp_path / "a")
    assert_trees_identical(a.target_q_params, ck.params["Qs"])

    r = _cli(f"--from={tmp_path / 'a'}", "--dtype=int8", f"--out={tmp_path / 'b'}", f"--to_torch={tmp_path / 'b.pt'}")
    assert r.returncode == 0, r.stderr
    assert "float16 -> int8" in r.stdout and "dequantised to float32" in r.stdout
    back = load_tdmpc2_checkpoint(tmp_path / "b.pt")
    assert_trees_identical(back.params, load_agent(tmp_path / "b").params)

    r = _cli(f"--inspect={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    assert "1,426,427" in r.stdout and "int8" in r.stdout and "Qs" in r.stdout


def test_cli_errors(tmp_path):
    _need(STUDENT)
    # fp16 refuses out-of-range values, naming the tensor
    ck = load_tdmpc2_checkpoint(STUDENT)
    params = transforms.cast_params(ck.params, "float32")
    params["reward_head"]["layer1"]["bias"][3] = 1e5
    save_agent(tmp_path / "big", AgentExport(config=ck.config, params=params))
    r = _cli(f"--from={tmp_path / 'big'}", "--dtype=float16", f"--out={tmp_path / 'c'}")
    assert r.returncode == 1 and "reward_head/layer1/bias" in r.stderr and "float16 range" in r.stderr
    assert not (tmp_path / "c").exists()
    # a malicious pickle is refused and never runs
    import pickle
    import zipfile

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    r = _cli(f"--from_torch={tmp_path / 'evil.pt'}", f"--out={tmp_path / 'd'}")
    assert r.returncode == 1 and "posix.system" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    # a truncated file: a clear error, not a traceback
    (tmp_path / "cut.pt").write_bytes(STUDENT.read_bytes()[: 1_000_000])
    r = _cli(f"--from_torch={tmp_path / 'cut.pt'}", f"--out={tmp_path / 'e'}")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    # usage errors
    r = _cli(f"--from={tmp_path / 'big'}", f"--out={tmp_path / 'f'}")
    assert r.returncode != 0 and "--dtype" in r.stderr
