"""Data collection in MJX: ``python launch/collect.py --help`` (same as ``mtdistill-collect``).

The program lives in :mod:`mtdistill_jax.launch.collect` (its docstring has the usage).
"""

from mtdistill_jax.launch import collect as _program
from mtdistill_jax.launch.collect import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
