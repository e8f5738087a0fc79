"""XLA:CPU and the kernel's memory-mapping limit, for programs that hold many MJX models.

XLA:CPU loads the machine code of every compiled kernel into its own small anonymous memory mappings
(code, read-only data, data). Linux caps the mappings of one process at ``vm.max_map_count`` (65,530 by
default); past it the next ``mmap`` fails and the process dies with a segmentation fault, typically while
serialising the executable for the persistent cache. An evaluation program with many MT30 tasks (one MJX
physics graph per task) reaches that cap on CPU: the all-30-task program did, measured on jax 0.10.2.

Two remedies, both used here:

* ``--xla_cpu_use_fusion_emitters=false`` makes XLA:CPU emit fusions into a few shared LLVM modules instead
  of one module per fusion: measured 1.8x fewer mappings for walker-walk + cheetah-run (6,519 -> 3,666) and
  2.9x for pendulum-swingup (1,494 -> 518), with equal rollout speed. :func:`use_fewer_kernels` adds the flag
  to ``XLA_FLAGS``; it must run before JAX creates its CPU client (``launch/evaluate.py`` calls it first).
* :func:`check_mapping_budget` estimates what a program of K physics models needs (tasks that share one physics
  structure, e.g. walker stand/walk/run, count once: ``envs.structure``) and raises a clear error before
  compiling, instead of a crash half an hour into compilation.

Speed: :func:`tune_for_cpu` (run when ``mtdistill_jax`` is imported) turns off XLA:CPU's YNNPACK fusions
(``--xla_cpu_experimental_ynn_fusion_type=``), which jax 0.10.2 enables by default. They fuse whole MLPs
(matmuls, LayerNorm, Mish) into one library call but feed it every bias and LayerNorm parameter broadcast to
the full activation shape; measured on the 2-core Xeon, 1 thread: planning for 30 envs 7.13 -> 5.19 s, for one
env 127 -> 112 ms, the 1M update 156 -> 144 ms, the 5M update 408 -> 394 ms. XLA's own dot and loop fusions
are used instead.

Memory: :func:`tune_malloc` (also run on import) keeps glibc's allocator from returning the memory of each
execution's buffers to the kernel. XLA:CPU allocates a program's temporary buffer (41 MB for the 1M update, 102 MB
for the 5M one) afresh for every execution. glibc serves an allocation above its mmap threshold (at most 32 MB)
with a fresh ``mmap`` and unmaps it on free, so every execution page-faults the whole buffer in again: measured
10,568 page faults and 20.9 ms of kernel time in a 159.8 ms 1M update on one core, 26,138 faults and 52.9 ms in a
520.5 ms 5M update. With no ``mmap``-served allocations and a 1 GiB trim threshold the buffer stays mapped between
executions. One case remains: XLA runs a program on its own threads, and a thread other than the main one
allocates from a glibc arena whose heaps are at most 64 MB; a larger block (the 5M update's) is still ``mmap``-ed
there. One arena (every thread allocating from the main heap) removes that too, but it serialises every thread's
allocations: measured on 2 cores, the 1M update took 87-105 ms against 74-76 ms and compiled in 10.7-13.2 s
against 8.1-8.7 s. So the one-arena setting is made only where the process may run on a single CPU (its
affinity), where threads never allocate at the same time: there the 5M update took 442-460 ms against 480-482 ms
(26,000-29,500 faults per update) without it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

from mtdistill_jax.errors import UserError

FEWER_KERNELS_FLAG = "--xla_cpu_use_fusion_emitters=false"
# The first jaxlib whose XLA no longer knows that flag (0.11.2 aborts on it: "Unknown flag in XLA_FLAGS").
FEWER_KERNELS_MAX_JAXLIB = (0, 11, 0)
# Flags tune_for_cpu adds (each only where XLA_FLAGS does not already name it), and the jaxlib version they were
# measured on: an XLA that does not know a flag aborts the process, so older jaxlibs are left alone.
SPEED_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)  # YNN_FLAG with an empty value: YNNPACK fusions off
SPEED_FLAGS_MIN_JAXLIB = (0, 10, 2)
TUNING_ENV = "MTDISTILL_XLA_CPU_TUNING"  # "0" turns tune_for_cpu and tune_malloc off, and
# nn.layers.row_means_by_matmul (LayerNorm's means, its backward, the parameter gradients' row sums)
MALLOC_TUNING_ENV = "MTDISTILL_MALLOC_TUNING"  # "0" turns tune_malloc alone off
# glibc's mallopt parameters (malloc.h) and the values tune_malloc sets: no mmap-served allocations and up to 1 GiB
# of free memory kept at the top of a heap instead of being returned to the kernel after every free; the number of
# arenas: 1 where the process may run on one CPU only (threads share the main heap, so no buffer outgrows a 64 MB
# per-thread heap and falls back to mmap), else glibc's own default of 8 per CPU (set explicitly, so that a second
# call with more CPUs undoes a first with one).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30))
ARENAS_PER_CPU = 8  # glibc's default arena limit on 64-bit systems, per CPU
malloc_tuned = False  # whether tune_malloc has set the allocator in this process
malloc_arena_max = None  # the arena limit it set (1: one arena), None before it has
# Environment variables through which a user sets glibc's allocator themselves; tune_malloc then leaves it alone.
USER_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
# Per-program compiler options (``jax.jit(..., compiler_options=...)``) for YNNPACK's single-dot path, the one
# XLA:CPU path measured to reach AMX-BF16 for float32-accumulating bf16 dots (benchmarks/README.md, "XLA:CPU flags").
BF16_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="

# Memory mappings one MJX physics model (one task, or the tasks of one physics structure) adds to the evaluation
# program (reset + step chunk, planner included), per setting of the fusion emitters. Measured on the 2-core CPU
# with jax 0.10.2 for walker-walk + cheetah-run (among the heaviest MJX graphs): 6,519 mappings with the default
# emitters, 3,666 with FEWER_KERNELS_FLAG.
MAPS_PER_PHYSICS = {False: 3300, True: 1850}


class MappingBudgetError(UserError, RuntimeError):
    """The program would need more memory mappings than the kernel allows (says the remedies)."""


def fewer_kernels_on(environ=os.environ) -> bool:
    """Whether ``XLA_FLAGS`` asks for the legacy (fewer-kernel) fusion emitters."""
    return FEWER_KERNELS_FLAG in environ.get("XLA_FLAGS", "").split()


def use_fewer_kernels(environ=os.environ, jaxlib_version: str | None = None) -> bool:
    """Add :data:`FEWER_KERNELS_FLAG` to ``XLA_FLAGS`` unless the user set ``xla_cpu_use_fusion_emitters`` or the
    installed jaxlib (``jaxlib_version``, default the installed one) is :data:`FEWER_KERNELS_MAX_JAXLIB` or newer,
    whose XLA would abort on the flag.

    Returns whether the flag is now in effect. Call before JAX initialises its backends (first
    ``jax.devices()`` or computation); afterwards XLA has already read its flags.
    """
    if jaxlib_version is None:
        jaxlib_version = _installed_jaxlib()
    if jaxlib_version is None or _version_tuple(jaxlib_version) < FEWER_KERNELS_MAX_JAXLIB:
        add_flags((FEWER_KERNELS_FLAG,), environ)
    return fewer_kernels_on(environ)


def _installed_jaxlib() -> str | None:
    """The installed jaxlib's version, read without starting JAX, or None."""
    try:
        from jaxlib.version import __version__
    except ImportError:
        return None
    return __version__


