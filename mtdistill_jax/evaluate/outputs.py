"""What an evaluation writes: JSON, CSV, a Markdown table, a per-task bar chart and per-task videos."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from mtdistill_jax.evaluate.result import EvalResult


def save_videos(result: EvalResult, workdir: str, fps: float = 25.0, height: int = 240, width: int = 320,
                tasks: Sequence[str] | None = None) -> dict[str, str]:
    """One mp4 per task of its first recorded episode (needs ``evaluate(..., record=True)``)."""
    from mtdistill_jax.envs import make
    from mtdistill_jax.envs.render import render_frames, save_video

    if result.trajectories is None:
        raise ValueError("no trajectories recorded: run evaluate(..., record=True)")
    os.makedirs(workdir, exist_ok=True)
    out = {}
    for task in tasks or result.tasks:
        states = result.trajectories[task]  # render states {qpos, qvel, act, info} with a leading time axis
        frames = render_frames(make(task), states, height=height, width=width)
        out[task] = save_video(frames, os.path.join(workdir, f"{task}.mp4"), fps)
    return out


def write_outputs(result: EvalResult, workdir: str, name: str = "eval", command: str | None = None) -> dict[str, str]:
    """``<name>.json``, ``<name>.csv``, ``<name>.md`` and a per-task bar chart ``<name>.png`` in ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, f"{name}.{k}") for k in ("json", "csv", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result.to_dict(), f, indent=2)
    with open(paths["csv"], "w") as f:
        f.write("task,mean,std,normalized," + ",".join(f"ep{i}" for i in range(result.episodes_per_task)) + "\n")
        for t, r, n in zip(result.tasks, result.returns, result.normalized, strict=True):
            f.write(f"{t},{r.mean():.3f},{r.std():.3f},{n:.4f}," + ",".join(f"{x:.3f}" for x in r) + "\n")
    with open(paths["md"], "w") as f:
        if command:
            f.write(f"Command: `{command}`\n\n")
        seeds = ", ".join(map(str, result.seeds)) or "not recorded"
        f.write(f"{result.episodes_per_task} episode(s) per task of {result.episode_length} agent steps, planner "
                f"mode `{result.mode}`, seed(s) {seeds}.\n\n")
        f.write(result.table() + "\n")
    plot_bars(result, paths["png"])
    return paths


def plot_bars(result: EvalResult, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(result.tasks) + 2), 4))
    x = np.arange(len(result.tasks))
    ax.bar(x, result.normalized, yerr=result.returns.std(axis=1) / 10, capsize=2, color="#4c72b0")
    ax.set_xticks(x, result.tasks, rotation=75, ha="right", fontsize=8)
    ax.set_ylabel("normalized return (return / 10)")
    ax.set_ylim(0, 100)
    ax.set_title(f"normalized score {result.normalized_score:.2f} ({result.episodes_per_task} episodes/task, "
                 f"mode {result.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
