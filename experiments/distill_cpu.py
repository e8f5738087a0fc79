"""Knowledge transfer on CPU: distil the paper's 1M student (the teacher) into fresh 1M students trained on a small
dataset the teacher collected, against the same student trained without a teacher; then quantize the best one.

    python experiments/distill_cpu.py --out=runs/distill_cpu [--results=experiments/results/distill_cpu]

Stages (``--stages``, default all, in this order; each skips what is already on disk under ``--out``, so the
same command resumes an interrupted run, and a finished run only rewrites the report):

1. ``collect``: the teacher acts in the MJX MT30 tasks ``--tasks`` and its episodes go to ``<out>/data`` (a native
   dataset): ``--prior_episodes`` per task with the policy prior (sampled, as the official ``act`` with
   ``mpc=False``) and ``--planner_episodes`` per task with the planner (MPPI, official ``act``). The returns and the
   cost of each collection are in ``<out>/collect/<name>.json``.
2. ``teacher``: the teacher's own scores with the evaluation protocol of the students (the ceiling).
3. ``train``: for each seed and arm, a 1M MT30 student from scratch on ``<out>/data`` for ``--steps`` updates of
   ``--batch`` sub-trajectories (``<out>/runs/<arm>_s<seed>``: the workdir of ``launch/train.py`` or
   ``launch/distill.py``, with checkpoints, ``metrics.csv``, ``tb/`` and ``agent/``). Arms: ``scratch`` (the
   TD-MPC2 update alone), ``reward`` (+ the paper's term: reward MSE at the first step, d_coef 0.45),
   ``reward_policy`` (+ the KL from the teacher's policy, ``distill.policy_weight``). Every ``--eval_every`` updates
   and at the end the student is evaluated (the learning curve; every episode in ``<run>/eval/``); the last
   evaluation is the final score, ``<out>/final/<arm>_s<seed>_<policy>.json``.
4. ``quantize``: the distilled student with the best mean final score over seeds is converted with
   ``launch/convert.py`` to float16, bfloat16 and int8 (``<out>/quant/<dtype>``) and each is evaluated on the same
   tasks, initial states and episodes; the latency of one ``act()`` per dtype is measured.
5. ``report``: ``results.json``, ``scores.csv``, ``curves.csv``, ``curves.png``, ``scores.png`` and ``README.md``
   (tables, paired test, commands) in ``--results``.

Evaluation protocol (``--eval_policy``): ``prior`` acts with the policy prior's mean (official ``eval_mode`` with
``mpc=False``; one network forward per step) and is what the budget of a 2-core CPU allows for every checkpoint;
``planner`` acts as the official evaluate.py (MPPI, ~40x the cost per step). Evaluations of a training seed ``s``
use the PRNG seed of that run's config (``1 + s``), so all arms and the teacher see the same initial states per
seed. Scores are MT30-normalized (return / 10) averaged over the chosen tasks.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TASKS = ("cartpole-balance", "pendulum-swingup", "reacher-easy", "cup-spin", "walker-stand", "finger-spin")
ARMS = {  # arm -> distillation config overrides (None: the plain TD-MPC2 update, launch/train.py)
    "scratch": None,
    "reward": {"d_coef": 0.45},
    "reward_policy": {"d_coef": 0.45, "policy_weight": 1.0},
}
ARM_LABELS = {
    "scratch": "(a) from scratch",
    "reward": "(b) distilled: reward MSE, d_coef 0.45 (paper)",
    "reward_policy": "(c) distilled: reward MSE + policy KL (weight 1), d_coef 0.45",
}
STAGES = ("collect", "teacher", "train", "quantize", "report")
QUANT_DTYPES = ("float16", "bfloat16", "int8")

log = logging.getLogger("distill_cpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="working directory (data, runs, evaluations); resumable")
    p.add_argument("--results", default=str(REPO / "experiments" / "results" / "distill_cpu"),
                   help="where the report goes (json, csv, md, png)")
    p.add_argument("--teacher", default=None, help="teacher: agent export or official .pt (default: the paper's "
                   "1M student, paper_student_1m_fp16 of mtdistill_jax.artifacts)")
    p.add_argument("--tasks", default=",".join(TASKS), help="MT30 tasks (comma-separated)")
    p.add_argument("--prior_episodes", type=int, default=16, help="episodes per task collected with the prior")
    p.add_argument("--planner_episodes", type=int, default=2, help="episodes per task collected with the planner")
    p.add_argument("--arms", default=",".join(ARMS), help=f"arms to train, of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (run config seed = 1 + seed)")
    p.add_argument("--steps", type=int, default=10_000, help="updates per run")
    p.add_argument("--batch", type=int, default=64, help="sub-trajectories per update")
    p.add_argument("--eval_every", type=int, default=2_000, help="updates between curve evaluations")
    p.add_argument("--eval_episodes", type=int, default=5, help="evaluation episodes per task and seed")
    p.add_argument("--eval_policy", choices=("prior", "planner"), default="prior",
                   help="evaluation actor: policy prior (mean) or planner (official protocol)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"stages to run, of {', '.join(STAGES)}")
    p.add_argument("--latency_repeats", type=int, default=50, help="timed act() calls per dtype")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.arms = [a for a in args.arms.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [a for a in args.arms if a not in ARMS] + [s for s in args.stages if s not in STAGES]
    if bad:
        p.error(f"unknown arm/stage {bad}; arms: {', '.join(ARMS)}; stages: {', '.join(STAGES)}")
    if min(args.steps, args.batch, args.eval_every, args.eval_episodes) < 1 or not args.seeds:
        p.error("--steps, --batch, --eval_every, --eval_episodes must be >= 1 and --seeds non-empty")
    return args


# ------------------------------------------------------------------------------------------------ helpers
def eval_mode(policy: str) -> str:
    from mtdistill_jax.launch.common import eval_mode_of

    return eval_mode_of(policy, None)


def run_seed(seed: int) -> int:
    """The config seed of training seed ``seed`` (also the PRNG seed of its evaluations)."""
    return 1 + seed


def teacher_path(args) -> str:
    if args.teacher:
        return args.teacher
    from mtdistill_jax import artifacts

    return str(artifacts.fetch("paper_student_1m_fp16"))


def load_teacher_agent(args):
    """(agent, rollout config) of the teacher for ``args.tasks`` (checked against its task set)."""
    from mtdistill_jax.launch.rollout import rollout_setup

    agent, config, _, _ = rollout_setup(teacher_path(args), args.tasks, 1, "sample", 10, None)
    return agent, config


def evaluate_params(params, config, args, seed: int, policy: str, path: Path):
    """Evaluate ``params`` (or load the result at ``path`` when it is there); the program is compiled once per
    process and shared by every agent of the same shapes."""
    from mtdistill_jax.evaluate import EvalResult, evaluate

    if path.exists():
        return EvalResult.load(path)
    from mtdistill_jax.evaluate import episode_length_of

    length = episode_length_of(config.model.task_set, args.tasks)  # one chunk: the training runs' eval program
    result = evaluate(params, config, args.tasks, args.eval_episodes, seed=run_seed(seed), mode=eval_mode(policy),
                      chunk=length, policy=policy, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    log.info("%s: score %.2f (rollouts %.1f s, compile %.1f s)", path.name, result.normalized_score, result.seconds,
             result.compile_seconds)
    return result


def train_config(args, arm: str, seed: int):
    """The run config of ``arm`` / ``seed``: the library's training or distillation config (1M student, MT30)
    with ``--steps``, ``--batch`` and the arm's distillation fields."""
    from mtdistill_jax.configs import distill as distill_config
    from mtdistill_jax.configs import train as train_config_lib

    overrides = ARMS[arm]
    config = train_config_lib.get_config(1, "mt30") if overrides is None else distill_config.get_config(1, "mt30")
    config.steps = args.steps
    config.seed = run_seed(seed)
    config.train.batch_size = args.batch
    config.log_every = min(config.log_every, args.eval_every)
    if overrides is not None:
        for k, v in overrides.items():
            config.distill[k] = v
        config = distill_config.resolve(config)
        distill_config.check_config(config)
    else:
        train_config_lib.check_config(config)
    return config


