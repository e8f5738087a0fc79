"""Batched evaluation: returns, scores and outputs (short episodes and a small planner to stay fast)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.evaluate import (
    EvalResult,
    compare_results,
    comparison_table,
    evaluate,
    merge_results,
    save_videos,
    write_outputs,
)
from mtdistill_jax.nn.world_model import init_params, make_world_model

TASKS = ["pendulum-swingup", "cartpole-balance"]


@pytest.fixture(scope="module")
def setup():
    config = get_smoke_config()
    params = init_params(make_world_model(config.model), jax.random.key(0))
    return config, params


# The two evaluating tests run on one xdist worker, one after the other: the float32 run of the bf16 test is the
# first test's `again` run, whose compiled program the evaluator (or the persistent cache) then holds.
EVAL_GROUP = pytest.mark.xdist_group("evaluate")
RUN = dict(episodes=2, seed=3, chunk=10, episode_length=20, progress=False)


@pytest.mark.slow
@EVAL_GROUP
def test_evaluate_returns_and_outputs(setup, tmp_path):
    config, params = setup
    r = evaluate(params, config, TASKS, episodes=2, seed=3, chunk=5, episode_length=20, progress=False, record=True)
    assert r.returns.shape == (2, 2) and r.tasks == TASKS and r.plan_calls == 20 * 4
    # cartpole-balance pays ~1 per control step while the pole is up: 20 agent steps x 2 => close to 40
    assert 10 < r.returns[1].min() <= 40 + 1e-4
    assert np.all(r.returns >= 0) and np.all(r.returns <= 40 + 1e-4)
    np.testing.assert_allclose(r.normalized, r.returns.mean(1) / 10)
    assert r.normalized_score == pytest.approx(float(np.mean(r.returns.mean(1) / 10)))
    again = evaluate(params, config, TASKS, **RUN)
    np.testing.assert_array_equal(again.returns, r.returns)  # chunking does not change the rollout
    other = evaluate(params, config, TASKS, **{**RUN, "seed": 4})
    assert not np.array_equal(other.returns, r.returns)

    paths = write_outputs(r, str(tmp_path), "x", command="python launch/evaluate.py ...")
    d = json.loads(Path(paths["json"]).read_text())
    assert d["episodes_per_task"] == 2 and d["normalized_score"] == pytest.approx(r.normalized_score)
    assert [t["name"] for t in d["tasks"]] == TASKS and len(d["tasks"][0]["returns"]) == 2
    assert Path(paths["csv"]).read_text().startswith("task,mean,std,normalized,ep0,ep1")
    assert "python launch/evaluate.py" in Path(paths["md"]).read_text()
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert d["seeds"] == [3] and d["episode_length"] == 20
    back = EvalResult.from_dict(d)
    np.testing.assert_array_equal(back.returns, r.returns)
    assert (back.tasks, back.seeds, back.mode, back.episode_length) == (TASKS, (3,), "sample", 20)

    # episodes of runs with other seeds pool into one result; the same seed twice is refused
    pooled = merge_results([r, other])
    assert pooled.returns.shape == (2, 4) and pooled.seeds == (3, 4) and pooled.plan_calls == 2 * 80
    np.testing.assert_array_equal(pooled.returns[:, 2:], other.returns)
    assert pooled.normalized_score == pytest.approx((r.normalized_score + other.normalized_score) / 2)
    with pytest.raises(ValueError, match=r"seed\(s\) \[3\] appear in more than one run"):
        merge_results([r, again])

    # the recorded first episode of each task, as a video
    traj = r.trajectories["pendulum-swingup"]
    assert traj["qpos"].shape == (21, 1)  # reset state + 20 steps
    assert again.trajectories is None
    from mtdistill_jax.envs.render import frame_is_blank

    out = save_videos(r, str(tmp_path), tasks=["pendulum-swingup"])
    assert Path(out["pendulum-swingup"]).stat().st_size > 1000
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(out["pendulum-swingup"])
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    assert len(frames) == 21 and not frame_is_blank(frames[0])


@EVAL_GROUP
def test_bfloat16_planner_evaluates_the_same_envs(setup):
    """planner.compute_dtype = bfloat16 goes through evaluate; same seed, same initial states, returns close."""
    config, params = setup
    bf16 = config.copy_and_resolve_references()
    bf16.planner.compute_dtype = "bfloat16"
    r16, r32 = evaluate(params, bf16, TASKS, **RUN), evaluate(params, config, TASKS, **RUN)
    assert r16.returns.shape == (2, 2) and np.all(np.isfinite(r16.returns))
    # cartpole-balance from the same initial states pays ~1 per control step either way (20 steps x 2): more than
    # half the most it can pay, as this test asked of its earlier 10-step episodes
    assert 20 < r16.returns[1].min() <= 40 + 1e-4 and 20 < r32.returns[1].min() <= 40 + 1e-4
    # on CPU the bf16 program's dots take XLA:CPU's YNNPACK path (xla_cpu.bf16_dot_options), the float32 one's not
    from mtdistill_jax.evaluate import program
    from mtdistill_jax.xla_cpu import bf16_dot_options

    runs = {json.loads(key[1])["compute_dtype"]: run for key, (_, _, run) in program._PROGRAMS.items()
            if key[3] == tuple(TASKS)}
    for dtype, run in runs.items():
        assert ("__ynn_fusion" in run.as_text()) == (bf16_dot_options(dtype) is not None)
    assert set(runs) == {"float32", "bfloat16"}


@EVAL_GROUP
def test_reset_and_step_chunk_compile_side_by_side(setup, monkeypatch):
    """compile_eval_program (what evaluate() uses) compiles the step chunk in a worker thread while the reset is
    lowered, then the reset in another, and the two compiled programs roll out exactly what the plainly jitted
    functions do."""
    import threading
    import time

    from mtdistill_jax.evaluate.program import compile_eval_program, make_eval_program

    events = []  # (what, start, end, thread)

    def logged(what, fn):
        def wrapper(self, *args, **kwargs):
            t = time.perf_counter()
            out = fn(self, *args, **kwargs)
            events.append((what, t, time.perf_counter(), threading.current_thread()))
            return out
        return wrapper

    monkeypatch.setattr(jax.stages.Traced, "lower", logged("lower", jax.stages.Traced.lower))
    monkeypatch.setattr(jax.stages.Lowered, "compile", logged("compile", jax.stages.Lowered.compile))
    config, params = setup
    _, init, run_chunk = make_eval_program(config, TASKS, RUN["episodes"], chunk=RUN["chunk"],
                                           episode_length=RUN["episode_length"])
    init_c, run_c, seconds = compile_eval_program(init, run_chunk, params)
    monkeypatch.undo()
    assert set(seconds) == {"lower", "init", "run", "compile"}
    compiles = [e for e in events if e[0] == "compile"]
    lowers = [e for e in events if e[0] == "lower"]
    assert len(compiles) == 2 and all(e[3] is not threading.main_thread() for e in compiles)
    assert all(e[3] is threading.main_thread() for e in lowers)
    first_compile_start = min(e[1] for e in compiles)
    assert first_compile_start < max(e[2] for e in lowers)  # the step chunk compiled while the reset lowered
    events.clear()
    monkeypatch.setattr(jax.stages.Traced, "lower", logged("lower", jax.stages.Traced.lower))
    monkeypatch.setattr(jax.stages.Lowered, "compile", logged("compile", jax.stages.Lowered.compile))
    compile_eval_program(init, run_chunk, params, side_by_side=False)  # one after the other
    monkeypatch.undo()
    (c_run, c_init), last_lower = sorted(e[1:3] for e in events if e[0] == "compile"), events[-2]
    assert last_lower[0] == "lower" and c_run[1] <= last_lower[1] and last_lower[2] <= c_init[0]

    def equal(x, y):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)

    init_j, run_j = jax.jit(init), jax.jit(run_chunk, donate_argnums=1)
    a, b = init_c(jax.random.key(3)), init_j(jax.random.key(3))
    jax.tree_util.tree_map(equal, a, b)
    for _ in range(2):
        (a, _), (b, _) = run_c(params, a), run_j(params, b)
    jax.tree_util.tree_map(equal, a, b)
    assert np.all(np.asarray(a.returns)[2:] > 0)  # cartpole-balance's rows: paid while the pole is up

    # evaluate() compiles through it, passing side_by_side on (launch/evaluate.py --nocompile_side_by_side)
    from mtdistill_jax.evaluate import program

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("side_by_side"))
        return compile_eval_program(*args, **kwargs)

    program.clear_program_cache()
    monkeypatch.setattr(program, "compile_eval_program", recording)
    r = evaluate(params, config, TASKS, **RUN, side_by_side=False)
    assert seen == [False] and r.returns.shape == (2, 2)


def test_bad_input(setup):
    config, params = setup
    with pytest.raises(ValueError, match="unknown tasks.*walker-walk"):
        evaluate(params, config, ["walker-wlak"], episodes=1, progress=False)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        evaluate(params, config, TASKS, episodes=0, progress=False)
    with pytest.raises(ValueError, match="chunk 7 must divide"):
        evaluate(params, config, TASKS, episodes=1, chunk=7, progress=False)


def test_episode_length_comes_from_the_task_set():
    from mtdistill_jax.configs.tasks import MT30
    from mtdistill_jax.evaluate import check_eval_args, episode_length_of

    assert episode_length_of("mt30", TASKS) == MT30.episode_lengths[0] == 500
    assert episode_length_of("mt30", TASKS, 20) == 20
    with pytest.raises(ValueError, match="chunk 7 must divide the episode length 500"):
        check_eval_args("mt30", TASKS, chunk=7)
    assert check_eval_args("mt30", TASKS, chunk=7, episode_length=21) == TASKS


def test_table_format():
    r = EvalResult(tasks=["a", "b"], returns=np.array([[100.0, 300.0], [0.0, 0.0]]), mode="sample", seconds=1.0,
                   compile_seconds=1.0, plan_calls=10)
    assert r.normalized_score == pytest.approx(10.0)
    assert "| a | 200.0 ± 100.0 | 20.00 |" in r.table()


def _result(tasks, seed, returns, mode="sample"):
    return EvalResult(tasks=tasks, returns=np.array(returns, float), mode=mode, seconds=1.0, compile_seconds=1.0,
                      plan_calls=10, seeds=(seed,) if seed is not None else ())


def test_merge_refuses_runs_that_differ():
    a = _result(["a", "b"], 1, [[1.0], [2.0]])
    with pytest.raises(ValueError, match="tasks"):
        merge_results([a, _result(["b", "a"], 2, [[1.0], [2.0]])])
    with pytest.raises(ValueError, match="mode"):
        merge_results([a, _result(["a", "b"], 2, [[1.0], [2.0]], mode="mean")])
    with pytest.raises(ValueError, match="records no seed"):
        merge_results([a, _result(["a", "b"], None, [[1.0], [2.0]])])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_results([])
    with pytest.raises(ValueError, match="not an evaluation result"):
        EvalResult.from_dict({"tasks": [{"returns": [1.0]}]})


def _seeded(tasks, seeds, returns):
    r = _result(tasks, None, returns)
    r.seeds = tuple(seeds)
    return r


def test_compare_results_pairs_episodes():
    """a - b per task and over episodes (normalized: return / 10), the paired t-test's p, who scored higher."""
    from scipy import stats

    ra = np.array([[500.0, 700.0], [100.0, 40.0], [900.0, 900.0]])
    rb = np.array([[300.0, 700.0], [200.0, 20.0], [900.0, 850.0]])
    a, b = _seeded(["a", "b", "c"], (1, 2), ra), _seeded(["a", "b", "c"], (1, 2), rb)
    c = compare_results(a, b)
    d = (ra - rb).ravel() / 10
    assert [t["diff"] for t in c["tasks"]] == pytest.approx([10.0, -4.0, 2.5])
    assert [t["identical"] for t in c["tasks"]] == [1, 0, 1]
    assert c["tasks"][0]["a"] == pytest.approx(60.0) and c["tasks"][0]["b"] == pytest.approx(50.0)
    assert c["mean_diff"] == pytest.approx(d.mean()) == pytest.approx(c["score_a"] - c["score_b"])
    assert c["se_diff"] == pytest.approx(d.std(ddof=1) / np.sqrt(6))
    assert c["p"] == pytest.approx(stats.ttest_rel(ra.ravel(), rb.ravel()).pvalue)
    assert (c["episodes"], c["identical"], c["a_higher"], c["b_higher"]) == (6, 2, 3, 1)
    same = compare_results(a, a)
    assert (same["p"], same["mean_diff"], same["se_diff"], same["identical"]) == (1.0, 0.0, 0.0, 6)
    one = compare_results(_seeded(["a"], (1,), [[10.0]]), _seeded(["a"], (1,), [[20.0]]))
    assert np.isnan(one["p"]) and np.isnan(one["se_diff"]) and one["mean_diff"] == pytest.approx(-1.0)
    md = comparison_table(c, "bf16", "f32")
    assert "| a | 60.00 | 50.00 | +10.00 | 1 / 2 |" in md and "| b | 7.00 | 11.00 | -4.00 | 0 / 2 |" in md
    assert f"bf16 − f32 = {d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(6):.2f}" in md
    assert "bf16 higher in 3, f32 higher in 1, equal in 2" in md


