"""Convert official TD-MPC2 dataset chunks into a native dataset directory (memory-mapped shards).

``mtdistill-import-dataset`` (console entry point) and ``python launch/import_dataset.py`` run this module:

  python launch/import_dataset.py --from='data/mt30/chunk_*.pt' --out=data/mt30_native [--shard_episodes=1000]
  python launch/import_dataset.py --verify=data/mt30_native          (sha256 of every shard against the manifest)

One chunk is read at a time (safe reader: nothing from the file is executed), validated (shapes, task ids,
zero padding, no NaN/inf where the sampler reads) and written as shards of ``--shard_episodes`` episodes; a
progress bar with ETA goes to stderr. Run the same command again after an interruption: chunks recorded as
done are skipped, the others imported; on a finished output it does nothing and says so. Train from the
output with ``mtdistill-train --data=DIR``.

A bad flag or a missing, corrupt or unfitting input stops it with one `error: ...` line on stderr (exit 2:
command line, 1: inputs); MTDISTILL_TRACEBACK=1 or --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import glob
import logging
import os

from absl import flags

from mtdistill_jax import cli
from mtdistill_jax.configs.tasks import TASK_SETS

flags.DEFINE_list("from", None, "official chunk files (globs allowed, quote them)")
flags.DEFINE_string("out", None, "output dataset directory (created, or continued if it holds a dataset)")
flags.DEFINE_integer("shard_episodes", 1000, "episodes per shard", lower_bound=1)
flags.DEFINE_enum("task_set", None, list(TASK_SETS), "task set of the chunks (default: from an existing --out, "
                  "else from the widths: 24/6 mt30, 39/6 mt80)", case_sensitive=False)
flags.DEFINE_string("verify", None, "check the sha256 of every shard of this dataset directory and exit")
flags.DEFINE_bool("progress", True, "progress bar with rate and ETA on stderr")
FLAGS = flags.FLAGS


def chunk_paths(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (globs expanded, sorted, each once); a usage error when one names nothing."""
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not found:
            raise FileNotFoundError(2, "No such file or directory", pattern)
        paths.extend(p for p in found if p not in paths)
    dirs = [p for p in paths if os.path.isdir(p)]
    if dirs:
        raise cli.UsageError(f"--from={dirs[0]} is a directory; give chunk files (e.g. --from='{dirs[0]}/chunk_*.pt')")
    return paths


def run() -> str:
    from mtdistill_jax.data.native import import_chunks, open_dataset

    if FLAGS.verify:
        if FLAGS["from"].value or FLAGS.out:
            raise cli.UsageError("--verify takes no --from/--out")
        ds = open_dataset(FLAGS.verify)
        ds.verify(progress=FLAGS.progress)
        return f"ok: {ds}"
    if not FLAGS["from"].value or not FLAGS.out:
        raise cli.UsageError("give --from=CHUNKS and --out=DIR (or --verify=DIR)")
    cli.check_output_dir(FLAGS.out, "out")
    paths = chunk_paths(FLAGS["from"].value)
    ds = import_chunks(paths, FLAGS.out, task_set=FLAGS.task_set and FLAGS.task_set.lower(),
                       shard_episodes=FLAGS.shard_episodes, progress=FLAGS.progress)
    return (f"{ds.path}: {ds.num_episodes} episodes ({ds.num_transitions} transitions) of {ds.task_set.name} in "
            f"{len(ds.shards)} shards, {ds.nbytes / 1e9:.2f} GB")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(run())


def entry_point() -> None:
    """Console entry point ``mtdistill-import-dataset`` (and ``python launch/import_dataset.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
