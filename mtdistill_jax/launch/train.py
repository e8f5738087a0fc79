"""Offline TD-MPC2 training from official dataset chunks, checkpointed and resumable.

``mtdistill-train`` (console entry point) and ``python launch/train.py`` run this module.

  mtdistill-train --workdir=runs/mt30_1m --data=chunk_0.pt,chunk_1.pt \
      [--config=mtdistill_jax/configs/train.py] [--config.steps=100000] [--config.train.batch_size=256] \
      [--config.train.steps_per_dispatch=100]

Up to ``steps_per_dispatch`` updates run inside one compiled loop per dispatch; chunks end at every multiple of
it, of --config.log_every and of --save_every, so logs (means over the updates since the previous log) and
checkpoints keep their cadence. The dataset is an argument of that program (copied to the device once).

Run the same command again (same --workdir) to resume from the latest checkpoint, e.g. after a crash or a
preemption (SIGTERM saves a checkpoint at the current step before exiting). A bad flag or config override, a
missing or corrupt data file or a checkpoint of another model stops it before training with one `error: ...`
line on stderr (exit 2: command line, 1: inputs); MTDISTILL_TRACEBACK=1 or --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import errno
import glob
import logging
import os

import jax
from absl import flags
from absl import logging as absl_logging

from mtdistill_jax import cli, configs
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.data.tdmpc2_format import load_chunks
from mtdistill_jax.tdmpc2.offline import train_offline

_CONFIG = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "train.py")
cli.define_config_file("config", _CONFIG, "training config (get_config())", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints and config", required=True)
flags.DEFINE_list("data", None, "official dataset chunk files (globs allowed)", required=True)
flags.DEFINE_integer("save_every", 10_000, "steps between checkpoints", lower_bound=1)
flags.DEFINE_integer("keep", 3, "checkpoints kept on disk", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(max(absl_logging.get_verbosity(), absl_logging.INFO))
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO through absl
    try:
        check_config(FLAGS.config)
    except cli.UserError as e:
        raise cli.UsageError(f"--config: {e}") from e
    cli.check_output_dir(FLAGS.workdir, "workdir")
    paths = sorted(p for pattern in FLAGS.data for p in (glob.glob(pattern) or [pattern]))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), ", ".join(missing))
    episodes = load_chunks(paths)
    logging.info("devices: %s", jax.devices())
    logging.info("%d episodes of %d frames from %d file(s)", episodes.num_episodes, episodes.num_frames, len(paths))
    result = train_offline(FLAGS.config, episodes, FLAGS.workdir, save_every=FLAGS.save_every, keep=FLAGS.keep)
    logging.info("%s at step %d (%s)", "preempted" if result.preempted else "done", result.step,
                 f"resumed from {result.resumed_from}" if result.resumed_from is not None else "fresh run")


def entry_point() -> None:
    """Console entry point ``mtdistill-train`` (and ``python launch/train.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
