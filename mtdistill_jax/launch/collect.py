"""Collect episodes with an agent in the MJX MT30 tasks, written as a native dataset.

``mtdistill-collect`` (console entry point) and ``python launch/collect.py`` run this module.

  mtdistill-collect --agent=../shared/reference/paper_student_fp16.pt --tasks=walker-walk,cheetah-run \
      --episodes=10 --out=data/student_mt30 [--policy=planner|prior] [--mode=sample] [--noise=0.0] \
      [--episode_length=500] [--seed=0] [--round_episodes=N]

The agent (an agent export or an official ``.pt``) acts in K tasks x ``--round_episodes`` episodes side by side,
in one compiled program (the evaluator's); each round is written to ``--out`` before the next starts, so a crash
loses at most the round in flight. ``--policy=planner`` acts as the evaluator does (MPPI); ``--policy=prior``
acts with the policy prior alone (one network forward per step). The same seed gives the same episodes; a second
run with another ``--seed`` appends to the dataset. Returns per task are printed at the end, with the dataset's
size and the collection cost (seconds per 1,000 transitions). A bad flag, a missing or corrupt agent file or an
unknown task stops it before anything is compiled with one ``error: ...`` line (exit 2: command line, 1: inputs).
"""

from __future__ import annotations

import logging

import jax
from absl import flags

from mtdistill_jax import cli
from mtdistill_jax.evaluate.program import POLICIES
from mtdistill_jax.launch.rollout import rollout_setup
from mtdistill_jax.tdmpc2.planner import MODES
from mtdistill_jax.xla_cpu import use_fewer_kernels

flags.DEFINE_string("agent", None, "agent export directory or official .pt", required=True)
flags.DEFINE_string("out", None, "native dataset directory (created, or appended to)", required=True)
flags.DEFINE_list("tasks", None, "tasks (default: all tasks of the agent's task set that have an MJX environment)")
flags.DEFINE_integer("episodes", 10, "episodes per task", lower_bound=1)
flags.DEFINE_enum("policy", "planner", list(POLICIES), "planner (MPPI, as the evaluator) or prior (policy prior)")
flags.DEFINE_enum("mode", "sample", list(MODES), "action: sample (official act), elite / mean (planner), mean (prior)")
flags.DEFINE_float("noise", 0.0, "std of Gaussian noise added to each used action dimension (then clipped)",
                   lower_bound=0.0)
flags.DEFINE_integer("episode_length", None, "agent steps per episode (default: the task set's, MT30 500)",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "PRNG seed (round r uses fold_in(seed, r))")
flags.DEFINE_integer("round_episodes", None, "episodes per task in flight at once (default: all)", lower_bound=1)
flags.DEFINE_integer("chunk", 10, "agent steps per compiled call; divides the episode length", lower_bound=1)
flags.DEFINE_bool("progress", True, "progress bar with ETA on stderr")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    cli.check_output_dir(FLAGS.out, "out")
    use_fewer_kernels()  # before the first jax.devices(): keeps an all-MT30 program under vm.max_map_count
    agent, config, tasks, length = rollout_setup(FLAGS.agent, FLAGS.tasks, FLAGS.episodes, FLAGS.mode, FLAGS.chunk,
                                                 FLAGS.episode_length, FLAGS.policy)
    from mtdistill_jax.data.native import open_dataset
    from mtdistill_jax.evaluate.collect import collect

    print(f"devices: {jax.devices()}")
    print(f"agent: {FLAGS.agent} ({agent.config.task_set} {agent.config.model_size}M, stored {agent.dtype}); "
          f"{len(tasks)} tasks x {FLAGS.episodes} episodes of {length} steps, {FLAGS.policy}/{FLAGS.mode}, "
          f"noise {FLAGS.noise}, seed {FLAGS.seed}")
    result = collect(agent.params, config, FLAGS.out, tasks, FLAGS.episodes, policy=FLAGS.policy, mode=FLAGS.mode,
                     noise=FLAGS.noise, episode_length=length, seed=FLAGS.seed, round_episodes=FLAGS.round_episodes,
                     chunk=FLAGS.chunk, source=FLAGS.agent, progress=FLAGS.progress)
    print(result.table())
    n = len(tasks) * FLAGS.episodes * length
    data = open_dataset(FLAGS.out)
    print(f"collected {n:,} transitions in {result.seconds:.1f} s ({1000 * result.seconds / n:.2f} s per 1,000; "
          f"compile {result.compile_seconds:.1f} s); {FLAGS.out} now holds {data.num_episodes} episodes, "
          f"{data.nbytes / 2**20:.1f} MiB")


def entry_point() -> None:
    """Console entry point ``mtdistill-collect`` (and ``python launch/collect.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
