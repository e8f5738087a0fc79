"""Replaying recorded official (dm_control + TD-MPC2 wrapper) episodes through our MJX environments.

Also the parity criterion itself (:data:`TOLERANCE`, :func:`step_ratios`, :func:`check_episode`), shared by
``tests/envs/test_parity.py`` and ``experiments/env_parity.py`` (the per-task error report), and a command line
that replays episodes in float64 MJX, used for steps that float32 does not reproduce::

    JAX_ENABLE_X64=1 python tests/envs/parity.py --out errors.npz <episode.npz> ...

Episodes are replayed the way :class:`~mtdistill_jax.envs.multitask.MultiTaskEnv` steps tasks: through
:class:`~mtdistill_jax.envs.structure.Structure`, one program for all the episodes of the tasks that share a
physics structure (:func:`replay_all`), each task's rows with its own model fields, reward and observation.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from mtdistill_jax import envs
from mtdistill_jax.envs.structure import Structure, group_by_structure

MODEL_FIELDS = ("geom_pos", "geom_size", "site_pos", "site_size", "body_pos", "body_quat")
FIELDS = ("qpos", "qvel", "obs", "reward")

# The criterion, elementwise: |ours - official| <= atol + rtol * |official| for every field of a step.
# - atol: what MJX must hold on quantities of order one after one agent step (2 control steps, up to 2 x 10
#   physics substeps) from the exact recorded state; qvel gets 10x qpos since a velocity error is a position
#   error divided by the control step's share of dt.
# - rtol 1e-4: positions, velocities and observations reach tens (walker velocities ~30); float32 holds 7
#   digits and MJX's float32 contact solve converges to ~1e-4 relative, so an absolute bound alone would flag
#   large components for round-off.
# - obs: entries of the 'velocity' key (qvel or velocity sensors) get the qvel bounds, all others the obs bounds.
# - reward: per step, absolute (rewards are in [0, 2], the sum of two control-step rewards in [0, 1]).
# A step that misses this in float32 is re-run in float64 MJX, which must meet the same bounds (see
# check_episode): float32 round-off, amplified by a contact that switches on a substep earlier or later,
# passes there; a modelling difference does not.
TOLERANCE = {"qpos": (1e-3, 1e-4), "qvel": (1e-2, 1e-4), "obs": (1e-3, 1e-4), "reward": (1e-3, 0.0)}


@functools.cache
def get_env(task: str):
    return envs.make(task)


def task_of(path) -> str:
    return Path(path).name.rsplit("_seed", 1)[0]


def load_episode(path) -> dict:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def episode_info(env, ep: dict) -> dict:
    """The task's per-episode ``info`` of a recorded episode, in the task's whole ``info`` layout (entries the
    task does not randomise, e.g. finger-spin's target, which tasks sharing its physics carry, are zeros)."""
    fields = {f: ep[f"model_{f}"] for f in MODEL_FIELDS if f"model_{f}" in ep}
    layout = jax.tree_util.tree_map(lambda v: np.zeros(v.shape, v.dtype),
                                    {k: v for k, v in env.reset_shape.info.items() if k != "step"})
    return {**layout, **env.info_from_model_fields(fields)}


def obs_key_slices(ep) -> dict[str, slice]:
    out, start = {}, 0
    for k, n in zip(ep["obs_keys"], ep["obs_key_sizes"], strict=True):
        out[str(k)] = slice(start, start + int(n))
        start += int(n)
    return out


def _rows(ep: dict, nu: int) -> dict:
    """An episode's T + 1 recorded states as rows of the replay program, each with the action taken from it
    (the last state's is zeros: its step is computed and dropped)."""
    n = ep["qpos"].shape[0]
    return {"qpos": ep["qpos"], "qvel": ep["qvel"], "act": ep["act"] if ep["act"].size else np.zeros((n, 0)),
            "time": ep["time"], "ctrl": ep["ctrl"] if ep["ctrl"].shape[-1] == nu else np.zeros((n, nu)),
            "qacc_warmstart": ep["qacc_warmstart"],
            "action": np.concatenate([ep["action"], np.zeros((1, nu), ep["action"].dtype)])}


# The replay programs run long (every recorded state, contact solves vmapped over hundreds of rows): LLVM at XLA's
# default level for them, whatever the process's XLA_FLAGS say (tests/conftest.py sets -O0 for the suite, which
# compiles far more than it runs). Measured on a 2-core Xeon, hopper's 3 tasks x 2 episodes as one program:
# 247 s at -O0 (compile 25 s, the rest running it) against 51 s with this option (compile 37 s).
REPLAY_COMPILER_OPTIONS = {"xla_backend_optimization_level": 3}


@functools.cache
def _structure_fn(tasks: tuple[str, ...], copies: int):
    """The replay program of tasks sharing one physics structure, ``copies`` rows each: the observation at
    every row's state, and one step from it."""
    structure = Structure([get_env(t) for t in tasks], copies)

    def fn(rows, info):
        s = structure.state_from_physics(rows["qpos"], rows["qvel"], rows["act"], rows["time"], rows["ctrl"],
                                         rows["qacc_warmstart"], info)
        n = structure.step(s, rows["action"])
        return s.obs, n.obs, n.reward, n.data.qpos, n.data.qvel

    return jax.jit(fn, compiler_options=REPLAY_COMPILER_OPTIONS)


def replay_group(items: list[tuple[str, dict]]) -> list[dict]:
    """:func:`replay` of several ``(task, episode)`` whose tasks share one physics structure, as one program.

    Rows are task-major (``envs.structure``); a task with fewer rows than the most repeats its last one.
    """
    tasks = list(dict.fromkeys(t for t, _ in items))
    env0 = get_env(tasks[0])
    per_task = {t: [] for t in tasks}
    for i, (t, _) in enumerate(items):
        per_task[t].append(i)
    rows = [_rows(ep, env0.action_size) for _, ep in items]
    infos = [episode_info(get_env(t), ep) for t, ep in items]
    counts = {t: sum(len(rows[i]["qpos"]) for i in idx) for t, idx in per_task.items()}
    copies = max(counts.values())
    blocks, spans = [], {}
    for k, t in enumerate(tasks):
        start = k * copies
        for i in per_task[t]:
            n = len(rows[i]["qpos"])
            info = jax.tree_util.tree_map(lambda x, n=n: np.broadcast_to(np.asarray(x), (n, *np.shape(x))),
                                          infos[i])
            blocks.append({**rows[i], "info": info})
            spans[i] = (start, n)
            start += n
        pad = copies - counts[t]
        if pad:
            blocks.append(jax.tree_util.tree_map(lambda x, pad=pad: np.repeat(x[-1:], pad, axis=0), blocks[-1]))
    cat = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *blocks)
    info = cat.pop("info")
    obs, s_obs, s_rew, s_qpos, s_qvel = (np.asarray(x) for x in _structure_fn(tuple(tasks), copies)(cat, info))
    out = []
    for i, (t, _) in enumerate(items):
        a, n = spans[i]
        dim, steps = get_env(t).observation_size, slice(a, a + n - 1)
        out.append({"obs": obs[a:a + n, :dim], "step_obs": s_obs[steps, :dim], "step_reward": s_rew[steps],
                    "step_qpos": s_qpos[steps], "step_qvel": s_qvel[steps]})
    return out


