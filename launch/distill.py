"""Distillation of a frozen teacher into a student: ``python launch/distill.py --help`` (same as
``mtdistill-distill``).

The program lives in :mod:`mtdistill_jax.launch.distill` (its docstring has the usage).
"""

from mtdistill_jax.launch import distill as _program
from mtdistill_jax.launch.distill import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
