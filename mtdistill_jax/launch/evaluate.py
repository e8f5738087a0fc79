"""Evaluate an agent export or an official TD-MPC2 .pt on MT30 tasks (all tasks and episodes batched).

``mtdistill-evaluate`` (console entry point) and ``python launch/evaluate.py`` run this module.

  mtdistill-evaluate --agent=../shared/reference/paper_student_fp16.pt --workdir=runs/eval_student \
      [--tasks=walker-walk,cheetah-run] [--episodes=10] [--policy=planner|prior] [--mode=sample] [--name=eval] \
      [--video]

Writes <workdir>/<name>.{json,csv,md,png} (per-task returns, normalized scores, bar chart); --video adds
<workdir>/videos/<task>.mp4 of each task's first episode.

Episodes can be spread over processes or machines with different --seed values and pooled afterwards:

  python launch/evaluate.py --merge=runs/a/seed1.json,runs/b/seed2.json --workdir=runs/eval --name=pooled

Two evaluations from the same initial states (same tasks, seeds and episodes: two agents, two --compute_dtype
settings) are compared episode by episode (per-task differences, paired t-test; <name>.{json,md}):

  python launch/evaluate.py --compare=runs/bf16/eval.json,runs/f32/eval.json --workdir=runs/cmp --name=bf16_vs_f32

A bad flag, a missing or corrupt file or an unknown task stops it before any compile with one `error: ...` line
on stderr (exit 2: command line, 1: inputs); MTDISTILL_TRACEBACK=1 or --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys

import jax
from absl import flags

from mtdistill_jax import cli
from mtdistill_jax.evaluate import (
    EvalResult,
    compare_results,
    comparison_table,
    evaluate,
    merge_results,
    save_videos,
    write_outputs,
)
from mtdistill_jax.evaluate.program import POLICIES
from mtdistill_jax.launch.common import eval_mode_of
from mtdistill_jax.launch.rollout import rollout_setup
from mtdistill_jax.tdmpc2.planner import MODES
from mtdistill_jax.xla_cpu import use_fewer_kernels

flags.DEFINE_string("agent", None, "agent export directory or official .pt")
flags.DEFINE_string("workdir", None, "output directory", required=True)
flags.DEFINE_list("merge", None, "instead of evaluating: pool the episodes of these result .json files (runs of "
                  "the same tasks with different seeds) into one result")
flags.DEFINE_list("compare", None, "instead of evaluating: compare two result .json files A,B from the same "
                  "initial states (same tasks, seeds, episodes) episode by episode; writes <name>.json and <name>.md "
                  "(per-task A - B in normalized points, paired t-test over episodes)")
flags.DEFINE_list("tasks", None, "task subset (default: all tasks of the agent's task set)")
flags.DEFINE_integer("episodes", 10, "episodes per task", lower_bound=1)
flags.DEFINE_integer("seed", 1, "PRNG seed")
flags.DEFINE_enum("policy", "planner", list(POLICIES), "act with the planner (MPPI, official evaluate.py) or the "
                  "policy prior alone (official mpc=False; one forward per step, far cheaper on CPU)")
flags.DEFINE_enum("mode", None, list(MODES), "action: planner sample (default, official evaluate.py) / elite / mean; "
                  "prior sample / mean (default, official eval_mode)")
flags.DEFINE_integer("chunk", 10, "agent steps per compiled call (progress granularity); divides --episode_length",
                     lower_bound=1)
flags.DEFINE_string("name", "eval", "output file stem")
flags.DEFINE_bool("progress", True, "progress bar with ETA on stderr")
flags.DEFINE_bool("video", False, "record each task's first episode and write an mp4 per task")
flags.DEFINE_bool("fewer_kernels", True, "XLA:CPU: add --xla_cpu_use_fusion_emitters=false to XLA_FLAGS (unless "
                  "XLA_FLAGS sets it), so an all-MT30 program stays under vm.max_map_count")
flags.DEFINE_bool("compile_side_by_side", True, "compile the reset and the step chunk at once, one thread each "
                  "(all 30 MT30 tasks on a 2-core CPU: 4.5-4.6 min, peak 5.6-5.7 GiB); --nocompile_side_by_side: "
                  "one after the other (6.0-6.1 min, 4.4-4.6 GiB)")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "the planner's model compute dtype "
                  "(config planner.compute_dtype): float32 as the official code, or bfloat16 matmuls with float32 "
                  "normalisation and MPPI statistics (1.7x faster planning on a CPU with bf16 units)")
flags.DEFINE_integer("episode_length", None, "agent steps per episode (default: the task set's, MT30 500 = "
                     "official; less only for quick looks)", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    command = ("python " * sys.argv[0].endswith(".py")) + " ".join(shlex.quote(a) for a in sys.argv)
    if sum(x is not None for x in (FLAGS.agent, FLAGS.merge, FLAGS.compare)) != 1:
        raise cli.UsageError("give exactly one of --agent (evaluate), --merge (pool earlier results) and --compare "
                             "(compare two results)")
    if FLAGS.compare is not None and len(FLAGS.compare) != 2:
        raise cli.UsageError(f"--compare takes two result .json files A,B, got {len(FLAGS.compare)}")
    cli.check_output_dir(FLAGS.workdir, "workdir")
    if FLAGS.compare:
        write_comparison(FLAGS.compare, FLAGS.workdir, FLAGS.name, command)
        return
    if FLAGS.merge:
        result = merge_results([EvalResult.load(path) for path in FLAGS.merge])
        paths = write_outputs(result, FLAGS.workdir, FLAGS.name, command)
        print(result.table())
        print(f"pooled {len(FLAGS.merge)} runs (seeds {', '.join(map(str, result.seeds))}); wrote "
              + ", ".join(paths.values()))
        return
    if FLAGS.episode_length is not None and FLAGS.episode_length % FLAGS.chunk:
        raise cli.UsageError(f"--chunk={FLAGS.chunk} must divide --episode_length={FLAGS.episode_length}")
    if FLAGS.fewer_kernels:
        use_fewer_kernels()  # before the first jax.devices(): XLA reads its flags when the backend starts
    mode = eval_mode_of(FLAGS.policy, FLAGS.mode)
    agent, config, tasks, episode_length = rollout_setup(
        FLAGS.agent, FLAGS.tasks, FLAGS.episodes, mode, FLAGS.chunk, FLAGS.episode_length, FLAGS.policy)
    config.planner.compute_dtype = FLAGS.compute_dtype
    print(f"devices: {jax.devices()}")
    print(f"agent: {FLAGS.agent} ({agent.config.task_set} {agent.config.model_size}M, stored {agent.dtype}, "
          f"planner computes in {FLAGS.compute_dtype})")
    result = evaluate(agent.params, config, tasks, FLAGS.episodes, FLAGS.seed, mode, FLAGS.chunk,
                      FLAGS.progress, episode_length=episode_length, record=FLAGS.video, policy=FLAGS.policy,
                      side_by_side=FLAGS.compile_side_by_side)
    paths = write_outputs(result, FLAGS.workdir, FLAGS.name, command)
    print(result.table())
    print(f"compile {result.compile_seconds:.1f} s, rollouts {result.seconds:.1f} s "
          f"({result.plan_calls / result.seconds:.1f} planner calls/s)")
    if FLAGS.video:
        paths.update(save_videos(result, os.path.join(FLAGS.workdir, "videos")))
    print("wrote " + ", ".join(paths.values()))


def write_comparison(paths: list[str], workdir: str, name: str, command: str) -> dict:
    """:func:`~mtdistill_jax.evaluate.compare_results` of two result files (columns named by their file stems)
    as ``<workdir>/<name>.json`` and ``<name>.md``; prints the table. Returns the comparison."""
    a, b = (EvalResult.load(p) for p in paths)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if names[0] == names[1]:
        names = list(paths)
    comparison = compare_results(a, b)
    table = comparison_table(comparison, *names)
    os.makedirs(workdir, exist_ok=True)
    out = {k: os.path.join(workdir, f"{name}.{k}") for k in ("json", "md")}
    with open(out["json"], "w") as f:
        json.dump({"a": paths[0], "b": paths[1], **comparison}, f, indent=1)
    seeds = ", ".join(map(str, a.seeds))
    with open(out["md"], "w") as f:
        f.write(f"Command: `{command}`\n\n{a.episodes_per_task} episode(s) per task of {a.episode_length} agent "
                f"steps, seed(s) {seeds}; A = `{paths[0]}` (mode `{a.mode}`), B = `{paths[1]}` (mode `{b.mode}`). "
                "Normalized points: return / 10.\n\n" + table + "\n")
    print(table)
    print("wrote " + ", ".join(out.values()))
    return comparison


def entry_point() -> None:
    """Console entry point ``mtdistill-evaluate`` (and ``python launch/evaluate.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