def replay_all(items: list[tuple[str, dict]]) -> list[dict]:
    """:func:`replay` of every ``(task, episode)``: one program per physics structure among their tasks."""
    tasks = list(dict.fromkeys(t for t, _ in items))
    out: list = [None] * len(items)
    for group in group_by_structure([get_env(t) for t in tasks]):
        names = {tasks[g] for g in group}
        idx = [i for i, (t, _) in enumerate(items) if t in names]
        for i, o in zip(idx, replay_group([items[i] for i in idx]), strict=True):
            out[i] = o
    return out


def replay(task: str, ep: dict) -> dict:
    """Observations at every recorded state (``obs``, [T + 1, obs_dim]), and one step from every recorded
    state with its action (``step_obs``, ``step_reward``, ``step_qpos``, ``step_qvel``, [T, ...])."""
    return replay_group([(task, ep)])[0]


def step_errors(ep: dict, out: dict) -> dict[str, np.ndarray]:
    """Absolute error of each field of each step, ``[T, dim]`` (reward ``[T, 1]``)."""
    return {f: np.abs(np.reshape(out[f"step_{f}"], (len(ep["action"]), -1)).astype(np.float64)
                      - np.reshape(_official(ep, f), (len(ep["action"]), -1)))
            for f in FIELDS}


