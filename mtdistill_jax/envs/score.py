"""Normalized scores as TD-MPC2 reports them for DMControl: episode return / 10, averaged over tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DMC_RETURN_SCALE = 10.0  # returns are <= 1000 (500 agent steps x 2 control steps x reward <= 1)


def normalized_return(episode_return: float | np.ndarray) -> float | np.ndarray:
    """A DMControl episode return on a 0-100 scale."""
    return np.asarray(episode_return, np.float64) / DMC_RETURN_SCALE


def normalized_score(returns_by_task: Mapping[str, Sequence[float]]) -> float:
    """Mean over tasks of the mean normalized episode return (MT30 'normalized score')."""
    if not returns_by_task:
        raise ValueError("no tasks given")
    per_task = []
    for task, rets in returns_by_task.items():
        rets = np.asarray(rets, np.float64)
        if rets.size == 0:
            raise ValueError(f"task {task!r} has no episode returns")
        if task.startswith("mw-"):
            raise ValueError(f"{task!r}: Meta-World tasks are scored by success rate, not return / 10")
        per_task.append(float(np.mean(normalized_return(rets))))
    return float(np.mean(per_task))