def add_flags(flags, environ=os.environ) -> list[str]:
    """Append each ``--name=value`` of ``flags`` to ``XLA_FLAGS`` unless ``XLA_FLAGS`` already names ``--name``
    (the user's own setting wins, whatever its value). Returns the flags added."""
    current = environ.get("XLA_FLAGS", "")
    named = {f.split("=")[0] for f in current.split()}
    added = [f for f in flags if f.split("=")[0] not in named]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def tune_for_cpu(environ=os.environ, jaxlib_version: str | None = None) -> list[str]:
    """Add :data:`SPEED_FLAGS` to ``XLA_FLAGS`` (those whose name the user's ``XLA_FLAGS`` does not mention) and
    return the flags added. Nothing is added with ``MTDISTILL_XLA_CPU_TUNING=0`` or a jaxlib older than
    :data:`SPEED_FLAGS_MIN_JAXLIB`. Like every XLA flag they take effect only if set before JAX creates its CPU
    client; they do not touch GPU/TPU backends.
    """
    if environ.get(TUNING_ENV, "1") == "0":
        return []
    if jaxlib_version is None:
        jaxlib_version = _installed_jaxlib()
    if jaxlib_version is None or _version_tuple(jaxlib_version) < SPEED_FLAGS_MIN_JAXLIB:
        return []
    return add_flags(SPEED_FLAGS, environ)


