"""Per-task parity report of our MJX MT30 envs against episodes recorded from the official TD-MPC2 envs.

Applies the criterion of ``tests/envs/test_parity.py`` (``tests/envs/parity.py``: float32 first, float64 MJX
for the steps float32 misses) to every ``envs/<task>_seed<k>.npz`` in a reference folder and writes, per task,
the worst float32 error, how many steps needed the float64 re-check and the worst float64 error there::

    python experiments/env_parity.py --reference ../shared/reference --out experiments/results/env_parity
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "envs"))

import parity  # noqa: E402
from parity import FIELDS, load_episode, task_of  # noqa: E402

OBS_AT_STATE = (1e-4, 1e-5)  # tests/envs/test_parity.py: observation computed at a recorded state


def obs_at_state_ratio(ep, out) -> float:
    worst = 0.0
    for key, sl in parity.obs_key_slices(ep).items():
        if key == "touch":
            continue
        err = np.abs(out["obs"][:, sl].astype(np.float64) - ep["obs"][:, sl])
        worst = max(worst, float((err / (OBS_AT_STATE[0] + OBS_AT_STATE[1] * np.abs(ep["obs"][:, sl]))).max()))
    return worst


def _load(cache: str, path, prec: str):
    f = Path(cache) / f"{Path(path).stem}_{prec}.npz" if cache else None
    if f is not None and f.is_file():
        with np.load(f) as d:
            return {k: d[k] for k in d.files}
    return None


def _cached(cache: str, path, prec: str, compute):
    out = _load(cache, path, prec)
    if out is None:
        out = compute()
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
            np.savez(Path(cache) / f"{Path(path).stem}_{prec}.npz", **out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", default=str(Path(__file__).resolve().parents[2] / "shared" / "reference"))
    p.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    p.add_argument("--tasks", default="", help="comma-separated subset")
    p.add_argument("--cache", default="", help="folder keeping each episode's replay outputs (a rerun with other "
                   "tolerances then replays nothing)")
    a = p.parse_args(argv)
    files = sorted((Path(a.reference) / "envs").glob("*_seed*.npz"))
    if a.tasks:
        files = [f for f in files if task_of(f) in a.tasks.split(",")]
    if not files:
        sys.exit(f"error: no envs/<task>_seed<k>.npz under {a.reference}")
    t0 = time.time()
    outs, need64 = {}, []
    for i, f in enumerate(files):
        ep = load_episode(f)
        out = _cached(a.cache, f, "float32", lambda f=f, ep=ep: parity.replay(task_of(f), ep))
        outs[str(f)] = out
        if max(r.max() for r in parity.step_ratios(ep, out).values()) > 1.0:
            need64.append(str(f))
        print(f"[{i + 1}/{len(files)}] {f.name} float32 {time.time() - t0:.0f} s", flush=True)
    print(f"float64 re-check of {len(need64)} episodes", flush=True)
    x64 = {f: _load(a.cache, f, "float64") for f in need64}
    todo = [f for f, out in x64.items() if out is None]
    x64.update(parity.replay_x64(todo, timeout=6 * 3600) if todo else {})
    for f in todo:
        _cached(a.cache, f, "float64", lambda f=f: x64[f])
    per_file = {}
    for f in files:
        ep = load_episode(f)
        rep = parity.check_episode(f, outs[str(f)], x64.get(str(f)))
        rep["obs_at_state"] = obs_at_state_ratio(ep, outs[str(f)])
        per_file[f.name] = rep
    by_task = collections.defaultdict(list)
    for name, rep in per_file.items():
        by_task[task_of(name)].append(rep)
    rows = []
    for task, reps in sorted(by_task.items()):
        row = {"task": task, "episodes": len(reps), "steps": 60 * len(reps),
               "rechecked": sum(len(r["rechecked"]) for r in reps),
               "failed": sum(len(r["failed"]) for r in reps),
               "obs_at_state": max(r["obs_at_state"] for r in reps)}
        for prec in ("float32", "float64"):
            for kind in ("", "_abs"):
                row[prec + kind] = {f: max((r[prec + kind].get(f, 0.0) for r in reps), default=0.0) for f in FIELDS}
        rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps({"reference": a.reference, "files": per_file, "tasks": rows,
                                                 "seconds": time.time() - t0}, indent=1))
    lines = [f"# Env parity: {len(files)} episodes of {len(rows)} tasks ({a.reference})", "",
             "Command: `python experiments/env_parity.py " + " ".join(argv or sys.argv[1:]) + "`", "",
             "Worst absolute errors; in brackets the worst ratio error / allowed (<= 1 passes).", "",
             "| task | episodes | float32 qpos | float32 qvel | float32 obs | float32 reward | steps re-checked "
             "in float64 | float64 worst (qpos / qvel / obs / reward) | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f32 = " | ".join(f"{r['float32_abs'][f]:.2g} ({r['float32'][f]:.2g})" for f in FIELDS)
        f64 = (" / ".join(f"{r['float64_abs'][f]:.2g} ({r['float64'][f]:.2g})" for f in FIELDS)
               if r["rechecked"] else "-")
        lines.append(f"| {r['task']} | {r['episodes']} | {f32} | {r['rechecked']} of {r['steps']} | {f64} | "
                     f"{r['failed']} |")
    lines += ["", f"Total: {sum(r['rechecked'] for r in rows)} of {sum(r['steps'] for r in rows)} steps "
              f"re-checked in float64, {sum(r['failed'] for r in rows)} failed; "
              f"{time.time() - t0:.0f} s on this machine."]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
