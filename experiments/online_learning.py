"""Does online TD-MPC2 learn? Online runs on CPU (one task, or several in one program), with TD-MPC2's published
single-task curves beside ours.

    python experiments/online_learning.py --task=cartpole-balance --out=runs/online_cartpole_30k \
        [--results=experiments/results/online_cartpole_30k]
    python experiments/online_learning.py --task=cartpole-balance,finger-spin,walker-walk --envs_per_task=4 \
        --out=runs/online_mt3 --log_every=600 --save_every=1200 --eval_every=9000 --eval_episodes=2

Stages (``--stages``, default both): ``train`` runs ``launch/train.py`` with the online config (the 1M MT30 model,
official hyperparameters: batch 256, seed phase max(1000, 5 x episode length) env steps of random actions and as
many pretraining updates, then ``--utd`` updates per env step), ``--envs_per_task`` envs stepping in lockstep,
for ``--steps`` env steps in all, evaluating every ``--eval_every`` env steps with ``--eval_episodes`` episodes
per task (``--eval_policy``: the planner as the official evaluation, or the policy prior). Several tasks
(``--task=a,b,c``) are learned by one model in one compiled program, ``--envs_per_task`` envs each; every count
is in env steps of all envs together, so each must be a multiple of their number. The run checkpoints every
``--save_every`` env steps, so the same command resumes an interrupted run (the command line is the same); the
launcher's output is also appended to ``<out>/train.log``. ``report`` reads the run's ``metrics.csv``,
evaluations and log and writes ``curve.png`` (a panel per task), ``results.json``, ``metrics.csv`` and
``README.md`` to ``--results``: per task the evaluation returns and training episode returns against env steps,
with TD-MPC2's published evaluation points (``results/<task>.csv`` of the official repository, 3 seeds, single-task
runs) where the task has them; compile time of the fused program (from the log, each start), wall time, env steps/s
and updates/s. It reports what the run measured so far (a run still going or stopped early gives a partial report
saying so).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "report")

# TD-MPC2's published evaluation returns (official repository, results/<task>.csv: single-task runs with the
# official defaults, 3 seeds, evaluated every 100k env steps); the points within the first 200k steps.
OFFICIAL = {
    "cartpole-balance": {0: (124.3, 313.1, 270.6), 100_000: (997.9, 997.0, 998.4), 200_000: (998.9, 989.4, 998.4)},
    "finger-spin": {0: (0.0, 0.0, 0.0), 100_000: (919.6, 937.3, 985.6), 200_000: (963.9, 980.7, 978.6)},
    "walker-walk": {0: (27.9, 24.8, 31.4), 100_000: (966.7, 947.7, 971.3), 200_000: (970.5, 971.2, 978.6)},
}
COMPILE_LINE = re.compile(r"compiled the online chunk in ([0-9.]+) s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--task", required=True, help="an MT30 task, or several comma-separated (one program, one model), "
                   "e.g. cartpole-balance or cartpole-balance,finger-spin,walker-walk")
    p.add_argument("--out", required=True, help="the run's workdir (checkpoints, metrics, evaluations); resumable")
    p.add_argument("--results", default=None, help="where the report goes (default: "
                   "experiments/results/online_<tasks joined by +>_<steps/1000>k)")
    p.add_argument("--steps", type=int, default=30_000, help="env steps in all (all envs together)")
    p.add_argument("--envs_per_task", type=int, default=4, help="envs per task, all stepping in lockstep")
    p.add_argument("--utd", type=int, default=1, help="updates per env step")
    p.add_argument("--model_size", type=int, default=1, help="1, 5, 19, 48 or 317 (M parameters)")
    p.add_argument("--eval_every", type=int, default=7_500, help="env steps between evaluations")
    p.add_argument("--eval_episodes", type=int, default=5, help="evaluation episodes per task")
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
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if not args.tasks or len(set(args.tasks)) != len(args.tasks):
        p.error(f"--task must name one task or several different ones, got {args.task!r}")
    args.task = ",".join(args.tasks)
    for name in ("steps", "envs_per_task", "utd", "eval_every", "eval_episodes", "save_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    envs = len(args.tasks) * args.envs_per_task
    for name in ("steps", "eval_every", "save_every", "log_every"):
        if getattr(args, name) % envs:
            p.error(f"--{name}={getattr(args, name)} is not a multiple of the {envs} envs that step together "
                    f"({len(args.tasks)} tasks x --envs_per_task={args.envs_per_task}); counts are env steps")
    if args.results is None:
        args.results = str(REPO / "experiments" / "results" / f"online_{'+'.join(args.tasks)}_{args.steps // 1000}k")
    return args


def train_command(args, repo: Path = REPO) -> list[str]:
    """The ``launch/train.py`` command of the run (the same one resumes it); paths under ``repo``."""
    return [sys.executable, str(repo / "launch/train.py"), "--config=" + str(repo / "mtdistill_jax/configs/online.py"),
            f"--workdir={args.out}", f"--config.tasks={args.task}", f"--config.model_size={args.model_size}",
            f"--config.online.envs_per_task={args.envs_per_task}", f"--config.online.utd={args.utd}",
            f"--config.steps={args.steps}", f"--config.log_every={args.log_every}", f"--config.seed={args.seed}",
            f"--save_every={args.save_every}", f"--eval_every={args.eval_every}", f"--eval_policy={args.eval_policy}",
            f"--eval_episodes={args.eval_episodes}", "--noprogress"]


def run_logged(cmd: list[str], log_path: Path) -> None:
    """Run ``cmd``, its output (stdout and stderr) echoed and appended to ``log_path``; raises on failure."""
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            log.flush()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def read_metrics(workdir: Path) -> list[dict[str, float]]:
    """The run's ``metrics.csv`` rows, numbers as floats (empty cells dropped)."""
    path = workdir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def read_evals(workdir: Path, task: str) -> list[dict]:
    """Per evaluation: env step, mean and per-episode returns of ``task`` (from ``eval/step_*.json``)."""
    out = []
    for path in sorted((workdir / "eval").glob("step_*.json")):
        d = json.loads(path.read_text())
        returns = next(t["returns"] for t in d["tasks"] if t["name"] == task)
        out.append({"step": int(path.stem.split("_")[1]), "returns": [float(r) for r in returns],
                    "mean": sum(returns) / len(returns)})
    return sorted(out, key=lambda e: e["step"])


