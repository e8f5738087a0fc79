"""Benchmark: agent steps/s of the fused online loop (plan -> env step -> replay -> updates in one program),
next to its three parts timed apart (env step, planner act, one update).

For each task and N (envs, all of that task): the loop is built from the online config (model ``--model_size``,
batch ``--batch``, official planner, ``--utd`` updates per env step), run past its seed phase (one episode of
random actions), then ``--agent_steps`` agent steps are timed as one chunk (``--repeats`` chunks, median). The
parts are jitted apart on the same state: ``env.step`` of the N envs, the planner's ``act`` for N observations,
one update on a batch from the replay buffer; their sum per agent step is ``env + plan + utd x N x update``.
The fused program should not be slower than that sum.

Usage: ``python benchmarks/online.py [--tasks cartpole-balance,walker-walk] [--num_envs 1,16,64]
[--agent_steps 4] [--episode_length 50] [--compute_dtype float32|bfloat16] [--dot_options library|none]``.
``--episode_length`` shortens episodes (resets happen more often, the per-step work is the same) so the seed phase
before timing stays short. ``--compute_dtype``: the planner's (``planner.compute_dtype``; updates stay float32).
``--dot_options``: ``library`` (default) compiles the loop as ``OnlineLoop.train_chunk_jit`` does and the planner
and update parts with the same options (``OnlineLoop.compiler_options``, the planner's: YNNPACK's single-dot
path for a bf16 planner on CPU), ``none`` without them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import header, time_jitted  # noqa: E402
from mtdistill_jax.configs.online import get_config  # noqa: E402
from mtdistill_jax.tdmpc2.online import make_online_loop  # noqa: E402


def fused_times(loop, carry, agent_steps: int, repeats: int, library_options: bool = True):
    """(compile s, median s per chunk of ``agent_steps``, updates per chunk, carry after)."""
    chunk = loop.train_chunk_jit if library_options else jax.jit(loop.train_chunk, donate_argnums=0)
    t = time.perf_counter()
    compiled = chunk.lower(carry, np.int32(agent_steps)).compile()
    compile_s = time.perf_counter() - t
    carry, _ = compiled(carry, np.int32(loop.seed_agent_steps + 1))  # past the seed phase (and its updates)
    jax.block_until_ready(carry)
    carry, _ = compiled(carry, np.int32(agent_steps))  # warm-up
    jax.block_until_ready(carry)
    times, updates = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        carry, stats = compiled(carry, np.int32(agent_steps))
        jax.block_until_ready(carry)
        times.append(time.perf_counter() - t)
        updates.append(int(stats.num_updates))
    return compile_s, float(np.median(times)), float(np.median(updates)), carry


def part_times(loop, carry, repeats: int, options=None):
    """Median seconds of one env step (N envs), one planner act (N obs) and one update, each jitted alone; the
    planner and the update compiled with ``options`` (XLA compiler options: the loop's, which cover both)."""
    es = carry.env_state
    action = jax.random.uniform(jax.random.key(1), (loop.M, loop.env.action_pad), jnp.float32, -1, 1)
    action = action * loop.env.action_masks
    _, env_s, _, _ = time_jitted(jax.jit(loop.env.step), lambda i: (es, action), repeats)

    def plan_args(i):
        return carry.learner.params, es.obs, es.task, es.first, carry.policy_state, jax.random.key(i)

    _, plan_s, _, _ = time_jitted(jax.jit(loop.planner), plan_args, repeats, compiler_options=options)
    batch, _ = loop.replay.sample(carry.replay)
    learner = carry.learner
    _, update_s, _, _ = time_jitted(jax.jit(loop.update), lambda i: (learner, batch, jax.random.key(i)), repeats,
                                    compiler_options=options)
    return env_s, plan_s, update_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="cartpole-balance,walker-walk")
    ap.add_argument("--num_envs", default="1,16,64")
    ap.add_argument("--agent_steps", type=int, default=4, help="agent steps per timed chunk")
    ap.add_argument("--repeats", type=int, default=3, help="timed chunks (and part calls x 5)")
    ap.add_argument("--model_size", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--utd", type=float, default=1.0, help="updates per env step (official 1)")
    ap.add_argument("--episode_length", type=int, default=50)
    ap.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--dot_options", default="library", choices=("library", "none"))
    args = ap.parse_args()
    print(header())
    print(f"model {args.model_size}M, batch {args.batch}, utd {args.utd:g}, official planner, episodes of "
          f"{args.episode_length} steps, {args.agent_steps} agent steps per timed chunk; planner computes in "
          f"{args.compute_dtype}, dot options {args.dot_options}")
    cols = ("task", "N", "compile s", "agent st/s", "env st/s", "upd/s", "env ms", "plan ms", "update ms",
            "parts ms/ag.st", "fused ms/ag.st", "fused/parts")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for task in args.tasks.split(","):
        for n in [int(x) for x in args.num_envs.split(",")]:
            config = get_config(args.model_size)
            config.tasks = task
            config.train.batch_size = args.batch
            config.online.envs_per_task = n
            config.online.episode_length = args.episode_length
            config.online.seed_steps = 0
            config.online.seed_updates = 0
            config.online.utd = args.utd
            config.steps = 1_000_000 // n * n
            config.planner.compute_dtype = args.compute_dtype
            loop = make_online_loop(config)
            carry = jax.tree_util.tree_map(lambda x: x.copy(), loop.init(jax.random.key(0)))
            library = args.dot_options == "library"
            compile_s, chunk_s, updates, carry = fused_times(loop, carry, args.agent_steps, args.repeats, library)
            env_s, plan_s, update_s = part_times(loop, carry, 5 * args.repeats,
                                                 loop.compiler_options if library else None)
            fused = chunk_s / args.agent_steps
            parts = env_s + plan_s + updates / args.agent_steps * update_s
            row = (task, n, f"{compile_s:.0f}", f"{1 / fused:.2f}", f"{n / fused:.1f}",
                   f"{updates / chunk_s:.1f}", f"{env_s * 1e3:.1f}", f"{plan_s * 1e3:.1f}", f"{update_s * 1e3:.1f}",
                   f"{parts * 1e3:.0f}", f"{fused * 1e3:.0f}", f"{fused / parts:.2f}")
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
