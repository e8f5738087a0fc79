"""Evaluate an agent export or an official TD-MPC2 .pt on MT30 tasks (all tasks and episodes batched).

  python launch/evaluate.py --agent=../shared/reference/paper_student_fp16.pt --workdir=runs/eval_student \
      [--tasks=walker-walk,cheetah-run] [--episodes=10] [--mode=sample] [--name=eval] [--video]

Writes <workdir>/<name>.{json,csv,md,png} (per-task returns, normalized scores, bar chart); --video adds
<workdir>/videos/<task>.mp4 of each task's first episode.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtdistill_jax.xla_cpu import use_fewer_kernels  # noqa: E402

use_fewer_kernels()  # before JAX starts: an all-MT30 program otherwise passes vm.max_map_count on CPU

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from mtdistill_jax.checkpoint.export import load_agent  # noqa: E402
from mtdistill_jax.configs.train import get_config  # noqa: E402
from mtdistill_jax.evaluate import evaluate, save_videos, write_outputs  # noqa: E402
from mtdistill_jax.tdmpc2.planner import MODES  # noqa: E402

flags.DEFINE_string("agent", None, "agent export directory or official .pt", required=True)
flags.DEFINE_string("workdir", None, "output directory", required=True)
flags.DEFINE_list("tasks", None, "task subset (default: all tasks of the agent's task set)")
flags.DEFINE_integer("episodes", 10, "episodes per task")
flags.DEFINE_integer("seed", 1, "PRNG seed")
flags.DEFINE_enum("mode", "sample", list(MODES), "planner action: sample (official evaluate.py), elite, mean")
flags.DEFINE_integer("chunk", 10, "agent steps per compiled call (progress granularity)")
flags.DEFINE_string("name", "eval", "output file stem")
flags.DEFINE_bool("progress", True, "progress bar with ETA on stderr")
flags.DEFINE_bool("video", False, "record each task's first episode and write an mp4 per task")
flags.DEFINE_integer("episode_length", 500, "agent steps per episode (500 = official; less only for quick looks)")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    print(f"devices: {jax.devices()}")
    agent = load_agent(FLAGS.agent)
    config = get_config(agent.config.model_size, agent.config.task_set)
    with config.unlocked():
        config.model = agent.config
    print(f"agent: {FLAGS.agent} ({agent.config.task_set} {agent.config.model_size}M, stored {agent.dtype})")
    result = evaluate(agent.params, config, FLAGS.tasks, FLAGS.episodes, FLAGS.seed, FLAGS.mode, FLAGS.chunk,
                      FLAGS.progress, episode_length=FLAGS.episode_length, record=FLAGS.video)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    paths = write_outputs(result, FLAGS.workdir, FLAGS.name, command)
    print(result.table())
    print(f"compile {result.compile_seconds:.1f} s, rollouts {result.seconds:.1f} s "
          f"({result.plan_calls / result.seconds:.1f} planner calls/s)")
    if FLAGS.video:
        paths.update(save_videos(result, os.path.join(FLAGS.workdir, "videos")))
    print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