def bf16_dot_options(compute_dtype: str, platform: str | None = None, environ=os.environ,
                     jaxlib_version: str | None = None) -> dict | None:
    """Compiler options (``jax.jit(..., compiler_options=...)``) for a program whose model matmuls run in
    ``compute_dtype``: :data:`BF16_DOT_OPTIONS` for ``"bfloat16"`` on CPU, else None (float32, other backends).

    :func:`tune_for_cpu` turns YNNPACK's fusions off for the process, and with them the one XLA:CPU path measured
    to reach the CPU's bf16 units. On the 2-core Xeon a 3-task evaluation chunk (``benchmarks/compile_eval.py
    --tasks walker-walk,cheetah-run,cartpole-balance --episodes 2 --chunks 3 --compute_dtype bfloat16
    [--dot_options none]``) took 8.42 s in bf16 without them, 5.10 s with them, 5.23 s in float32 (at 7199536);
    since bf16 hidden layers normalise in float32 (9e0f557), 2.44 s with them against 5.04 s in float32. Used by
    ``Planner.plan_jit``, the evaluation program's step chunk and ``OnlineLoop.train_chunk_jit`` (through
    :func:`mtdistill_jax.tdmpc2.planner.compiler_options`), and the distillation step and ``launch/distill.py``'s
    training program with a bf16 teacher (:func:`mtdistill_jax.distill.step.compiler_options`). None with
    ``MTDISTILL_XLA_CPU_TUNING=0``, a jaxlib older than :data:`SPEED_FLAGS_MIN_JAXLIB`, or where the user's
    ``XLA_FLAGS`` sets the YNNPACK fusion type to a value of their own (anything but the empty value
    :func:`tune_for_cpu` adds). ``platform`` defaults to ``jax.default_backend()``, asked only for bfloat16.
    """
    if compute_dtype != "bfloat16" or environ.get(TUNING_ENV, "1") == "0":
        return None
    if any(f.partition("=")[0] == YNN_FLAG[:-1] and f != YNN_FLAG for f in environ.get("XLA_FLAGS", "").split()):
        return None  # the user's own setting of the YNNPACK fusion type
    if jaxlib_version is None:
        jaxlib_version = _installed_jaxlib()
    if jaxlib_version is None or _version_tuple(jaxlib_version) < SPEED_FLAGS_MIN_JAXLIB:
        return None
    if platform is None:
        import jax

        platform = jax.default_backend()
    return dict(BF16_DOT_OPTIONS) if platform == "cpu" else None


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc (whose allocator :func:`tune_malloc` sets)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def arena_limit(cpus: int) -> int:
    """The glibc arena limit :func:`tune_malloc` sets for a process that may run on ``cpus`` CPUs: 1 for one CPU,
    else glibc's default (8 per CPU of the machine)."""
    return 1 if cpus <= 1 else ARENAS_PER_CPU * max(os.cpu_count() or 1, cpus)


