"""The result of an evaluation: per-task episode returns, normalized scores, JSON round trip, pooling of runs."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from mtdistill_jax.configs.tasks import DMC_EPISODE_LENGTH
from mtdistill_jax.envs.score import normalized_return
from mtdistill_jax.errors import UserError


@dataclasses.dataclass
class EvalResult:
    tasks: list[str]
    returns: np.ndarray  # [K, E] episode returns
    mode: str
    seconds: float  # wall time of the rollouts (compile excluded)
    compile_seconds: float
    plan_calls: int  # planner calls (one per env per step)
    trajectories: dict | None = None  # task -> {qpos, qvel, act, info} of its first episode (record=True)
    seeds: tuple[int, ...] = ()  # PRNG seeds of the runs whose episodes these are (several after merge_results)
    episode_length: int = DMC_EPISODE_LENGTH  # agent steps per episode (a JSON without it: MT30's)

    @property
    def episodes_per_task(self) -> int:
        return int(self.returns.shape[1])

    @property
    def normalized(self) -> np.ndarray:  # [K]
        return normalized_return(self.returns.mean(axis=1))

    @property
    def normalized_score(self) -> float:
        return float(np.mean(self.normalized))

    def to_dict(self) -> dict:
        return {"normalized_score": self.normalized_score, "episodes_per_task": self.episodes_per_task,
                "mode": self.mode, "seeds": [int(s) for s in self.seeds], "episode_length": self.episode_length,
                "seconds": self.seconds, "compile_seconds": self.compile_seconds, "plan_calls": self.plan_calls,
                "tasks": [{"name": t, "returns": [float(x) for x in r], "mean": float(r.mean()),
                           "std": float(r.std()), "normalized": float(n)}
                          for t, r, n in zip(self.tasks, self.returns, self.normalized, strict=True)]}

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        """The inverse of :meth:`to_dict` (trajectories are not stored)."""
        try:
            tasks = [t["name"] for t in d["tasks"]]
            returns = np.asarray([t["returns"] for t in d["tasks"]], np.float64)
            if returns.ndim != 2 or returns.shape[1] < 1:
                raise ValueError(f"per-task returns must be equal-length, non-empty lists, got shape {returns.shape}")
            return cls(tasks=tasks, returns=returns, mode=d["mode"], seconds=float(d.get("seconds", 0.0)),
                       compile_seconds=float(d.get("compile_seconds", 0.0)),
                       plan_calls=int(d.get("plan_calls", 0)), seeds=tuple(int(s) for s in d.get("seeds", ())),
                       episode_length=int(d.get("episode_length", DMC_EPISODE_LENGTH)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not an evaluation result (see EvalResult.to_dict): {e!r}") from e

    def save(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dict` as JSON at ``path`` (atomically: a crash leaves the old file or none); returns
        the path. :meth:`load` reads it back."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        """Read a result ``.json`` written by :func:`~mtdistill_jax.evaluate.outputs.write_outputs`; errors name
        the file."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            d = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise UserError(f"{path}: not a JSON file ({e})") from None
        try:
            return cls.from_dict(d)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None

    def table(self) -> str:
        rows = [f"| task | return (mean ± std over {self.episodes_per_task}) | normalized |", "|---|---|---|"]
        for t, r, n in zip(self.tasks, self.returns, self.normalized, strict=True):
            rows.append(f"| {t} | {r.mean():.1f} ± {r.std():.1f} | {n:.2f} |")
        rows.append(f"| **MT30 normalized score** ({len(self.tasks)} tasks) | | **{self.normalized_score:.2f}** |")
        return "\n".join(rows)


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """Pool the episodes of several runs of the same evaluation made with different seeds.

    Lets the episodes of one evaluation be spread over several processes or machines (e.g. one 1-episode
    all-MT30 run per CPU core, or per seed on a machine too small for the batched program): the result is
    what one run with all their episodes per task reports. Runs must share tasks (same order), planner mode
    and episode length, and record distinct seeds (a repeated seed repeats the same episodes).
    """
    results = list(results)
    if not results:
        raise UserError("nothing to merge")
    first = results[0]
    seeds: list[int] = []
    for i, r in enumerate(results):
        if r.tasks != first.tasks:
            raise UserError(f"run {i} has tasks {r.tasks}, run 0 has {first.tasks}")
        if r.mode != first.mode or r.episode_length != first.episode_length:
            raise UserError(f"run {i} used mode {r.mode!r} / episode length {r.episode_length}, run 0 "
                             f"{first.mode!r} / {first.episode_length}")
        if not r.seeds:
            raise UserError(f"run {i} records no seed, so its episodes cannot be told apart from the others'")
        repeated = sorted(set(seeds) & set(r.seeds))
        if repeated:
            raise UserError(f"seed(s) {repeated} appear in more than one run: their episodes would be counted twice")
        seeds += list(r.seeds)
    return EvalResult(tasks=list(first.tasks), returns=np.concatenate([r.returns for r in results], axis=1),
                      mode=first.mode, seconds=sum(r.seconds for r in results),
                      compile_seconds=sum(r.compile_seconds for r in results),
                      plan_calls=sum(r.plan_calls for r in results), seeds=tuple(seeds),
                      episode_length=first.episode_length)