def read_compile_seconds(workdir: Path) -> list[float]:
    """Compile time of the fused online program at each start of the run (from ``train.log``)."""
    path = workdir / "train.log"
    if not path.is_file():
        return []
    return [float(m.group(1)) for m in COMPILE_LINE.finditer(path.read_text())]


def train_return_key(args, task: str) -> str:
    """The metric of ``task``'s training episode returns: one task logs ``train/episode_return``, several log
    ``train/<task>/episode_return``."""
    return "train/episode_return" if len(args.tasks) == 1 else f"train/{task}/episode_return"


def summarize(args, rows: list[dict], evals: dict[str, list[dict]], compile_seconds: list[float]) -> dict:
    last = rows[-1] if rows else {}
    # throughput after the seed phase: the metric windows after the one holding the pretraining updates
    learning = [r for r in rows if r.get("train/updates", 0) > 0 and "perf/env_steps_per_second" in r][1:]

    def median(key):
        xs = sorted(r[key] for r in learning)
        return (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2 if xs else None

    per_task = {}
    for t in args.tasks:
        train = [(r["step"], r[train_return_key(args, t)]) for r in rows if train_return_key(args, t) in r]
        per_task[t] = {"evaluations": evals[t], "best_eval": max((e["mean"] for e in evals[t]), default=None),
                       "last_train_return": train[-1][1] if train else None,
                       "official": {str(k): list(v) for k, v in OFFICIAL.get(t, {}).items()}}
    return {
        "tasks": args.tasks, "command": "python " + " ".join(train_command(args, Path("."))[1:]),
        "env_steps_done": int(last.get("step", 0)), "env_steps_planned": args.steps,
        "updates": int(last.get("train/updates", 0)), "wall_seconds": last.get("wall_time"),
        "envs_per_task": args.envs_per_task, "utd": args.utd, "model_size": args.model_size,
        "eval_policy": args.eval_policy, "eval_episodes": args.eval_episodes,
        "compile_seconds": compile_seconds,  # the fused online program, at each start of the run
        "env_steps_per_second": median("perf/env_steps_per_second"),  # median over the metric windows
        "updates_per_second": median("perf/updates_per_second"),
        "per_task": per_task,
    }


def plot(args, rows: list[dict], evals: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(args.tasks)
    fig, axes = plt.subplots(1, n, figsize=(8 if n == 1 else 4.6 * n, 4.5), squeeze=False)
    for ax, task in zip(axes[0], args.tasks, strict=True):
        key = train_return_key(args, task)
        train = [(r["step"], r[key]) for r in rows if key in r]
        if train:
            ax.plot(*zip(*train, strict=True), ".-", color="0.6", lw=1, label="ours: training episodes (window mean)")
        if evals[task]:
            xs = [e["step"] for e in evals[task]]
            ax.plot(xs, [e["mean"] for e in evals[task]], "o-", color="C0",
                    label=f"ours: evaluation ({args.eval_policy}, {args.eval_episodes} episodes)")
            for e in evals[task]:
                ax.scatter([e["step"]] * len(e["returns"]), e["returns"], s=8, color="C0", alpha=0.35)
        # the published points up to 100k env steps (their first after step 0) or the run's length
        official = {k: v for k, v in OFFICIAL.get(task, {}).items() if k <= max(args.steps, 100_000)}
        if official:
            xs = [s for s in official for _ in official[s]]
            ys = [v for s in official for v in official[s]]
            ax.scatter(xs, ys, marker="x", color="C3", label="TD-MPC2 published, single task (3 seeds)")
        ax.set_xlabel("env steps (all tasks' envs together)" if n > 1 else "env steps")
        ax.set_ylabel("episode return")
        ax.set_ylim(0, 1050)
        right = max([args.steps, *official])
        ax.set_xlim(-0.02 * right, right * 1.03)
        ax.set_title(task if n > 1 else f"Online TD-MPC2 on {task}, {args.model_size}M model, "
                     f"{args.envs_per_task} envs, CPU", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    if n > 1:
        fig.suptitle(f"Online TD-MPC2, {n} tasks in one program, {args.model_size}M model, {args.envs_per_task} "
                     "envs per task, CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> dict:
    workdir, results = Path(args.out), Path(args.results)
    rows = read_metrics(workdir)
    if not rows:
        raise SystemExit(f"no metrics in {workdir}: run the train stage first")
    evals = {t: read_evals(workdir, t) for t in args.tasks}
    results.mkdir(parents=True, exist_ok=True)
    summary = summarize(args, rows, evals, read_compile_seconds(workdir))
    (results / "results.json").write_text(json.dumps(summary, indent=1))
    (results / "metrics.csv").write_bytes((workdir / "metrics.csv").read_bytes())
    plot(args, rows, evals, results / "curve.png")
    fmt = lambda x, p=1: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{p}f}"  # noqa: E731
    done = summary["env_steps_done"] >= args.steps
    n = len(args.tasks)
    per_task = f" ({summary['env_steps_done'] // n:,} per task)" if n > 1 else ""
    compile_text = (f"compile of the fused program: {', '.join(f'{c:.0f}' for c in summary['compile_seconds'])} s "
                    "(each start of the run, from `train.log`); " if summary["compile_seconds"] else "")
    lines = [f"# Online TD-MPC2 on {', '.join(args.tasks)} (CPU{', one program' if n > 1 else ''})", "",
             ("" if done else f"**Partial: the run has done {summary['env_steps_done']:,} of {args.steps:,} env "
              "steps so far.**"), "",
             "```bash", f"python experiments/online_learning.py --task={args.task} --out={args.out} "
             f"--steps={args.steps} --envs_per_task={args.envs_per_task} --log_every={args.log_every} "
             f"--save_every={args.save_every} --eval_every={args.eval_every} --eval_episodes={args.eval_episodes} "
             f"--eval_policy={args.eval_policy}", "```", "",
             f"Runs: `{summary['command']}`", "",
             f"{args.model_size}M MT30 model, {args.envs_per_task} envs {'per task ' if n > 1 else ''}in lockstep "
             f"({n * args.envs_per_task} in all), {args.utd} update(s) per env step after the seed phase. Env steps "
             f"(all envs together): {summary['env_steps_done']:,}{per_task}; updates: {summary['updates']:,}; "
             "wall time "
             f"{fmt((summary['wall_seconds'] or 0) / 60)} min (the run's `wall_time`); {compile_text}after the seed "
             f"phase {fmt(summary['env_steps_per_second'], 2)} env steps/s and {fmt(summary['updates_per_second'], 2)}"
             " updates/s (medians over the metric windows, evaluations excluded).", ""]
    for t in args.tasks:
        ev = summary["per_task"][t]["evaluations"]
        if n > 1:
            last = summary["per_task"][t]["last_train_return"]
            lines += [f"## {t}", "", f"Training episode return, last window: {fmt(last)}.", ""]
        lines += ["| env steps | evaluation return (mean) | episodes |", "|---|---|---|"]
        lines += [f"| {e['step']:,} | {e['mean']:.1f} | {', '.join(f'{r:.0f}' for r in e['returns'])} |" for e in ev]
        if not ev:
            lines.append(f"| (none yet: the first is at {args.eval_every:,}) | | |")
        official = OFFICIAL.get(t)
        if official:
            lines += ["", "TD-MPC2 published (official repository `results/" + t + ".csv`, 3 seeds, single task): "
                      + "; ".join(f"{s:,} steps: {', '.join(f'{v:.1f}' for v in vs)}" for s, vs in official.items())
                      + "."]
        lines.append("")
    lines += ["![learning curve](curve.png)", ""]
    (results / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    if "train" in args.stages:
        os.makedirs(args.out, exist_ok=True)
        run_logged(train_command(args), Path(args.out) / "train.log")
    if "report" in args.stages:
        report(args)


if __name__ == "__main__":
    main()
