"""Timing helpers for the benchmark scripts: compile time apart, median of repeated runs after warm-up."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def time_jitted(fn, args_fn, repeats: int = 20, *, return_compiled: bool = False, compiler_options=None):
    """Compile ``fn`` (timed; ``compiler_options``: XLA options of this program), warm up once, then time
    ``repeats`` calls (block_until_ready after each).

    ``args_fn(i)`` gives the arguments of call ``i``. Returns (compile_s, median_s, p10_s, p90_s), plus the
    compiled executable as a fifth item with ``return_compiled`` (for its memory/cost analysis).
    """
    args = args_fn(0)
    t = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(*args))
    times = []
    for i in range(repeats):
        args = args_fn(i + 1)
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    times = np.asarray(times)
    stats = (compile_s, float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90)))
    return (*stats, compiled) if return_compiled else stats


def header():
    d = jax.devices()[0]
    return f"jax {jax.__version__} on {d.platform} ({d.device_kind}), {jax.device_count()} device(s)"


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Measured matmul throughput of the default device (n x n @ n x n in ``dtype``), GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # random data: zeros/ones run faster on GPUs
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(a))
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def stream_gbps(megabytes: float = 3.0, repeats: int = 50) -> float:
    """Measured elementwise throughput of the default device: ``a * b + c`` on float32 arrays of ``megabytes``
    each (three read, one written per call), GB/s moved. Arrays of a few MB are the size of a TD-MPC2 update's
    activations ([2, 1024, 384] float32 is 3 MB), so this is what an elementwise fusion there can expect."""
    n = max(1, int(megabytes * 1e6 / 4))
    a, b, c = (jax.random.normal(jax.random.key(i), (n,), jnp.float32) for i in range(3))
    f = jax.jit(lambda a, b, c: a * b + c)
    jax.block_until_ready(f(a, b, c))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(a, b, c))
    return 4 * 4 * n * repeats / (time.perf_counter() - t) / 1e9


def cost_flops(program) -> float | None:
    """``cost_analysis()['flops']`` of a lowered or compiled program (a dict, or a list of one per device in
    older jax); None where the backend gives none."""
    try:
        ca = program.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without cost analysis raise various errors
        return None
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")  # a computation's header line in HLO text
_NAME = re.compile(r"%[\w.\-]+")
_CALLED = re.compile(r"(calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RANDOM = ("_threefry", "_normal", "_uniform", "_shuffle", "_random_bits", "_bernoulli")


def _distinct_fusions(hlo_text: str) -> tuple[int, dict[str, str]]:
    """(number of fusion instructions, {canonical fused computation: op_name of its first fusion})."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = bodies.setdefault(m.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    canonical: dict[str, str] = {}

    def canon(name: str, depth: int = 0) -> str:
        if name not in canonical:
            if depth > 64 or name not in bodies:
                raise ValueError(f"fused_kernels: computation {name!r} missing or nested too deep in the HLO text")
            lines = []
            for ins in bodies[name]:
                ins = re.sub(r", metadata=\{[^}]*\}", "", ins)
                ins = _CALLED.sub(lambda c: f"{c.group(1)}=({canon(c.group(2), depth + 1)})", ins)
                lines.append(_NAME.sub("%", ins))
            canonical[name] = "\n".join(lines)
        return canonical[name]

    fusions = [ins for body in bodies.values() for ins in body if " fusion(" in ins and _CALLED.search(ins)]
    kernels: dict[str, str] = {}
    for ins in fusions:
        op = _OP_NAME.search(ins)
        kernels.setdefault(canon(_CALLED.search(ins).group(2)), op.group(1) if op else "")
    return len(fusions), kernels


def fused_kernels(hlo_text: str) -> tuple[int, int]:
    """``(fusions, kernels)`` of a compiled program's HLO text (``compiled.as_text()``): its fusion instructions
    (loop bodies included), and how many of them are distinct, i.e. how many kernels XLA:CPU compiles.

    Two fusions are the same kernel when their fused computations are equal up to instruction names and
    metadata (same ops, shapes, layouts, constants and called computations): XLA:CPU compiles such a kernel once
    (``benchmarks/kernel_reuse.py`` measures it), so a loop unrolled into identical copies costs little compile
    time, while every new shape costs a kernel.
    """
    n, kernels = _distinct_fusions(hlo_text)
    return n, len(kernels)


