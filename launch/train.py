"""Offline TD-MPC2 training: ``python launch/train.py --help`` (same as ``mtdistill-train``).

The program lives in :mod:`mtdistill_jax.launch.train` (its docstring has the usage).
"""

from mtdistill_jax.launch import train as _program
from mtdistill_jax.launch.train import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
