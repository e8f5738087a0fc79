"""Does online TD-MPC2 learn? Single-task online runs on CPU, with TD-MPC2's published curve beside ours.

    python experiments/online_learning.py --task=cartpole-balance --out=runs/online_cartpole_30k \
        [--results=experiments/results/online_cartpole_30k]

Stages (``--stages``, default both): ``train`` runs ``launch/train.py`` with the online config (the 1M MT30 model,
official hyperparameters: batch 256, seed phase max(1000, 5 x episode length) env steps of random actions and as
many pretraining updates, then ``--utd`` updates per env step), ``--envs_per_task`` envs stepping in lockstep,
for ``--steps`` env steps in all, evaluating every ``--eval_every`` env steps with ``--eval_episodes`` episodes
(``--eval_policy``: the planner as the official evaluation, or the policy prior). The run checkpoints every
``--save_every`` env steps, so the same command resumes an interrupted run (the command line is the same).
``report`` reads the run's ``metrics.csv`` and evaluations and writes ``curve.png``, ``results.json``,
``metrics.csv`` and ``README.md`` to ``--results``: evaluation returns and training episode returns against env
steps, TD-MPC2's published evaluation points for the task (``results/<task>.csv`` of the official repository, 3
seeds) drawn beside them, wall time, env steps/s and updates/s. It reports what the run measured so far (a run
still going or stopped early gives a partial report saying so).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "report")

# TD-MPC2's published evaluation returns (official repository, results/<task>.csv: single-task runs with the
# official defaults, 3 seeds, evaluated every 100k env steps); the points within the first 200k steps.
OFFICIAL = {
    "cartpole-balance": {0: (124.3, 313.1, 270.6), 100_000: (997.9, 997.0, 998.4), 200_000: (998.9, 989.4, 998.4)},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--task", required=True, help="one MT30 task, e.g. cartpole-balance")
    p.add_argument("--out", required=True, help="the run's workdir (checkpoints, metrics, evaluations); resumable")
    p.add_argument("--results", default=None, help="where the report goes (default: "
                   "experiments/results/online_<task>_<steps/1000>k)")
    p.add_argument("--steps", type=int, default=30_000, help="env steps in all (all envs together)")
    p.add_argument("--envs_per_task", type=int, default=4, help="envs stepping in lockstep")
    p.add_argument("--utd", type=int, default=1, help="updates per env step")
    p.add_argument("--model_size", type=int, default=1, help="1, 5, 19, 48 or 317 (M parameters)")
    p.add_argument("--eval_every", type=int, default=7_500, help="env steps between evaluations")
    p.add_argument("--eval_episodes", type=int, default=5)
    p.add_argument("--eval_policy", choices=("planner", "prior"), default="planner")
    p.add_argument("--save_every", type=int, default=1_000, help="env steps between checkpoints")
    p.add_argument("--log_every", type=int, default=500, help="env steps between metric rows")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        p.error(f"unknown stages {bad}; valid: {', '.join(STAGES)}")
    args.stages = stages
    for name in ("steps", "envs_per_task", "utd", "eval_every", "eval_episodes", "save_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.results is None:
        args.results = str(REPO / "experiments" / "results" / f"online_{args.task}_{args.steps // 1000}k")
    return args


def train_command(args, repo: Path = REPO) -> list[str]:
    """The ``launch/train.py`` command of the run (the same one resumes it); paths under ``repo``."""
    return [sys.executable, str(repo / "launch/train.py"), "--config=" + str(repo / "mtdistill_jax/configs/online.py"),
            f"--workdir={args.out}", f"--config.tasks={args.task}", f"--config.model_size={args.model_size}",
            f"--config.online.envs_per_task={args.envs_per_task}", f"--config.online.utd={args.utd}",
            f"--config.steps={args.steps}", f"--config.log_every={args.log_every}", f"--config.seed={args.seed}",
            f"--save_every={args.save_every}", f"--eval_every={args.eval_every}", f"--eval_policy={args.eval_policy}",
            f"--eval_episodes={args.eval_episodes}", "--noprogress"]


def read_metrics(workdir: Path) -> list[dict[str, float]]:
    """The run's ``metrics.csv`` rows, numbers as floats (empty cells dropped)."""
    path = workdir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def read_evals(workdir: Path, task: str) -> list[dict]:
    """Per evaluation: env step, mean and per-episode returns (from ``eval/step_*.json``)."""
    out = []
    for path in sorted((workdir / "eval").glob("step_*.json")):
        d = json.loads(path.read_text())
        returns = next(t["returns"] for t in d["tasks"] if t["name"] == task)
        out.append({"step": int(path.stem.split("_")[1]), "returns": [float(r) for r in returns],
                    "mean": sum(returns) / len(returns)})
    return sorted(out, key=lambda e: e["step"])