def _official(ep: dict, field: str) -> np.ndarray:
    return ep["reward"].astype(np.float64) if field == "reward" else ep[field][1:].astype(np.float64)


VELOCITY_KEYS = ("velocity",)  # observation keys holding velocities (the MT30 tasks' only such key)


def _bounds(ep: dict, field: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry (atol, rtol) of a field: observation entries of velocity keys get the qvel bounds."""
    atol, rtol = (np.full(dim, v) for v in TOLERANCE[field])
    if field == "obs":
        for key, sl in obs_key_slices(ep).items():
            if key in VELOCITY_KEYS:
                atol[sl], rtol[sl] = TOLERANCE["qvel"]
    return atol, rtol


def step_ratios(ep: dict, out: dict) -> dict[str, np.ndarray]:
    """Error / allowed error of each field, worst over its entries, per step ``[T]``: a step passes at <= 1."""
    errs = step_errors(ep, out)
    ratios = {}
    for f, err in errs.items():
        atol, rtol = _bounds(ep, f, err.shape[-1])
        ref = np.abs(np.reshape(_official(ep, f), err.shape))
        ratios[f] = (err / (atol + rtol * ref)).max(axis=-1) if err.shape[-1] else np.zeros(len(err))
    return ratios


def failing_steps(ep: dict, out: dict) -> np.ndarray:
    """Indices of the steps outside :data:`TOLERANCE`."""
    return np.flatnonzero(np.max(np.stack(list(step_ratios(ep, out).values())), axis=0) > 1.0)


def replay_x64(paths, timeout: float = 1800) -> dict[str, dict]:
    """Replay episodes in float64 MJX (a subprocess with ``JAX_ENABLE_X64=1``): ``{path: replay outputs}``."""
    import tempfile

    paths = [str(p) for p in paths]
    if not paths:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "x64.npz")
        env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", out_file, *paths], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"float64 replay failed:\n{proc.stderr[-4000:]}")
        with np.load(out_file) as d:
            index = json.loads(str(d["index"]))
            return {p: {k: d[f"{i}/{k}"] for k in index["keys"]} for i, p in enumerate(index["paths"])}


def check_episode(path, out: dict | None = None, x64: dict | None = None) -> dict:
    """The parity verdict of one episode: float32 first, float64 for the steps float32 misses.

    Returns ``{"float32": {field: worst ratio}, "float32_abs": {field: worst abs error}, "rechecked": steps,
    "float64": {field: worst ratio on those steps}, "float64_abs": ..., "failed": [(step, field, ratio)]}``.
    ``x64`` may hold an earlier :func:`replay_x64` result for this path (it is computed when needed and missing).
    """
    ep = load_episode(path)
    out = replay(task_of(path), ep) if out is None else out
    r32, e32 = step_ratios(ep, out), step_errors(ep, out)
    bad = failing_steps(ep, out)
    report = {"float32": {f: float(r.max()) for f, r in r32.items()},
              "float32_abs": {f: float(e.max()) if e.size else 0.0 for f, e in e32.items()},
              "rechecked": bad.tolist(), "float64": {}, "float64_abs": {}, "failed": []}
    if bad.size:
        x64 = x64 if x64 is not None else replay_x64([path])[str(path)]
        r64, e64 = step_ratios(ep, x64), step_errors(ep, x64)
        report["float64"] = {f: float(r[bad].max()) for f, r in r64.items()}
        report["float64_abs"] = {f: float(e[bad].max()) if e.size else 0.0 for f, e in e64.items()}
        report["failed"] = [(int(t), f, float(r64[f][t])) for t in bad for f in FIELDS if r64[f][t] > 1.0]
    return report


def _main(argv):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help=".npz to write the replay outputs to")
    p.add_argument("paths", nargs="+")
    a = p.parse_args(argv)
    arrays, keys = {}, None
    outs = replay_all([(task_of(path), load_episode(path)) for path in a.paths])
    for i, out in enumerate(outs):
        keys = sorted(out)
        arrays.update({f"{i}/{k}": v for k, v in out.items()})
    arrays["index"] = np.asarray(json.dumps({"paths": a.paths, "keys": keys, "x64": jax.config.jax_enable_x64}))
    np.savez(a.out, **arrays)


if __name__ == "__main__":
    _main(sys.argv[1:])
