"""TD-MPC2 training, offline from a dataset or online in MJX envs, checkpointed and resumable.

``mtdistill-train`` (console entry point) and ``python launch/train.py`` run this module. The config says
which job it is: the default (``configs/train.py``) trains offline on ``--data``; an online config
(``configs/online.py``) collects its own data:

  mtdistill-train --config=mtdistill_jax/configs/online.py --workdir=runs/cartpole \
      [--config.tasks=cartpole-balance] [--config.online.envs_per_task=1] [--config.model_size=1] \
      [--config.steps=100000] [--save_every=10000] [--eval_every=10000 [--eval_policy=prior]]

Online, one compiled program runs up to ``online.agent_steps_per_dispatch`` agent steps (plan -> env step ->
replay -> updates, the official online trainer's schedule) per dispatch; steps, logs, checkpoints and
evaluations count env steps (all envs together). Checkpoints hold the learner, the replay buffer, the env and
planner states and the key: a resumed run reaches the same state as an uninterrupted one. Metrics add
``train/episode_return``, ``perf/env_steps_per_second`` and ``perf/updates_per_second``.

Offline:

  mtdistill-train --workdir=runs/mt30_1m --data=chunk_0.pt,chunk_1.pt \
      [--config=mtdistill_jax/configs/train.py] [--config.steps=100000] [--config.train.batch_size=256] \
      [--config.train.steps_per_dispatch=100] [--save_every=10000] [--eval_every=50000 \
      [--eval_tasks=walker-walk,cup-catch] [--eval_episodes=2]] [--to_torch=runs/mt30_1m.pt]

Up to ``steps_per_dispatch`` updates run inside one compiled loop per dispatch; chunks end at every multiple of
it, of --config.log_every, of --save_every and of --eval_every, so logs (means over the updates since the
previous log), checkpoints and evaluations keep their cadence. The dataset is an argument of that program
(copied to the device once, after a check for NaN/inf).

Outputs in --workdir: orbax checkpoints (one directory per saved step), ``metrics.csv`` and ``tb/``
(TensorBoard) with every logged metric, ``config.json`` (the run config) and, when the run finished,
``agent/`` (an agent export of the final world model; --to_torch also writes an official-format .pt). A
progress bar with rate and ETA goes to stderr (--noprogress turns it off).

Run the same command again (same --workdir) to resume from the latest checkpoint, e.g. after a crash or a
preemption (SIGTERM saves a checkpoint at the current step before exiting). A loss that turns NaN/inf stops
the run before it saves that step and names the last good checkpoint. A bad flag or config override, a
missing or corrupt data file, NaN/inf in the data or a checkpoint of another model stops it before training
with one `error: ...` line on stderr (exit 2: command line, 1: inputs); MTDISTILL_TRACEBACK=1 or
--verbosity=1 adds the traceback.
"""

from __future__ import annotations

import os

from mtdistill_jax import cli, configs
from mtdistill_jax.errors import UserError
from mtdistill_jax.launch import common

_CONFIG = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "train.py")
cli.define_config_file("config", _CONFIG, "training config (get_config())", lock_config=True)
common.define_flags()
FLAGS = common.FLAGS


def main(argv):
    cli.start_main(argv)
    config = FLAGS.config
    if common.is_online(config):
        from mtdistill_jax.configs import online

        try:
            config = online.resolve(config)
        except UserError as e:
            raise cli.UsageError(f"--config: {e}") from e
        options = common.options_from_flags(config, check=online.check_config)
        common.run_online(config, options, program="mtdistill-train")
    else:
        options = common.options_from_flags(config)
        common.run(config, options, program="mtdistill-train")


def entry_point() -> None:
    """Console entry point ``mtdistill-train`` (and ``python launch/train.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
