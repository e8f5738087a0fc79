"""launch/distill.py end to end on the tiny chunk with the paper's student as a stand-in teacher: outputs, a
bit-exact resume, the distillation-only params in the checkpoints but not in the export, two devices, and the
one-line errors for bad teachers, configs and data."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from launch_util import SMOKE, chunk, launch, read_csv
from refdata import reference_dir

from mtdistill_jax.checkpoint.export import AgentExport, load_agent, save_agent
from mtdistill_jax.checkpoint.manager import CheckpointManager
from mtdistill_jax.configs import distill as distill_config
from mtdistill_jax.configs import get_model_config
from mtdistill_jax.data.offline import OfflineSampler
from mtdistill_jax.distill import init_distill_state
from mtdistill_jax.nn.world_model import init_params, make_world_model

TEACHER = reference_dir() / "paper_student_fp16.pt"
LATENT = ["--config.distill.latent_weight=1.0"]  # a distillation-only param (the projection) in the state


def teacher():
    if not TEACHER.is_file():
        pytest.skip(f"{TEACHER} not found")
    return TEACHER


def distill(args, **kw):
    return launch("distill.py", args, **kw)


def test_distill_end_to_end_and_bit_exact_resume(tmp_path):
    base = [f"--teacher={teacher()}", f"--data={chunk()}", *SMOKE, *LATENT]
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = distill([f"--workdir={whole}", *base])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"teacher: 1M mt30 \(1,426,427 params, stored float16, computed float32\)", r.stderr)
    assert re.search(r"done at step 4 \(fresh run\); wrote .*/whole/agent", r.stderr), r.stderr[-2000:]

    rows = read_csv(whole / "metrics.csv")
    assert [row["step"] for row in rows] == ["2", "4"]
    for row in rows:
        for name in ("train/total_loss", "train/wm_objective", "distill/reward_mse", "distill/latent_mse",
                     "distill/loss", "distill/d_coef", "perf/steps_per_second"):
            assert np.isfinite(float(row[name])), (name, row)
        assert float(row["distill/d_coef"]) == pytest.approx(0.45)
    config = json.loads((whole / "config.json").read_text())
    assert config["distill"]["d_coef"] == 0.45 and config["distill"]["latent_weight"] == 1.0
    assert config["model"]["model_size"] == 1

    # the checkpoint holds the projection (a resumed run trains it on); the export holds the world model only
    run_config = distill_config_of(config)
    target = jax.eval_shape(lambda k: init_distill_state(run_config, get_model_config(1, "mt30"), k),
                            jax.random.key(0))
    data_target = jax.eval_shape(OfflineSampler(8, 3, 24, 6).init, jax.random.key(0))
    with CheckpointManager(whole, run_config, async_save=False) as mngr:
        state, _, _ = mngr.restore(target, data_target)
    assert state.params["distill"]["latent_proj"]["kernel"].shape == (128, 128)
    agent = load_agent(whole / "agent")
    assert "distill" not in agent.params and agent.config.model_size == 1
    np.testing.assert_array_equal(agent.params["encoder"]["layer0"]["kernel"],
                                  np.asarray(state.params["encoder"]["layer0"]["kernel"]))

    # 2 steps, then the same command with --config.steps=4 resumes at 2: bit-identical to the whole run
    r = distill([f"--workdir={split}", *base, "--config.steps=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = distill([f"--workdir={split}", *base])
    assert r.returncode == 0 and "done at step 4 (resumed from 2)" in r.stderr, r.stderr[-2000:]
    resumed = load_agent(split / "agent")
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(agent.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert [row["step"] for row in read_csv(split / "metrics.csv")] == ["2", "4"]


def distill_config_of(saved: dict):
    """The run's distillation config rebuilt from its config.json."""
    config = distill_config.get_config(saved["model"]["model_size"], saved["model"]["task_set"])
    config.update_from_flattened_dict({k: v for k, v in _flatten(saved).items() if k != "model.model_size"})
    return config


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_distill_on_two_devices_with_a_sharded_int8_teacher(tmp_path):
    """Data-parallel run (batch split over 2 devices) with a teacher stored int8 (an agent export) and laid out
    sharded over the devices; student size from --config.model_size."""
    from mtdistill_jax.checkpoint import transforms

    src = load_agent(teacher())
    export = AgentExport(config=src.config, params=transforms.transform(src.params, "int8"), source="test")
    teacher_dir = save_agent(tmp_path / "teacher_int8", export)
    r = distill([f"--workdir={tmp_path}/run", f"--teacher={teacher_dir}", f"--data={chunk()}", *SMOKE,
                 "--config.steps=2", "--config.distill.teacher_sharding=sharded",
                 "--config.distill.teacher_compute_dtype=bfloat16"], devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data-parallel over 2 devices (batch 8, 4 per device)" in r.stderr
    assert "stored int8, computed bfloat16" in r.stderr
    # a bf16 teacher's program compiles with the CPU's bf16 dot path (distill.step_compiler_options)
    from mtdistill_jax import xla_cpu
    expected = xla_cpu.bf16_dot_options("bfloat16")
    assert (f"(XLA options {expected})" in r.stderr) == (expected is not None), r.stderr[-3000:]
    assert np.isfinite(float(read_csv(tmp_path / "run" / "metrics.csv")[-1]["distill/reward_mse"]))


def test_teacher_of_another_task_set_is_one_line(tmp_path):
    model_config = get_model_config(1, "mt80")
    params = jax.device_get(init_params(make_world_model(model_config), jax.random.key(0)))
    path = save_agent(tmp_path / "mt80", AgentExport(config=model_config, params=params))
    r = distill([f"--workdir={tmp_path}/run", f"--teacher={path}", f"--data={chunk()}", *SMOKE], timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(r"error: teacher and student do not share a task set: task set: student mt30, teacher "
                        r"mt80; number of tasks: student 30, teacher 80; .*", r.stderr.strip()), r.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("extra,code,pattern", [
    (["--teacher={tmp}/none.pt"], 1, r"error: no such file or directory: .*/none\.pt"),
    (["--config.distill.schedule=exp"], 2,
     r"error: --config: config field distill\.schedule must be one of constant, linear, cosine, increase, "
     r"decrease, phases, got 'exp'"),
    (["--config.model_size=7"], 2, r"error: --config: unknown model size 7; valid: \[1, 5, 19, 48, 317\]"),
    (["--config.distill.d_coefs=1"], 2, r"error: .*d_coefs.*"),
], ids=["missing-teacher", "bad-schedule", "bad-size", "misspelled-field"])
def test_bad_input_is_one_line(tmp_path, extra, code, pattern):
    args = [f"--workdir={tmp_path}/run", f"--data={chunk()}", *SMOKE]
    if not any(a.startswith("--teacher") for a in extra):
        args.append(f"--teacher={teacher()}")
    r = distill(args + [a.replace("{tmp}", str(tmp_path)) for a in extra], timeout=120)
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(pattern, r.stderr.strip()), r.stderr