def summarize(args, rows: list[dict], evals: list[dict]) -> dict:
    last = rows[-1] if rows else {}
    # throughput after the seed phase: the metric windows after the one holding the pretraining updates
    learning = [r for r in rows if r.get("train/updates", 0) > 0 and "perf/env_steps_per_second" in r][1:]

    def median(key):
        xs = sorted(r[key] for r in learning)
        return (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2 if xs else None

    return {
        "task": args.task, "command": "python " + " ".join(train_command(args, Path("."))[1:]),
        "env_steps_done": int(last.get("step", 0)), "env_steps_planned": args.steps,
        "updates": int(last.get("train/updates", 0)), "wall_seconds": last.get("wall_time"),
        "envs_per_task": args.envs_per_task, "utd": args.utd, "model_size": args.model_size,
        "eval_policy": args.eval_policy, "eval_episodes": args.eval_episodes,
        "env_steps_per_second": median("perf/env_steps_per_second"),  # median over the metric windows
        "updates_per_second": median("perf/updates_per_second"),
        "evaluations": evals,
        "best_eval": max((e["mean"] for e in evals), default=None),
        "official": {str(k): list(v) for k, v in OFFICIAL.get(args.task, {}).items()},
    }


def plot(args, rows: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [(r["step"], r["train/episode_return"]) for r in rows if "train/episode_return" in r]
    if train:
        ax.plot(*zip(*train, strict=True), ".-", color="0.6", lw=1, label="ours: training episodes (window mean)")
    if evals:
        xs = [e["step"] for e in evals]
        ax.plot(xs, [e["mean"] for e in evals], "o-", color="C0", label=f"ours: evaluation ({args.eval_policy}, "
                f"{args.eval_episodes} episodes)")
        for e in evals:
            ax.scatter([e["step"]] * len(e["returns"]), e["returns"], s=8, color="C0", alpha=0.35)
    # the published points up to 100k env steps (their first after step 0) or the run's length
    official = {k: v for k, v in OFFICIAL.get(args.task, {}).items() if k <= max(args.steps, 100_000)}
    if official:
        xs = [s for s in official for _ in official[s]]
        ys = [v for s in official for v in official[s]]
        ax.scatter(xs, ys, marker="x", color="C3", label="TD-MPC2 published (3 seeds)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return")
    ax.set_ylim(0, 1050)
    ax.set_xlim(-0.02 * max([args.steps, *official]), max([args.steps, *official]) * 1.03)
    ax.set_title(f"Online TD-MPC2 on {args.task}, {args.model_size}M model, {args.envs_per_task} envs, CPU")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> dict:
    workdir, results = Path(args.out), Path(args.results)
    rows, evals = read_metrics(workdir), read_evals(workdir, args.task)
    if not rows:
        raise SystemExit(f"no metrics in {workdir}: run the train stage first")
    results.mkdir(parents=True, exist_ok=True)
    summary = summarize(args, rows, evals)
    (results / "results.json").write_text(json.dumps(summary, indent=1))
    (results / "metrics.csv").write_bytes((workdir / "metrics.csv").read_bytes())
    plot(args, rows, evals, results / "curve.png")
    fmt = lambda x, p=1: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{p}f}"  # noqa: E731
    done = summary["env_steps_done"] >= args.steps
    lines = [f"# Online TD-MPC2 on {args.task} (CPU)", "",
             ("" if done else f"**Partial: the run has done {summary['env_steps_done']:,} of {args.steps:,} env "
              "steps so far.**"), "",
             "```bash", f"python experiments/online_learning.py --task={args.task} --out={args.out} "
             f"--steps={args.steps} --envs_per_task={args.envs_per_task} --eval_every={args.eval_every} "
             f"--eval_episodes={args.eval_episodes} --eval_policy={args.eval_policy}", "```", "",
             f"Runs: `{summary['command']}`", "",
             f"{args.model_size}M MT30 model, {args.envs_per_task} envs in lockstep, {args.utd} update(s) per env "
             f"step after the seed phase. Env steps: {summary['env_steps_done']:,}; updates: {summary['updates']:,}; "
             f"wall time {fmt((summary['wall_seconds'] or 0) / 60)} min (the run's `wall_time`); after the seed phase "
             f"{fmt(summary['env_steps_per_second'], 2)} env steps/s and {fmt(summary['updates_per_second'], 2)} "
             "updates/s (medians over the metric windows, evaluations excluded).", "",
             "| env steps | evaluation return (mean) | episodes |", "|---|---|---|"]
    lines += [f"| {e['step']:,} | {e['mean']:.1f} | {', '.join(f'{r:.0f}' for r in e['returns'])} |" for e in evals]
    if not evals:
        lines.append(f"| (none yet: the first is at {args.eval_every:,}) | | |")
    official = OFFICIAL.get(args.task)
    if official:
        lines += ["", "TD-MPC2 published (official repository `results/" + args.task + ".csv`, 3 seeds): "
                  + "; ".join(f"{s:,} steps: {', '.join(f'{v:.1f}' for v in vs)}" for s, vs in official.items())
                  + "."]
    lines += ["", "![learning curve](curve.png)", ""]
    (results / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    if "train" in args.stages:
        os.makedirs(args.out, exist_ok=True)
        subprocess.run(train_command(args), check=True)
    if "report" in args.stages:
        report(args)


if __name__ == "__main__":
    main()