def kernel_source(op_name: str) -> str:
    """Where a kernel comes from, by the ``op_name`` JAX gave its fusion (``jit(f)/jvp(WorldModel.Q)/Qs/...``).

    ``random draws``; ``made by XLA`` (no op_name: copies, layout changes); else ``<where>, <pass>``, where
    ``<where>`` is the first Flax module method on the path (``WorldModel.Q`` -> ``Q``) or ``other code`` (losses,
    optimisers, ...) and ``<pass>`` is ``backward`` (under ``transpose(...)``), ``forward`` (under ``jvp(...)``) or
    ``no gradient`` (neither: e.g. the TD target, the optimisers' and Polyak's arithmetic)."""
    parts = op_name.split("/")[1:]
    if not parts:
        return "made by XLA"
    if any(r in op_name for r in _RANDOM):
        return "random draws"
    where = re.search(r"WorldModel\.(\w+)", op_name)
    grad = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "no gradient"
    return f"{where.group(1) if where else 'other code'}, {grad}"


def kernels_by_source(hlo_text: str) -> dict[str, int]:
    """Distinct kernels (see :func:`fused_kernels`) per :func:`kernel_source` of their first fusion, most first."""
    counts: dict[str, int] = {}
    for op_name in _distinct_fusions(hlo_text)[1].values():
        src = kernel_source(op_name)
        counts[src] = counts.get(src, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def trace_events(trace_dir: str) -> list[dict]:
    """The complete events (``ph == 'X'``: name, ``tid``, ``ts`` and ``dur`` in microseconds) of the perfetto
    trace that ``jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)`` wrote."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"no perfetto trace under {trace_dir}")
    with gzip.open(files[0]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


# an instruction line: (name, type, opcode, the rest after its opening parenthesis)
_TYPED = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
DOT_OPCODES = ("dot", "convolution", "custom-call")  # the matmul library's calls on CPU


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (opcode, op_name)}`` for every instruction of a compiled program's HLO text."""
    table = {}
    for line in hlo_text.splitlines():
        m = _TYPED.match(line)
        if m:
            op = _OP_NAME.search(line)
            table[m.group(1)] = (m.group(3), op.group(1) if op else "")
    return table


_ARRAY = re.compile(r"\b([a-z]+)(\d*)\[([\d,]*)\]")
_BITS = {"pred": 8}
_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{([\d,]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")  # operand comments, e.g. /*index=5*/


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _typed_instructions(hlo_text: str) -> list[tuple[str, str, str, list[str], str]]:
    """``(name, type text, opcode, operands, attributes)`` of every instruction of a compiled program's HLO text,
    the operands as written (``%name``, or ``f32[768,230]{1,0} %name`` with the type inline)."""
    out = []
    for line in hlo_text.splitlines():
        m = _TYPED.match(line)
        if m:
            name, type_text, opcode, rest = m.groups()
            operands, _, attributes = rest.partition("), ")
            operands = _COMMENT.sub("", operands).rstrip(")")
            out.append((name, type_text, opcode, [o for o in operands.split(", ") if o], attributes))
    return out


def _operand_type(operand: str, types: dict[str, str]) -> str:
    """An operand's type: written inline before its name, or its defining instruction's ("" if neither)."""
    inline, _, name = operand.rpartition(" ")
    return inline or types.get(name.lstrip("%"), "")


def _array_dims(type_text: str) -> tuple[int, ...] | None:
    """The dimensions of a single-array HLO type (``f32[768,384]{1,0}``); None for a tuple or no array."""
    arrays = _ARRAY.findall(type_text)
    return _dims(arrays[0][2]) if len(arrays) == 1 else None


class _Dot(NamedTuple):
    """A ``dot`` instruction of a compiled program: its operands as written, their and its result's dimensions."""

    name: str
    operands: list[str]
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    out: tuple[int, ...]
    attributes: str


def _dots(hlo_text: str) -> list[_Dot]:
    """Every ``dot`` of a compiled program's HLO text whose two operands' and result's shapes can be read (from
    the operands' defining instructions, or written inline)."""
    instructions = _typed_instructions(hlo_text)
    types = {name: type_text for name, type_text, *_ in instructions}
    dots = []
    for name, type_text, opcode, operands, attributes in instructions:
        if opcode != "dot":
            continue
        shapes = [_array_dims(_operand_type(o, types)) for o in operands]
        out = _array_dims(type_text)
        if len(shapes) != 2 or None in shapes or out is None:
            continue
        dots.append(_Dot(name, operands, shapes[0], shapes[1], out, attributes))
    return dots


def dot_table(hlo_text: str) -> dict[str, tuple[float, str]]:
    """``{dot instruction: (flops, "lhs shape @ rhs shape")}`` for every ``dot`` of a compiled program's HLO text:
    flops = 2 x (output elements) x (contracted elements), the operands' shapes read from their defining
    instructions (or written inline). Dots whose operand shapes cannot be read are left out, and so are matmuls
    XLA emits otherwise: inside a fusion (YNNPACK's, which importing the library turns off on CPU) or as a custom
    call, whose time :func:`step_profile` then counts without their flops."""
    table = {}
    for d in _dots(hlo_text):
        contracted = int(np.prod([d.lhs[i] for i in _attr_dims(_CONTRACTING, d.attributes)]))
        table[d.name] = (2.0 * float(np.prod(d.out)) * contracted,
                         f"[{','.join(map(str, d.lhs))}] @ [{','.join(map(str, d.rhs))}]")
    return table


_BATCH = re.compile(r"\blhs_batch_dims=\{([\d,]*)\}")
_RHS_CONTRACTING = re.compile(r"\brhs_contracting_dims=\{([\d,]*)\}")
_RHS_BATCH = re.compile(r"\brhs_batch_dims=\{([\d,]*)\}")
DOT_GROUPS = ("matmul", "narrow", "matrix-vector", "x with itself")
NARROW = 16  # a product whose rows, columns or contraction are this few is 'narrow'


def _attr_dims(pattern: re.Pattern, attributes: str) -> tuple[int, ...]:
    m = pattern.search(attributes)
    return _dims(m.group(1)) if m else ()


def dot_groups(hlo_text: str) -> dict[str, str]:
    """``{dot instruction: group}`` for the dots :func:`dot_table` reads, by the product's sizes per batch member
    (M rows of the left operand, N columns of the right one, K contracted): ``"x with itself"`` where both
    operands are the same array (``nn.layers.squared_norm``'s Gram products), ``"matrix-vector"`` where M or N is
    1 (LayerNorm's row means, parameter gradients' row sums), ``"narrow"`` where M, N or K is at most
    :data:`NARROW` (the policy's action head, ...), ``"matmul"`` otherwise. The matmul library reaches its square-
    matmul rate only in the last group; the others are bound by reading their operands."""
    groups = {}
    for d in _dots(hlo_text):
        lhs_contracting = _attr_dims(_CONTRACTING, d.attributes)
        lhs_free = [n for i, n in enumerate(d.lhs) if i not in lhs_contracting + _attr_dims(_BATCH, d.attributes)]
        rhs_free = [n for i, n in enumerate(d.rhs)
                    if i not in _attr_dims(_RHS_CONTRACTING, d.attributes) + _attr_dims(_RHS_BATCH, d.attributes)]
        m, n = int(np.prod(lhs_free)), int(np.prod(rhs_free))
        k = int(np.prod([d.lhs[i] for i in lhs_contracting]))
        if d.operands[0].rpartition(" ")[2] == d.operands[1].rpartition(" ")[2]:
            groups[d.name] = "x with itself"
        elif min(m, n) == 1:
            groups[d.name] = "matrix-vector"
        elif min(m, n, k) <= NARROW:
            groups[d.name] = "narrow"
        else:
            groups[d.name] = "matmul"
    return groups


def _bytes(type_text: str) -> int:
    """Bytes of the arrays an HLO type names (``f32[768,384]{1,0}``, or a tuple of them)."""
    total = 0
    for kind, bits, dims in _ARRAY.findall(type_text):
        width = int(bits) if bits else _BITS.get(kind, 0)
        total += width // 8 * int(np.prod(_dims(dims)))
    return total


_PARTITIONS = re.compile(r'outer_dimension_partitions"?\s*:\s*\[([^\]]*)\]')


def split_fusions(hlo_text: str) -> dict[str, int]:
    """``{fusion instruction: parts}`` for the fusions XLA:CPU splits across its thread pool (its parallel-task
    assignment writes ``outer_dimension_partitions`` into their backend config; more than one CPU only). Each part
    is a work group of the kernel; the others run on one thread."""
    parts = {}
    for name, _, opcode, _, attributes in _typed_instructions(hlo_text):
        m = _PARTITIONS.search(attributes)
        if opcode == "fusion" and m:
            parts[name] = int(np.prod([int(d.strip().strip('"')) for d in m.group(1).split(",") if d.strip()]))
    return parts


def fusion_bytes(hlo_text: str) -> dict[str, int]:
    """``{fusion instruction: bytes}``: its operands' and result's sizes, what one call reads and writes when
    it reads each operand once in full (more than it moves where it only slices an operand)."""
    instructions = _typed_instructions(hlo_text)
    types = {name: type_text for name, type_text, *_ in instructions}
    return {name: _bytes(type_text) + sum(_bytes(_operand_type(o, types)) for o in operands)
            for name, type_text, opcode, operands, _ in instructions if opcode == "fusion"}


def step_profile(compiled, args_fn, steps: int = 5) -> dict:
    """Where a compiled program's execution time goes: ``steps`` calls traced with ``jax.profiler``, each
    runtime event matched to the HLO instruction it runs (XLA:CPU names its thunks' events so).

    Returns ``{"by_kind": {kind: s}, "by_source": {(kind, source): s}, "threads": {tid: s}, "wall": s,
    "dot_flops": flops, "by_dot_shape": {shape: (s, flops)}, "by_dot_group": {group: (s, flops)},
    "fusion_bytes": bytes, "fusion_time": s, "split_fusions": (split, all), "split_fusion_time": s}``, each
    per call: ``kind`` is ``dot`` (the matmul
    library), ``fusion`` or the opcode of anything else (copy, concatenate, while, ...); ``source`` is
    :func:`kernel_source` of the instruction's op_name; ``threads`` sums the matched events per thread (more than
    one thread where XLA splits a kernel or a dot); ``wall`` is the calls' wall time. A ``while`` instruction's
    time includes its body's kernels, which are counted too. ``dot_flops`` are the executed ``dot`` events'
    flops (:func:`dot_table`; a dot in a loop counts at every trip) and ``by_dot_shape`` groups them by operand
    shapes, slowest first: flops / time is the rate the matmul library reached on the program's own shapes;
    ``by_dot_group`` the same by :func:`dot_groups`' kind of product.
    ``fusion_bytes`` / ``fusion_time`` are the executed fusions' operand and result bytes
    (:func:`fusion_bytes`) and their time: the bandwidth the elementwise kernels reached; ``split_fusions``
    counts the fusion instructions XLA:CPU splits across threads (:func:`split_fusions`) and of all of them,
    ``split_fusion_time`` is the split ones' share of ``fusion_time``.
    """
    if steps < 1:
        raise ValueError(f"step_profile: steps must be >= 1, got {steps}")
    hlo = compiled.as_text()
    table, dots, moved, groups = instruction_table(hlo), dot_table(hlo), fusion_bytes(hlo), dot_groups(hlo)
    split = split_fusions(hlo)
    jax.block_until_ready(compiled(*args_fn(0)))
    with tempfile.TemporaryDirectory(prefix="step_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t = time.perf_counter()
        try:
            for i in range(steps):
                jax.block_until_ready(compiled(*args_fn(i + 1)))
        finally:
            wall = time.perf_counter() - t
            jax.profiler.stop_trace()
        events = trace_events(trace_dir)
    by_kind, by_source, threads = collections.Counter(), collections.Counter(), collections.Counter()
    shape_time, shape_flops = collections.Counter(), collections.Counter()
    group_time, group_flops = collections.Counter(), collections.Counter()
    fusion_time = fusion_moved = split_time = 0.0
    for e in events:
        if e["name"] not in table:
            continue
        opcode, op_name = table[e["name"]]
        kind = "dot" if opcode in DOT_OPCODES else opcode
        sec = e.get("dur", 0) / 1e6 / steps
        by_kind[kind] += sec
        by_source[(kind, kernel_source(op_name))] += sec
        if kind != "while":
            threads[e["tid"]] += sec
        if e["name"] in dots:
            flops, shape = dots[e["name"]]
            shape_time[shape] += sec
            shape_flops[shape] += flops / steps
            group_time[groups[e["name"]]] += sec
            group_flops[groups[e["name"]]] += flops / steps
        if e["name"] in moved:
            fusion_time += sec
            fusion_moved += moved[e["name"]] / steps
            split_time += sec if e["name"] in split else 0.0
    return {"by_kind": dict(by_kind.most_common()), "by_source": dict(by_source.most_common()),
            "threads": dict(threads.most_common()), "wall": wall / steps,
            "dot_flops": float(sum(shape_flops.values())), "fusion_bytes": fusion_moved, "fusion_time": fusion_time,
            "split_fusions": (len(split), len(moved)), "split_fusion_time": split_time,
            "by_dot_shape": {k: (v, shape_flops[k]) for k, v in shape_time.most_common()},
            "by_dot_group": {k: (v, group_flops[k]) for k, v in group_time.most_common()}}
