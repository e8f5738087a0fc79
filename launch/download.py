"""Download artifacts by name: ``python launch/download.py --help`` (same as ``mtdistill-download``).

The program lives in :mod:`mtdistill_jax.launch.download` (its docstring has the usage).
"""

from mtdistill_jax.launch import download as _program
from mtdistill_jax.launch.download import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