def tune_malloc(environ=os.environ, libc=None, cpus: int | None = None) -> bool:
    """Set glibc's allocator to keep large freed buffers mapped (:data:`MALLOC_SETTINGS`, and one arena where the
    process may run on one CPU only: :func:`arena_limit`; see the module docstring); return whether it did.
    ``cpus`` defaults to :func:`usable_cpus`. Nothing is changed outside Linux with glibc, with
    ``MTDISTILL_XLA_CPU_TUNING=0`` or ``MTDISTILL_MALLOC_TUNING=0``, or where the user configures the allocator
    through any of :data:`USER_MALLOC_ENV`. It applies to the whole process (torch's CPU tensors too) from the
    call on; the arena limit binds only threads that have not yet allocated, so call it before JAX starts its
    backend (``import mtdistill_jax`` does; call it again after changing the process's CPU affinity).
    The cost: memory freed inside a heap is reused by the process rather than returned to the kernel, so the
    resident size stays near its peak (up to 1 GiB of free memory at a heap's top is kept).
    """
    if environ.get(TUNING_ENV, "1") == "0" or environ.get(MALLOC_TUNING_ENV, "1") == "0":
        return False
    if any(name in environ for name in USER_MALLOC_ENV):
        return False
    if libc is None:
        if not on_glibc():
            return False
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    global malloc_tuned, malloc_arena_max
    arenas = arena_limit(usable_cpus() if cpus is None else cpus)
    settings = (*MALLOC_SETTINGS, (M_ARENA_MAX, arenas))
    malloc_tuned = all([mallopt(param, value) == 1 for param, value in settings])
    malloc_arena_max = arenas if malloc_tuned else None
    return malloc_tuned


def max_map_count() -> int | None:
    """The kernel's ``vm.max_map_count``, where ``/proc`` tells (Linux); else None."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def mapping_count() -> int | None:
    """Memory mappings this process holds now (Linux); else None."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def estimated_mappings(num_physics: int, fewer_kernels: bool | None = None) -> int:
    """Mappings an evaluation program of ``num_physics`` MJX physics models adds on XLA:CPU (an upper-side
    estimate)."""
    if fewer_kernels is None:
        fewer_kernels = fewer_kernels_on()
    return num_physics * MAPS_PER_PHYSICS[bool(fewer_kernels)]


def check_mapping_budget(num_physics: int, platform: str, limit: int | None = None, current: int | None = None,
                         fewer_kernels: bool | None = None) -> None:
    """Raise :class:`MappingBudgetError` (a ``RuntimeError``) if compiling a program of ``num_physics`` MJX physics
    models (``len(env.structures)``) on CPU would pass ``vm.max_map_count``."""
    if platform != "cpu":
        return
    limit = max_map_count() if limit is None else limit
    current = mapping_count() if current is None else current
    if limit is None or current is None:
        return
    if fewer_kernels is None:
        fewer_kernels = fewer_kernels_on()
    need = estimated_mappings(num_physics, fewer_kernels)
    if current + need <= limit:
        return
    remedies = ["evaluate fewer tasks per call (e.g. --tasks=...)",
                f"raise the limit: sudo sysctl -w vm.max_map_count={max(262144, 2 * (current + need))}"]
    if not fewer_kernels:
        remedies.insert(0, f"set XLA_FLAGS={FEWER_KERNELS_FLAG} before JAX starts (launch/evaluate.py does; "
                           "in Python call mtdistill_jax.xla_cpu.use_fewer_kernels() before using jax)")
    raise MappingBudgetError(
        f"compiling {num_physics} MJX physics models in one XLA:CPU program needs about {need:,} memory mappings; "
        f"this process holds {current:,} and the kernel allows {limit:,} (vm.max_map_count), so it would crash "
        "mid-compile. "
        "Remedies: " + "; ".join(remedies) + ".")
