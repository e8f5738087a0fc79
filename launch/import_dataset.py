"""Import official dataset chunks into a native dataset: ``python launch/import_dataset.py --help`` (same as
``mtdistill-import-dataset``).

The program lives in :mod:`mtdistill_jax.launch.import_dataset` (its docstring has the usage).
"""

from mtdistill_jax.launch import import_dataset as _program
from mtdistill_jax.launch.import_dataset import entry_point

__doc__ = _program.__doc__  # absl prints the __main__ docstring for --help

if __name__ == "__main__":
    entry_point()
