"""launch/train.py end to end on the tiny chunk (metrics.csv, tb/, config.json, agent/, --to_torch, evaluation,
re-run of a finished run) and the shared launch machinery of mtdistill_jax.launch.common."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from launch_util import SMOKE, chunk, launch, read_csv

from mtdistill_jax.checkpoint.export import load_agent
from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.errors import UserError
from mtdistill_jax.tdmpc2.train import init_training_state

EVAL = ["--eval_every=2", "--eval_tasks=pendulum-swingup", "--eval_episodes=1", "--eval_episode_length=10"]


def _train(args: list[str], timeout: int = 300):
    return launch("train.py", args, timeout)


def test_train_end_to_end(tmp_path):
    workdir, pt = tmp_path / "run", tmp_path / "agent.pt"
    args = [f"--workdir={workdir}", f"--data={chunk()}", *SMOKE, *EVAL, f"--to_torch={pt}"]
    r = _train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"done at step 4 \(fresh run\); wrote .*/run/agent, .*/agent\.pt", r.stderr), r.stderr[-2000:]

    rows = read_csv(workdir / "metrics.csv")
    assert [row["step"] for row in rows] == ["2", "4"]
    for row in rows:
        for name in ("train/total_loss", "train/pi_loss", "perf/steps_per_second", "eval/score",
                     "eval/pendulum-swingup/return", "wall_time"):
            assert np.isfinite(float(row[name])), (name, row)
    assert float(rows[0]["eval/score"]) == pytest.approx(float(rows[0]["eval/pendulum-swingup/return"]) / 10)
    assert any(f.startswith("events.out.tfevents.") for f in os.listdir(workdir / "tb"))
    config = json.loads((workdir / "config.json").read_text())
    assert config["steps"] == 4 and config["train"]["batch_size"] == 8 and config["model"]["model_size"] == 1

    agent = load_agent(workdir / "agent")
    assert agent.config.model_size == 1 and agent.config.task_set == "mt30" and agent.target_q_params is not None
    from_pt = load_agent(pt)  # the official-format .pt holds the same weights
    for a, b in zip(jax.tree_util.tree_leaves(agent.params), jax.tree_util.tree_leaves(from_pt.params), strict=True):
        np.testing.assert_array_equal(a, b)

    # the same command again: nothing left to train; the export is rewritten, the metrics are kept as they are
    before = (workdir / "metrics.csv").read_text()
    r = _train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done at step 4 (resumed from 4)" in r.stderr, r.stderr[-2000:]
    assert (workdir / "metrics.csv").read_text() == before
    load_agent(workdir / "agent")


@pytest.mark.parametrize("extra,pattern", [
    (["--eval_every=10", "--eval_tasks=walker-wlak"],
     r"error: --eval_tasks: unknown tasks \['walker-wlak'\] for mt30; valid: walker-stand, .*"),
    (["--eval_tasks=cup-catch"], r"error: --eval_tasks is given but --eval_every=0 \(no evaluation\); give "
                                 r"--eval_every=N"),
    (["--eval_every=10", "--eval_episode_length=7", "--eval_episodes=0"],
     r"error: flag --eval_episodes=0: 0 is not a positive integer"),
    (["--to_torch={tmp}"], r"error: --to_torch=.* is a directory; give a file path"),
    (["--eval_every=10", "--eval_policy=prior", "--eval_mode=elite"],
     r"error: --eval_mode=elite: the prior acts in one of sample, mean"),
], ids=["unknown-eval-task", "eval-tasks-without-eval-every", "eval-episodes-0", "to-torch-dir", "prior-elite"])
def test_bad_flags_are_one_line(tmp_path, extra, pattern):
    r = _train([f"--workdir={tmp_path}/run", f"--data={tmp_path}/missing.pt",
                *(a.replace("{tmp}", str(tmp_path)) for a in extra)], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(pattern, r.stderr.strip()), r.stderr
    assert not (tmp_path / "run").exists()


def _state_with_distill_head():
    config = get_smoke_config()
    state = init_training_state(config, jax.random.key(0))
    return config, state.replace(params={**state.params, "distill": {"w": jnp.ones((2, 2))}})


def test_export_keeps_the_world_model_only(tmp_path):
    from mtdistill_jax.launch.common import export_agent, world_model_keys, world_model_params

    config, state = _state_with_distill_head()
    wm = world_model_params(state.params, config.model)
    assert "distill" not in wm and tuple(wm) == world_model_keys(config.model)
    with pytest.raises(UserError, match=r"lack the world-model modules \['pi_head'\]"):
        world_model_params({k: v for k, v in state.params.items() if k != "pi_head"}, config.model)
    for _ in range(2):  # a second export replaces the first
        paths = export_agent(state, config, str(tmp_path), source="test")
    agent = load_agent(paths["agent"])
    assert set(agent.params) == set(wm) and agent.source == "test"
    for a, b in zip(jax.tree_util.tree_leaves(agent.params), jax.tree_util.tree_leaves(wm), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(agent.target_q_params),
                    jax.tree_util.tree_leaves(state.target_q_params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_default_eval_tasks():
    from mtdistill_jax.launch.common import default_eval_tasks

    assert default_eval_tasks("mt30", np.array([29, 29, 12, 7, 0, 8])) == \
        ["walker-stand", "pendulum-swingup", "cartpole-balance"]
    assert default_eval_tasks("mt30", np.array([12]), n=3) == ["cup-catch"]
    mt80 = get_task_set("mt80")
    metaworld = [i for i, t in enumerate(mt80.tasks) if t.startswith("mw-")][:2]
    with pytest.raises(UserError, match=r"none of the data's tasks \(mw-.*\) has an MJX environment"):
        default_eval_tasks("mt80", np.array(metaworld))


@pytest.mark.slow
def test_eval_fn_matches_evaluate(tmp_path):
    """The cached evaluation program of make_eval_fn gives evaluate()'s numbers (same seed), on the world-model
    part of a state that carries more params, and the same numbers when called again."""
    from mtdistill_jax.evaluate import EvalResult, evaluate
    from mtdistill_jax.launch.common import make_eval_fn, world_model_params

    config, state = _state_with_distill_head()
    tasks = ["cartpole-balance"]  # returns > 0 even for untrained params
    eval_fn = make_eval_fn(config, tasks, 2, seed=3, episode_length=10)
    got = eval_fn(state, 0)
    ref = evaluate(world_model_params(state.params, config.model), config, tasks, episodes=2, seed=3,
                   episode_length=10, progress=False)
    assert got["eval/score"] == ref.normalized_score
    assert [got[f"eval/{t}/return"] for t in tasks] == [float(r.mean()) for r in ref.returns]
    assert ref.normalized_score > 0
    assert eval_fn(state, 1) == got

    # the policy prior: the same numbers as evaluate(policy='prior'), whose program the eval_fn compiled first
    prior_fn = make_eval_fn(config, tasks, 2, seed=3, episode_length=10, policy="prior", mode="mean",
                            results_dir=str(tmp_path / "eval"))
    got = prior_fn(state, 7)
    ref = evaluate(world_model_params(state.params, config.model), config, tasks, episodes=2, seed=3,
                   episode_length=10, chunk=10, progress=False, policy="prior", mode="mean")
    assert ref.compile_seconds == 0.0 and ref.mode == "prior/mean"
    assert got["eval/score"] == ref.normalized_score and ref.normalized_score > 0
    saved = EvalResult.load(tmp_path / "eval" / "step_000000007.json")  # every episode's return, per step
    np.testing.assert_array_equal(saved.returns, ref.returns)


def test_train_from_a_native_dataset(tmp_path):
    """--data=<native dataset dir>: memory-mapped and host-sampled (that it is the in-memory run is checked in
    tests/tdmpc2/test_offline_loop.py); a dataset of another task set or a plain directory is refused."""
    from mtdistill_jax.data.native import import_chunks

    import_chunks([chunk()], tmp_path / "ds", shard_episodes=4, progress=False)
    workdir = tmp_path / "run"
    r = _train([f"--workdir={workdir}", f"--data={tmp_path / 'ds'}", *SMOKE, "--noprogress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "native dataset" in r.stderr and "done at step 4 (fresh run)" in r.stderr, r.stderr[-2000:]
    # --data_in_memory: sampled inside the compiled loop, the same batches, so the same run
    r = _train([f"--workdir={tmp_path}/mem", f"--data={tmp_path / 'ds'}", *SMOKE, "--noprogress", "--data_in_memory"])
    assert r.returncode == 0, r.stderr[-3000:]
    host, mem = read_csv(workdir / "metrics.csv"), read_csv(tmp_path / "mem" / "metrics.csv")
    train_keys = [k for k in host[0] if k.startswith("train/")]
    assert train_keys and [[row[k] for k in train_keys] for row in host] == [[row[k] for k in train_keys]
                                                                             for row in mem]
    r = _train([f"--workdir={tmp_path}/run80", f"--data={tmp_path / 'ds'}", *SMOKE, "--config.model.task_set=mt80"],
               timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(r"error: --data=.*/ds holds task set mt30; the config's model.task_set is mt80 .*",
                        r.stderr.strip()), r.stderr
    r = _train([f"--workdir={tmp_path}/run2", f"--data={tmp_path}", *SMOKE], timeout=120)
    assert r.returncode == 1 and re.fullmatch(r"error: --data=.* is a directory without manifest.json: not a native "
                                              r"dataset .*", r.stderr.strip()), r.stderr
