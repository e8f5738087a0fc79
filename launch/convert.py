"""Convert / inspect agents: ``python launch/convert.py --help`` (same as ``mtdistill-convert``).

The program lives in :mod:`mtdistill_jax.launch.convert` (its docstring has the usage).
"""

from mtdistill_jax.launch import convert as _program
from mtdistill_jax.launch.convert import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