def compare_results(a: EvalResult, b: EvalResult) -> dict:
    """Paired comparison of two evaluations from the same initial states: the same tasks (in order), seeds,
    episodes per task and episode length, so episode ``e`` of task ``k`` starts from the same state in both (two
    agents, two compute dtypes, two planner settings). Differences are ``a - b`` in normalized points (return /
    10 for DMControl).

    Returns ``{"tasks": [{name, a, b, diff, identical}], "score_a", "score_b", "mean_diff", "se_diff", "p",
    "episodes", "identical", "a_higher", "b_higher"}``: per task its mean normalized returns and their
    difference (``identical``: episodes with equal returns); overall the mean and standard error over episodes of
    the per-episode difference, the two-sided p value of the paired t-test over episodes (1.0 when every episode
    is identical, nan with one episode), and how many episodes each side scored higher. ``mean_diff`` is
    ``score_a - score_b`` when every task has the same number of episodes, which they have."""
    for what, x, y in (("tasks", a.tasks, b.tasks), ("seeds", list(a.seeds), list(b.seeds)),
                       ("episodes per task", a.episodes_per_task, b.episodes_per_task),
                       ("episode length", a.episode_length, b.episode_length)):
        if x != y:
            raise UserError(f"a paired comparison needs the same initial states: the results differ in {what} "
                            f"({x} against {y})")
    if not a.seeds:
        raise UserError("a paired comparison needs the same initial states: neither result records its seed(s)")
    x, y = normalized_return(a.returns), normalized_return(b.returns)  # [K, E]
    d = (x - y).ravel()
    if np.all(d == 0):
        p = 1.0
    elif d.size < 2:
        p = float("nan")
    else:
        from scipy import stats  # a dependency of jax

        p = float(stats.ttest_rel(x.ravel(), y.ravel()).pvalue)
    return {"tasks": [{"name": t, "a": float(x[k].mean()), "b": float(y[k].mean()),
                       "diff": float(x[k].mean() - y[k].mean()), "identical": int((x[k] == y[k]).sum())}
                      for k, t in enumerate(a.tasks)],
            "score_a": float(x.mean()), "score_b": float(y.mean()), "mean_diff": float(d.mean()),
            "se_diff": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan"),
            "p": p, "episodes": int(d.size), "identical": int((d == 0).sum()),
            "a_higher": int((d > 0).sum()), "b_higher": int((d < 0).sum())}


def comparison_table(comparison: dict, a_name: str = "a", b_name: str = "b") -> str:
    """:func:`compare_results` as a Markdown table: per task the two mean normalized returns and their
    difference, then the MT30 scores and the paired statistics over episodes."""
    c = comparison
    rows = [f"| task | {a_name} | {b_name} | {a_name} − {b_name} | identical episodes |", "|---|---|---|---|---|"]
    n = c["episodes"] // max(len(c["tasks"]), 1)
    for t in c["tasks"]:
        rows.append(f"| {t['name']} | {t['a']:.2f} | {t['b']:.2f} | {t['diff']:+.2f} | {t['identical']} / {n} |")
    rows.append(f"| **normalized score** ({len(c['tasks'])} tasks) | **{c['score_a']:.2f}** | **{c['score_b']:.2f}** "
                f"| **{c['mean_diff']:+.2f}** | {c['identical']} / {c['episodes']} |")
    rows.append("")
    rows.append(f"Paired over {c['episodes']} episodes (same initial states): {a_name} − {b_name} = "
                f"{c['mean_diff']:+.2f} ± {c['se_diff']:.2f} normalized points (mean ± SE), paired t-test p = "
                f"{c['p']:.3g}; {a_name} higher in {c['a_higher']}, {b_name} higher in {c['b_higher']}, equal in "
                f"{c['identical']}.")
    return "\n".join(rows)