def test_compare_results_needs_the_same_initial_states():
    a = _seeded(["a", "b"], (1,), [[1.0], [2.0]])
    with pytest.raises(ValueError, match="differ in tasks"):
        compare_results(a, _seeded(["b", "a"], (1,), [[1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"differ in seeds \(\[1\] against \[2\]\)"):
        compare_results(a, _seeded(["a", "b"], (2,), [[1.0], [2.0]]))
    with pytest.raises(ValueError, match="differ in episodes per task"):
        compare_results(_seeded(["a", "b"], (1,), [[1.0, 2.0], [2.0, 3.0]]), a)
    shorter = _seeded(["a", "b"], (1,), [[1.0], [2.0]])
    shorter.episode_length = 100
    with pytest.raises(ValueError, match="differ in episode length"):
        compare_results(a, shorter)
    with pytest.raises(ValueError, match="neither result records its seed"):
        compare_results(_seeded(["a"], (), [[1.0]]), _seeded(["a"], (), [[1.0]]))


def test_cli_compare(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for name, rets in (("bf16", [[300.0, 500.0], [20.0, 40.0]]), ("f32", [[100.0, 500.0], [0.0, 60.0]])):
        (tmp_path / f"{name}.json").write_text(json.dumps(_seeded(["walker-walk", "cup-catch"], (1, 2), rets)
                                                          .to_dict()))
    cmd = [sys.executable, str(root / "launch" / "evaluate.py"), f"--workdir={tmp_path}/cmp", "--name=bf16_vs_f32"]
    files = f"--compare={tmp_path}/bf16.json,{tmp_path}/f32.json"
    out = subprocess.run(cmd + [files], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    d = json.loads((tmp_path / "cmp" / "bf16_vs_f32.json").read_text())
    assert d["a"].endswith("bf16.json") and d["b"].endswith("f32.json")
    assert [t["diff"] for t in d["tasks"]] == pytest.approx([10.0, 0.0]) and d["episodes"] == 4
    md = (tmp_path / "cmp" / "bf16_vs_f32.md").read_text()
    assert "| walker-walk | 40.00 | 30.00 | +10.00 | 1 / 2 |" in md and "seed(s) 1, 2" in md and "--compare=" in md
    assert "| bf16 | f32 | bf16 − f32 |" in out.stdout
    one = subprocess.run(cmd + [f"--compare={tmp_path}/bf16.json"], capture_output=True, text=True, cwd=root)
    assert one.returncode == 2 and "--compare takes two result .json files A,B, got 1" in one.stderr
    other = _seeded(["walker-walk", "cup-catch"], (3, 4), [[1.0, 2.0], [3.0, 4.0]])
    (tmp_path / "s34.json").write_text(json.dumps(other.to_dict()))
    bad = subprocess.run(cmd + [f"--compare={tmp_path}/bf16.json,{tmp_path}/s34.json"], capture_output=True,
                         text=True, cwd=root)
    assert bad.returncode == 1 and "error: a paired comparison needs the same initial states" in bad.stderr


def test_cli_merge(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    files = []
    for seed, rets in ((1, [[100.0], [0.0]]), (2, [[300.0, 500.0], [20.0, 40.0]])):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(_result(["walker-walk", "cup-catch"], seed, rets).to_dict()))
    cmd = [sys.executable, str(root / "launch" / "evaluate.py"), f"--workdir={tmp_path}", "--name=pooled"]
    out = subprocess.run(cmd + ["--merge=" + ",".join(map(str, files))], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    d = json.loads((tmp_path / "pooled.json").read_text())
    assert d["episodes_per_task"] == 3 and d["seeds"] == [1, 2]
    assert d["tasks"][0]["returns"] == [100.0, 300.0, 500.0] and d["normalized_score"] == pytest.approx(16.0)
    assert "seed(s) 1, 2" in (tmp_path / "pooled.md").read_text()
    both = subprocess.run(cmd + ["--merge=" + str(files[0]), "--agent=x.pt"], capture_output=True, text=True,
                          cwd=root)
    assert both.returncode != 0 and "exactly one of --agent" in both.stderr
    # the same main as a module of the package (what the console entry point mtdistill-evaluate runs)
    cmd = [sys.executable, "-m", "mtdistill_jax.launch.evaluate", f"--workdir={tmp_path}", "--name=pooled2"]
    out = subprocess.run(cmd + ["--merge=" + ",".join(map(str, files))], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "pooled2.json").read_text())["seeds"] == [1, 2]
