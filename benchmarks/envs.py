"""Benchmark: MT30 MJX env steps/s per task for N = 1, 64, 256 copies (impl jax and warp), compile time
apart, next to the native dm_control step rate of the same task (one env, MuJoCo C).

One env step = one TD-MPC2 agent step (action repeat 2). MJX figures come from ``--harness scan``
(``lax.scan`` over ``--steps`` steps in one compiled call: how training and evaluation run) or ``call``
(one jitted call per step, dispatch overhead included). Custom tasks are timed natively on their stock
dm_control counterpart (same physics up to floor size; reacher-three on reacher-hard).
Usage: ``python benchmarks/envs.py [--tasks walker-walk,cheetah-run] [--num_envs 1,64,256] [--impls jax,warp]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import header  # noqa: E402
from mtdistill_jax import envs  # noqa: E402

NATIVE = {  # custom task -> stock dm_control (domain, task) with the same physics
    "walker-walk-backwards": ("walker", "walk"), "walker-run-backwards": ("walker", "run"),
    "cheetah-run-backwards": ("cheetah", "run"), "cheetah-run-front": ("cheetah", "run"),
    "cheetah-run-back": ("cheetah", "run"), "cheetah-jump": ("cheetah", "run"),
    "hopper-hop-backwards": ("hopper", "hop"), "reacher-three-easy": ("reacher", "hard"),
    "reacher-three-hard": ("reacher", "hard"), "cup-spin": ("ball_in_cup", "catch"),
    "pendulum-spin": ("pendulum", "swingup"),
}


def native_rate(task: str, steps: int) -> float:
    from dm_control import suite

    domain, name = NATIVE.get(task) or task.replace("-", "_").split("_", 1)
    domain = {"cup": "ball_in_cup"}.get(domain, domain)
    env = suite.load(domain, name, task_kwargs={"random": 0})
    spec = env.action_spec()
    rng = np.random.default_rng(0)
    env.reset()
    t = time.perf_counter()
    for _ in range(steps):
        a = rng.uniform(spec.minimum, spec.maximum)
        for _ in range(2):  # action repeat 2
            env.step(a)
    return steps / (time.perf_counter() - t)


def mjx_rate(task: str, impl: str, n: int, steps: int, harness: str) -> tuple[float, float]:
    env = envs.make(task, impl=impl)
    A = env.action_size
    reset = jax.jit(jax.vmap(env.reset))
    state = reset(jax.random.split(jax.random.key(0), n))

    if harness == "scan":
        def run(s, key):
            def body(s, k):
                return jax.vmap(env.step)(s, jax.random.uniform(k, (n, A), minval=-1, maxval=1)), None
            return jax.lax.scan(body, s, jax.random.split(key, steps))[0]

        fn = jax.jit(run)
        t = time.perf_counter()
        fn = fn.lower(state, jax.random.key(1)).compile()
        compile_s = time.perf_counter() - t
        jax.block_until_ready(fn(state, jax.random.key(2)))
        t = time.perf_counter()
        out = jax.block_until_ready(fn(state, jax.random.key(3)))
        rate = n * steps / (time.perf_counter() - t)
        _check_no_overflow(task, out)
        return compile_s, rate

    step = jax.jit(jax.vmap(env.step))
    a = jnp.zeros((n, A))
    t = time.perf_counter()
    step = step.lower(state, a).compile()
    compile_s = time.perf_counter() - t
    s = step(state, a)
    jax.block_until_ready(s.obs)
    t = time.perf_counter()
    for _ in range(steps):
        s = step(s, a)
    jax.block_until_ready(s.obs)
    return compile_s, n * steps / (time.perf_counter() - t)


def _check_no_overflow(task, state) -> None:
    """Warp reports dropped contacts/constraints in ``data._impl.overflow`` (its contact buffer, 48 slots by
    default, is shared by all vmapped worlds): a rate with drops is not valid physics, so it is reported as an
    error instead of a figure."""
    overflow = getattr(getattr(state.data, "_impl", None), "overflow", None)
    if overflow is not None and int(np.max(np.asarray(overflow))) != 0:
        raise RuntimeError(f"{task}: warp buffer overflow (contacts or constraints dropped)")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", default=",".join(envs.task_names()))
    ap.add_argument("--num_envs", default="1,64,256")
    ap.add_argument("--impls", default="jax,warp")
    ap.add_argument("--steps", type=int, default=50, help="agent steps per timed run")
    ap.add_argument("--harness", default="scan", choices=["scan", "call"])
    args = ap.parse_args()
    print(header(), f"| harness {args.harness}, {args.steps} agent steps per timing")
    ns = [int(x) for x in args.num_envs.split(",")]
    cols = " ".join(f"{impl}/N={n:<3}" for impl in args.impls.split(",") for n in ns)
    print(f"{'task':26s} {'native':>8s}  steps/s: {cols}   (compile s)")
    for task in args.tasks.split(","):
        row, comp = [], []
        for impl in args.impls.split(","):
            for n in ns:
                try:
                    c, r = mjx_rate(task, impl, n, args.steps, args.harness)
                    row.append(f"{r:>9.0f}")
                    comp.append(f"{c:.0f}")
                except Exception as e:  # report and go on: one impl failing must not hide the others
                    row.append(f"{'err':>9s}")
                    comp.append(type(e).__name__)
        print(f"{task:26s} {native_rate(task, 200):8.0f}  {' '.join(row)}   ({', '.join(comp)})", flush=True)


if __name__ == "__main__":
    main()
