"""Batched evaluation of a TD-MPC2 agent on MT30 tasks (the official protocol, every task and episode in one
compiled program).

- :mod:`~mtdistill_jax.evaluate.program`: :func:`evaluate`, :func:`make_eval_program` (:func:`compile_eval_program`),
  :func:`check_eval_args`;
- :mod:`~mtdistill_jax.evaluate.result`: :class:`EvalResult` (returns, scores, JSON), :func:`merge_results` and
  :func:`compare_results` (paired, from the same initial states) with :func:`comparison_table`;
- :mod:`~mtdistill_jax.evaluate.outputs`: :func:`write_outputs` (JSON/CSV/Markdown/bar chart), :func:`save_videos`.
"""

from mtdistill_jax.evaluate.outputs import plot_bars, save_videos, write_outputs
from mtdistill_jax.evaluate.program import (
    EvalCarry,
    check_eval_args,
    compile_eval_program,
    episode_length_of,
    evaluate,
    make_eval_program,
)
from mtdistill_jax.evaluate.result import EvalResult, compare_results, comparison_table, merge_results

__all__ = ["EvalCarry", "EvalResult", "check_eval_args", "compare_results", "comparison_table", "compile_eval_program",
           "episode_length_of", "evaluate", "make_eval_program", "merge_results", "plot_bars",
           "save_videos", "write_outputs"]
