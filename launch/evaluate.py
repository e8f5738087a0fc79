"""Evaluate an agent on MT30 tasks: ``python launch/evaluate.py --help`` (same as ``mtdistill-evaluate``).

The program lives in :mod:`mtdistill_jax.launch.evaluate` (its docstring has the usage).
"""

from mtdistill_jax.launch import evaluate as _program
from mtdistill_jax.launch.evaluate import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