# ------------------------------------------------------------------------------------------------- stages
def collections(args) -> list[dict]:
    return [dict(name="prior", policy="prior", mode="sample", episodes=args.prior_episodes, seed=0, rounds=1),
            dict(name="planner", policy="planner", mode="sample", episodes=args.planner_episodes, seed=1,
                 rounds=args.planner_episodes)]


def stage_collect(args, out: Path) -> None:
    from mtdistill_jax.data.native import is_dataset_dir, open_dataset
    from mtdistill_jax.evaluate.collect import collect

    agent, config = load_teacher_agent(args)
    data = out / "data"
    for spec in collections(args):
        if spec["episodes"] < 1:
            continue
        path = out / "collect" / f"{spec['name']}.json"
        name = f"collect:{teacher_path(args)}:seed{spec['seed']}"
        done = is_dataset_dir(data) and any(s["name"] == name for s in open_dataset(data).manifest["sources"])
        if done and path.exists():
            log.info("collection %s: on disk", spec["name"])
            continue
        if done:
            raise SystemExit(f"error: {data} holds the {spec['name']} collection but {path} is missing; delete "
                             f"{out} and run again")
        log.info("collecting %s: %d tasks x %d episodes", spec["name"], len(args.tasks), spec["episodes"])
        per_round = math.ceil(spec["episodes"] / spec["rounds"])
        result = collect(agent.params, config, data, args.tasks, spec["episodes"], policy=spec["policy"],
                         mode=spec["mode"], seed=spec["seed"], round_episodes=per_round,
                         source=teacher_path(args), progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.save(path)
        n = len(args.tasks) * spec["episodes"] * result.episode_length
        log.info("collected %s: %d transitions in %.1f s (+ compile %.1f s); score %.2f\n%s", spec["name"], n,
                 result.seconds, result.compile_seconds, result.normalized_score, result.table())


def stage_teacher(args, out: Path) -> None:
    agent, config = load_teacher_agent(args)
    for seed in args.seeds:
        evaluate_params(agent.params, config, args, seed, args.eval_policy,
                        out / "teacher" / f"{args.eval_policy}_s{seed}.json")


def stage_train(args, out: Path) -> None:
    from mtdistill_jax.checkpoint.export import is_agent_dir, load_agent
    from mtdistill_jax.launch import common
    from mtdistill_jax.launch import distill as distill_main

    for seed in args.seeds:  # seed-major: every finished seed is a complete paired comparison
        for arm in args.arms:
            workdir = out / "runs" / f"{arm}_s{seed}"
            config = train_config(args, arm, seed)
            if not is_agent_dir(workdir / common.AGENT_DIR):
                shutil.rmtree(workdir / common.AGENT_DIR, ignore_errors=True)  # an export cut short by a crash
                log.info("training %s seed %d -> %s", arm, seed, workdir)
                options = common.RunOptions(workdir=str(workdir), data=[str(out / "data")], data_in_memory=True,
                                            save_every=1_000,
                                            keep=2, eval_every=args.eval_every, eval_tasks=list(args.tasks),
                                            eval_episodes=args.eval_episodes, eval_policy=args.eval_policy,
                                            eval_mode=eval_mode(args.eval_policy), progress=False)
                kwargs = {} if ARMS[arm] is None else distill_main.run_kwargs(config, teacher_path(args))
                result = common.run(config, options, **kwargs)
                if result.preempted:
                    raise SystemExit(f"preempted during {workdir}; run the same command again to resume")
            final = out / "final" / f"{arm}_s{seed}_{args.eval_policy}.json"
            last = workdir / common.EVAL_DIR / common.eval_result_name(args.steps)  # the curve's last point
            if not final.exists() and last.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(last, f"{final}.tmp")
                os.replace(f"{final}.tmp", final)
            agent = load_agent(workdir / common.AGENT_DIR)  # evaluated here when the run had no final evaluation
            evaluate_params(agent.params, config, args, seed, args.eval_policy, final)


def rollout_agent(path):
    """(agent with float32 compute params, rollout config) of the agent export or .pt at ``path``."""
    from mtdistill_jax.checkpoint.export import load_agent
    from mtdistill_jax.configs.train import get_config

    agent = load_agent(path)
    config = get_config(agent.config.model_size, agent.config.task_set)
    with config.unlocked():
        config.model = agent.config
    return agent, config


def final_results(args, out: Path, arm: str) -> dict:
    """{seed: EvalResult} of the final students of ``arm`` that are on disk."""
    from mtdistill_jax.evaluate import EvalResult

    paths = {s: out / "final" / f"{arm}_s{s}_{args.eval_policy}.json" for s in args.seeds}
    return {s: EvalResult.load(p) for s, p in paths.items() if p.exists()}


def best_distilled(args, out: Path) -> tuple[str, int] | None:
    """(arm, seed) of the distilled student with the best final score, among the arms whose every seed is done
    (the arm with the best mean over seeds, then its best seed); None before any distilled arm is complete."""
    means = {}
    for arm in args.arms:
        if ARMS[arm] is None:
            continue
        results = final_results(args, out, arm)
        if len(results) == len(args.seeds):
            means[arm] = (np.mean([r.normalized_score for r in results.values()]), results)
    if not means:
        return None
    arm = max(means, key=lambda a: means[a][0])
    results = means[arm][1]
    return arm, max(results, key=lambda s: results[s].normalized_score)


def act_latency(params, config, policy: str, compute: str, repeats: int) -> dict:
    """Median / p10 / p90 ms of one jitted act() for one env (``policy`` prior: the policy prior's mean; planner:
    MPPI, official act) with params and observation cast to ``compute``; plus the first call (compile)."""
    import jax
    import jax.numpy as jnp

    from mtdistill_jax.evaluate.program import make_actor
    from mtdistill_jax.tdmpc2.planner import init_planner_state

    dtype = jnp.dtype(compute)
    act = make_actor(config, policy, eval_mode(policy))
    cparams = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    state = init_planner_state(config, 1) if policy == "planner" else ()
    from mtdistill_jax.configs.tasks import get_task_set

    obs = jnp.zeros((1, get_task_set(config.model.task_set).obs_pad), dtype)
    task = jnp.zeros((1,), jnp.int32)
    first = jnp.ones((1,), bool)
    fn = jax.jit(lambda p, o, s, k: act(p, o, task, first, s, k)[0])
    key = jax.random.key(0)
    t = time.perf_counter()
    fn(cparams, obs, state, key).block_until_ready()
    first_ms = 1e3 * (time.perf_counter() - t)
    times = []
    for i in range(repeats):
        k = jax.random.fold_in(key, i)
        t = time.perf_counter()
        fn(cparams, obs, state, k).block_until_ready()
        times.append(1e3 * (time.perf_counter() - t))
    return {"policy": policy, "compute": compute, "median_ms": float(np.median(times)),
            "p10_ms": float(np.percentile(times, 10)), "p90_ms": float(np.percentile(times, 90)),
            "first_call_ms": first_ms, "repeats": repeats}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def stage_quantize(args, out: Path) -> None:
    from mtdistill_jax.checkpoint.export import is_agent_dir
    from mtdistill_jax.launch import common

    best = best_distilled(args, out)
    if best is None:
        log.info("quantize: no distilled arm has finished every seed yet; skipped")
        return
    arm, seed = best
    source = out / "runs" / f"{arm}_s{seed}" / common.AGENT_DIR
    qdir = out / "quant"
    record = {"arm": arm, "seed": seed, "agent": str(source)}
    if (qdir / "source.json").exists() and json.loads((qdir / "source.json").read_text()) != record:
        log.info("quantize: the best distilled student is now %s seed %d; converting it anew", arm, seed)
        shutil.rmtree(qdir)
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / "source.json").write_text(json.dumps(record) + "\n")
    exports = {"float32": source}
    for dtype in QUANT_DTYPES:
        target = qdir / dtype
        if not is_agent_dir(target):
            shutil.rmtree(target, ignore_errors=True)
            cmd = [sys.executable, str(REPO / "launch" / "convert.py"), f"--from={source}", f"--dtype={dtype}",
                   f"--out={target}"]
            log.info("%s", " ".join(cmd))
            subprocess.run(cmd, check=True, cwd=REPO)
        exports[dtype] = target
    for dtype, path in exports.items():
        agent, config = rollout_agent(path)
        for s in args.seeds:
            evaluate_params(agent.params, config, args, s, args.eval_policy, qdir / f"{dtype}_s{s}.json")
    lat_path = qdir / "latency.json"
    if not lat_path.exists():
        agent, config = rollout_agent(source)
        rows = [act_latency(agent.params, config, policy, compute, args.latency_repeats if policy == "prior"
                            else max(5, args.latency_repeats // 5))
                for policy in ("prior", "planner") for compute in ("float32", "bfloat16", "float16")]
        lat_path.write_text(json.dumps(rows, indent=1) + "\n")

# ------------------------------------------------------------------------------------------------- report
def _se(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def _pooled(results) -> dict:
    """Per task and overall: mean and standard error over all episodes of ``results`` (runs of the same agent
    with different seeds), normalized (0-100)."""
    from mtdistill_jax.envs.score import normalized_return
    from mtdistill_jax.evaluate import merge_results

    r = merge_results(list(results)) if len(results) > 1 else list(results)[0]
    norm = normalized_return(r.returns)  # [K, E]
    var = norm.var(axis=1, ddof=1) / norm.shape[1] if norm.shape[1] > 1 else np.full(len(r.tasks), np.nan)
    return {"tasks": {t: {"mean": float(norm[i].mean()), "se": float(np.sqrt(var[i]))}
                      for i, t in enumerate(r.tasks)},
            "score": float(norm.mean()), "score_se": float(np.sqrt(var.sum()) / len(r.tasks)),
            "episodes_per_task": int(norm.shape[1])}


def _paired_episodes(results, base) -> dict:
    """Paired t-test over episodes of two agents evaluated on the same initial states (runs of the same seeds):
    the mean and SE of the per-episode normalized-return difference ``results - base``, its p value, and how many
    episodes are identical (:func:`mtdistill_jax.evaluate.compare_results`)."""
    from mtdistill_jax.evaluate import compare_results, merge_results

    a, b = (merge_results(list(r)) if len(r) > 1 else list(r)[0] for r in (results, base))
    c = compare_results(a, b)
    return {k: c[k] for k in ("mean_diff", "se_diff", "p", "episodes", "identical")}


def _over_seeds(results: dict) -> dict:
    """Per task and overall: mean and SE over seeds of the per-seed mean normalized returns."""
    from mtdistill_jax.envs.score import normalized_return

    tasks = next(iter(results.values())).tasks
    per_seed = {s: normalized_return(r.returns).mean(axis=1) for s, r in results.items()}  # [K] each
    stack = np.stack([per_seed[s] for s in sorted(per_seed)])  # [S, K]
    scores = stack.mean(axis=1)
    return {"seeds": sorted(per_seed), "tasks": {t: {"mean": float(stack[:, i].mean()), "se": _se(stack[:, i])}
                                                 for i, t in enumerate(tasks)},
            "score": float(scores.mean()), "score_se": _se(scores),
            "score_by_seed": {int(s): float(v) for s, v in zip(sorted(per_seed), scores, strict=True)}}


def _paired(a: dict, b: dict) -> dict | None:
    """Paired t-test of the per-seed scores of b vs a (seeds both have)."""
    from scipy import stats

    seeds = sorted(set(a["score_by_seed"]) & set(b["score_by_seed"]))
    if len(seeds) < 2:
        return None
    x = np.array([a["score_by_seed"][s] for s in seeds])
    y = np.array([b["score_by_seed"][s] for s in seeds])
    t = stats.ttest_rel(y, x)
    return {"seeds": seeds, "mean_diff": float((y - x).mean()), "se_diff": _se(y - x), "t": float(t.statistic),
            "p": float(t.pvalue), "wins": int((y > x).sum())}


def _speed(args, out: Path) -> dict:
    """Per arm: median updates/s over the logged windows of its runs (evaluations excluded) and median seconds of
    one curve evaluation (the first evaluation of a process, which compiles the program, left out)."""
    speed = {}
    for arm in args.arms:
        rates, evals = [], []
        for seed in args.seeds:
            path = out / "runs" / f"{arm}_s{seed}" / "metrics.csv"
            if path.exists():
                with open(path) as f:
                    for row in csv.DictReader(f):
                        if row.get("perf/steps_per_second"):
                            rates.append(float(row["perf/steps_per_second"]))
                        if row.get("perf/eval_seconds") and float(row["perf/eval_seconds"]) < 120:
                            evals.append(float(row["perf/eval_seconds"]))
        if rates:
            speed[arm] = {"updates_per_second": float(np.median(rates)),
                          "eval_seconds": float(np.median(evals)) if evals else None}
    return speed


def command_line(args) -> str:
    """The command that reproduces this experiment (``--out`` shown as ``runs/distill_cpu``; arguments that
    differ from their defaults spelled out)."""
    defaults = parse_args(["--out=x"])
    parts = ["python experiments/distill_cpu.py --out=runs/distill_cpu"]
    for k in (*SHAPING_ARGS, "seeds", "arms"):
        v, d = getattr(args, k), getattr(defaults, k)
        if v != d:
            parts.append(f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(parts)


def _curves(args, out: Path) -> dict:
    """{arm: {seed: [(step, score, {task: return})]}} from the runs' metrics.csv."""
    curves: dict = {}
    for arm in args.arms:
        for seed in args.seeds:
            path = out / "runs" / f"{arm}_s{seed}" / "metrics.csv"
            if not path.exists():
                continue
            rows = []
            with open(path) as f:
                for row in csv.DictReader(f):
                    if row.get("eval/score"):
                        rows.append((int(row["step"]), float(row["eval/score"]),
                                     {t: float(row[f"eval/{t}/return"]) for t in args.tasks}))
            if rows:
                curves.setdefault(arm, {})[seed] = rows
    return curves


def _plot_curves(curves: dict, teacher: dict | None, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, by_seed in curves.items():
        steps = sorted({st for rows in by_seed.values() for st, _, _ in rows})
        means, ses = [], []
        for st in steps:
            v = [sc for rows in by_seed.values() for s2, sc, _ in rows if s2 == st]
            means.append(np.mean(v))
            ses.append(_se(v) if len(v) > 1 else 0.0)
        means, ses = np.array(means), np.nan_to_num(np.array(ses))
        ax.plot(steps, means, marker="o", label=f"{ARM_LABELS[arm]} (n={len(by_seed)})")
        ax.fill_between(steps, means - ses, means + ses, alpha=0.2)
    if teacher is not None:
        ax.axhline(teacher["score"], color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("updates")
    ax.set_ylabel(f"normalized score ({len(args.tasks)} tasks, {args.eval_policy})")
    ax.set_title(f"Students on {len(args.tasks)} MT30 tasks ({args.eval_policy} evaluation); mean ± SE over seeds",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(m: float, se: float) -> str:
    return f"{m:.2f}" if not np.isfinite(se) else f"{m:.2f} ± {se:.2f}"


def stage_report(args, out: Path) -> None:
    from mtdistill_jax.data.native import is_dataset_dir, open_dataset
    from mtdistill_jax.evaluate import EvalResult

    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"tasks": list(args.tasks), "seeds": args.seeds, "steps": args.steps, "batch": args.batch,
                    "eval_policy": args.eval_policy, "eval_mode": eval_mode(args.eval_policy),
                    "eval_episodes_per_seed": args.eval_episodes, "teacher_path": teacher_path(args)}
    # data
    coll = {}
    for spec in collections(args):
        path = out / "collect" / f"{spec['name']}.json"
        if path.exists():
            r = EvalResult.load(path)
            n = len(r.tasks) * r.episodes_per_task * r.episode_length
            coll[spec["name"]] = {"policy": spec["policy"], "episodes_per_task": r.episodes_per_task,
                                  "transitions": n, "seconds": r.seconds, "compile_seconds": r.compile_seconds,
                                  "s_per_1000": 1000 * r.seconds / n,
                                  "returns": {t: float(x.mean()) for t, x in zip(r.tasks, r.returns, strict=True)}}
    report["collect"] = coll
    if is_dataset_dir(out / "data"):
        ds = open_dataset(out / "data")
        report["dataset"] = {"episodes": ds.num_episodes, "transitions": ds.num_episodes * ds.episode_length,
                             "mib": ds.nbytes / 2**20}
    # scores
    teacher = {s: out / "teacher" / f"{args.eval_policy}_s{s}.json" for s in args.seeds}
    teacher = {s: EvalResult.load(p) for s, p in teacher.items() if p.exists()}
    report["teacher"] = _over_seeds(teacher) if teacher else None
    arms = {arm: final_results(args, out, arm) for arm in args.arms}
    report["arms"] = {arm: _over_seeds(r) for arm, r in arms.items() if r}
    base = report["arms"].get("scratch")
    report["paired_vs_scratch"] = {arm: _paired(base, v) for arm, v in report["arms"].items()
                                   if arm != "scratch" and base is not None}
    report["speed"] = _speed(args, out)
    curves = _curves(args, out)
    report["curves"] = {arm: {str(s): [[st, sc] for st, sc, _ in rows] for s, rows in by_seed.items()}
                        for arm, by_seed in curves.items()}
    # quantized
    qdir = out / "quant"
    if (qdir / "source.json").exists():
        q = {"source": json.loads((qdir / "source.json").read_text()), "dtypes": {}}
        loaded = {}
        for dtype in ("float32", *QUANT_DTYPES):
            rs = [EvalResult.load(qdir / f"{dtype}_s{s}.json") for s in args.seeds
                  if (qdir / f"{dtype}_s{s}.json").exists()]
            path = Path(q["source"]["agent"]) if dtype == "float32" else qdir / dtype
            if rs and len(rs) == len(args.seeds):
                loaded[dtype] = rs
                q["dtypes"][dtype] = {**_pooled(rs), "bytes": dir_bytes(path)}
        if "float16" in loaded:
            for dtype, rs in loaded.items():
                if dtype != "float16":
                    q["dtypes"][dtype]["vs_float16"] = _paired_episodes(rs, loaded["float16"])
        if (qdir / "latency.json").exists():
            q["latency"] = json.loads((qdir / "latency.json").read_text())
        if "int8" in q["dtypes"] and "float16" in q["dtypes"]:
            i8, f16 = q["dtypes"]["int8"], q["dtypes"]["float16"]
            if np.isfinite(f16["score_se"]):
                q["int8_within_float16_se"] = bool(abs(i8["score"] - f16["score"]) <= f16["score_se"])
        report["quantized"] = q
    (res_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    # csv
    with open(res_dir / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["agent", "seed", *args.tasks, "score"])
        for name, results in [("teacher", teacher), *arms.items()]:
            for s, r in sorted(results.items()):
                norm = r.normalized
                w.writerow([name, s, *[f"{x:.3f}" for x in norm], f"{r.normalized_score:.3f}"])
    with open(res_dir / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "step", "score", *[f"{t}/return" for t in args.tasks]])
        for arm, by_seed in curves.items():
            for s, rows in sorted(by_seed.items()):
                for st, sc, per in rows:
                    w.writerow([arm, s, st, f"{sc:.3f}", *[f"{per[t]:.2f}" for t in args.tasks]])
    if curves:
        _plot_curves(curves, report["teacher"], res_dir / "curves.png", args)
    (res_dir / "README.md").write_text(_markdown(report, args, out))
    log.info("report written to %s", res_dir)


def _markdown(rep: dict, args, out: Path) -> str:
    L = ["# Knowledge transfer on CPU: distilling the paper's 1M student into fresh 1M students", "",
         "Generated by `experiments/distill_cpu.py` (stage `report`) from the files under its `--out`; the reading "
         "of these numbers is in the README's *Distillation results*.", ""]
    L += [f"Tasks: {', '.join(args.tasks)}. Teacher: `{os.path.basename(rep['teacher_path'])}`. Students: 1M MT30, "
          f"{args.steps:,} updates of batch {args.batch} (horizon 3, official hyperparameters otherwise), "
          f"seeds {', '.join(map(str, args.seeds))}. Evaluation: {args.eval_policy} "
          f"({rep['eval_mode']}), {args.eval_episodes} episodes per task and seed, 500 steps; the same initial "
          "states for every agent of a seed.", ""]
    if rep.get("dataset"):
        d = rep["dataset"]
        L += ["## Data", "", f"{d['episodes']} episodes, {d['transitions']:,} transitions, {d['mib']:.1f} MiB.", "",
              "| collection | episodes/task | " + " | ".join(args.tasks) + " | s per 1,000 transitions | compile s |",
              "|---|---|" + "---|" * len(args.tasks) + "---|---|"]
        for c in rep["collect"].values():
            what = "policy prior, sampled" if c["policy"] == "prior" else "planner (MPPI, official act)"
            L.append(f"| {what} | {c['episodes_per_task']} | "
                     + " | ".join(f"{c['returns'][t]:.1f}" for t in args.tasks)
                     + f" | {c['s_per_1000']:.2f} | {c['compile_seconds']:.0f} |")
        L.append("")
    L += ["## Scores", "", "Normalized returns (0-100) per task, mean ± SE over seeds; score = mean over tasks.", "",
          "| agent | n | " + " | ".join(args.tasks) + " | score |", "|---|---|" + "---|" * len(args.tasks) + "---|"]
    rows = ([("teacher (ceiling)", rep["teacher"])] if rep["teacher"] else []) + [
        (ARM_LABELS[a], v) for a, v in rep["arms"].items()]
    for name, v in rows:
        L.append(f"| {name} | {len(v['seeds'])} | " + " | ".join(_fmt(v["tasks"][t]["mean"], v["tasks"][t]["se"])
                                                           for t in args.tasks)
                 + f" | **{_fmt(v['score'], v['score_se'])}** |")
    L.append("")
    for arm, p in rep["paired_vs_scratch"].items():
        if p:
            L.append(f"- {ARM_LABELS[arm]} vs (a), paired over seeds {p['seeds']}: difference "
                     f"{p['mean_diff']:+.2f} ± {p['se_diff']:.2f} (t = {p['t']:.2f}, p = {p['p']:.3f}; better in "
                     f"{p['wins']} of {len(p['seeds'])} seeds)")
    if rep["speed"]:
        L += ["", "Speed on this 2-core CPU (median over the logged windows of each arm's runs): " + "; ".join(
            f"{a} {v['updates_per_second']:.1f} updates/s"
            + (f", {v['eval_seconds']:.0f} s per curve evaluation" if v["eval_seconds"] else "")
            for a, v in rep["speed"].items()) + "."]
    L += ["", "![learning curves](curves.png)", ""]
    q = rep.get("quantized")
    if q:
        L += ["## Quantized student", "", f"Source: arm `{q['source']['arm']}`, seed {q['source']['seed']} (best "
              "distilled). Every dtype evaluated on the same tasks, initial states and episodes (all seeds' "
              "evaluation states pooled); SE over episodes.", "",
              "| stored dtype | size on disk | score | − float16, paired over episodes (p; identical episodes) |",
              "|---|---|---|---|"]
        for dt, v in q["dtypes"].items():
            pe = v.get("vs_float16")
            paired = (f"{pe['mean_diff']:+.2f} ± {pe['se_diff']:.2f} (p = {pe['p']:.2f}; {pe['identical']} of "
                      f"{pe['episodes']})") if pe else ""
            L.append(f"| {dt} | {v['bytes'] / 2**20:.2f} MiB | {_fmt(v['score'], v['score_se'])} | {paired} |")
        if "int8_within_float16_se" in q:
            L += ["", f"int8 within float16's standard error: **{q['int8_within_float16_se']}**."]
        if q.get("latency"):
            L += ["", "Latency of one `act()` for one env on this CPU (params and observation cast to the compute "
                  "dtype; median, p10-p90 ms):", "",
                  "| actor | compute dtype | median ms | p10-p90 ms | first call ms |",
                  "|---|---|---|---|---|"]
            for r in q["latency"]:
                L.append(f"| {r['policy']} | {r['compute']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-"
                         f"{r['p90_ms']:.3f} | {r['first_call_ms']:.0f} |")
        L.append("")
    L += ["## Command", "", "```bash", command_line(args), "```", "",
          "It resumes where it stopped (the same command again); `--stages=report` rewrites this report only.", ""]
    return "\n".join(L)


SHAPING_ARGS = ("teacher", "tasks", "prior_episodes", "planner_episodes", "steps", "batch", "eval_every",
                "eval_episodes", "eval_policy")  # what the files under --out depend on


def check_same_args(args, out: Path) -> None:
    """Record the arguments that shape the files under ``out`` (``<out>/args.json``) on the first run, and stop a
    later run that changes one of them (its stages would mix results made with different settings)."""
    now = {k: getattr(args, k) for k in SHAPING_ARGS}
    path = out / "args.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if changed:
            raise SystemExit(f"error: {out} holds a run made with other settings "
                             + ", ".join(f"--{k}={a} (now {b})" for k, (a, b) in changed.items())
                             + "; use another --out or the same settings (--seeds and --arms may grow)")
    else:
        path.write_text(json.dumps(now, indent=1) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax and MuJoCo chatter
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    from mtdistill_jax.xla_cpu import use_fewer_kernels

    use_fewer_kernels()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_same_args(args, out)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    with open(out / "commands.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
    for stage in STAGES:
        if stage in args.stages:
            log.info("stage %s", stage)
            globals()[f"stage_{stage}"](args, out)


if __name__ == "__main__":
    main()
