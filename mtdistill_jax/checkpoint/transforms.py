"""Checkpoint transforms: pure functions on a parameter pytree (nested dicts of arrays).

- :func:`cast_params` — float32 / bfloat16 / float16 casts of every floating leaf; float16 refuses (naming the
  tensor) any finite value beyond the float16 range instead of silently turning it into inf.
- :func:`quantize_int8` / :func:`dequantize` — weight-only int8: every Linear ``kernel`` (``[in, out]``, or
  ``[members, in, out]`` for the Q-ensemble) becomes ``kernel_int8`` (int8) plus ``kernel_scale`` (float32,
  one symmetric scale per output channel: ``max |w| / 127`` over the input axis); biases, LayerNorm parameters
  and embeddings keep their floating dtype. ``dequantize`` restores float32 kernels (``q * scale``) at load.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

DTYPES = ("float32", "bfloat16", "float16", "int8")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
INT8_SUFFIX, SCALE_SUFFIX = "_int8", "_scale"
MODULE_ORDER = ("task_emb", "encoder", "dynamics", "reward_head", "pi_head", "Qs")  # report order


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return BFLOAT16
    if name in ("float32", "float16"):
        return np.dtype(name)
    raise ValueError(f"unknown float dtype {name!r}; valid: float32, bfloat16, float16")


def _is_float(x) -> bool:
    dt = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    return np.issubdtype(dt, np.floating) or dt == BFLOAT16


def walk(tree, fn, path=()):
    """Map ``fn(path, leaf)`` over a nested dict of arrays (``path``: keys joined by '/'); same nesting out."""
    if isinstance(tree, dict):
        return {k: walk(v, fn, path + (k,)) for k, v in tree.items()}
    return fn("/".join(path), tree)


def cast_params(params, dtype: str):
    """Cast every floating leaf to ``dtype`` ('float32', 'bfloat16' or 'float16'); other leaves unchanged."""
    target = _np_dtype(dtype)

    def cast(path, x):
        x = np.asarray(x)
        if not _is_float(x):
            return x
        if target == np.float16:
            big = np.abs(x.astype(np.float32))
            bad = np.isfinite(big) & (big > FP16_MAX)
            if bad.any():
                raise ValueError(f"tensor {path!r} has {int(bad.sum())} values beyond the float16 range "
                                 f"(max |x| = {float(big[np.isfinite(big)].max()):.4g} > {FP16_MAX}); keep it in "
                                 "float32 or bfloat16")
        return x.astype(target)

    return walk(params, cast)


def quantize_int8(params):
    """Weight-only per-output-channel symmetric int8 quantisation of every Linear kernel."""

    def go(tree, path=()):
        out = {}
        for k, v in tree.items():
            p = path + (k,)
            if isinstance(v, dict):
                out[k] = go(v, p)
            elif k == "kernel" and _is_float(v) and np.ndim(v) >= 2:
                w = np.asarray(v, np.float32)
                amax = np.max(np.abs(w), axis=-2)  # over the input axis: one scale per output channel
                scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
                q = np.clip(np.rint(w / np.expand_dims(scale, -2)), -127, 127).astype(np.int8)
                out[k + INT8_SUFFIX] = q
                out[k + SCALE_SUFFIX] = scale
            else:
                out[k] = np.asarray(v)
        return out

    return go(params)


def is_quantized(params) -> bool:
    found = []
    walk(params, lambda path, x: found.append(path.endswith(INT8_SUFFIX)))
    return any(found)


def dequantize(params, dtype: str = "float32", xp=np):
    """Inverse of :func:`quantize_int8` (``kernel = q * scale``); float leaves are cast to ``dtype``.

    ``xp=jax.numpy`` does the same on device arrays or tracers, inside a jitted step (e.g. a teacher kept in
    int8 on the device and dequantised where it is used)."""
    target = _np_dtype(dtype)

    def go(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = go(v)
            elif k.endswith(INT8_SUFFIX):
                base = k[: -len(INT8_SUFFIX)]
                scale = xp.asarray(tree[base + SCALE_SUFFIX], np.float32)
                out[base] = (xp.asarray(v, np.float32) * xp.expand_dims(scale, -2)).astype(target)
            elif k.endswith(SCALE_SUFFIX) and (k[: -len(SCALE_SUFFIX)] + INT8_SUFFIX) in tree:
                continue
            else:
                out[k] = xp.asarray(v).astype(target) if _is_float(v) else xp.asarray(v)
        return out

    return go(params)


def transform(params, dtype: str):
    """The checkpoint transform behind ``convert.py --dtype``: cast, or int8 weight-only quantisation."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if is_quantized(params):
        params = dequantize(params)
    return quantize_int8(params) if dtype == "int8" else cast_params(params, dtype)


def to_compute(params, dtype: str = "float32", xp=np):
    """Params ready for the model: int8 kernels dequantised, floats cast to ``dtype``.

    With ``xp=jax.numpy`` it runs on device arrays or inside jit (no float16 range check: a cast *to* the
    compute dtype of stored float16/bfloat16/int8 values cannot overflow float32 or bfloat16)."""
    if xp is np and not is_quantized(params):
        return cast_params(params, dtype)
    return dequantize(params, dtype, xp)


def tree_nbytes(params) -> int:
    """Bytes of all leaves (the in-memory size; orbax stores the same bytes plus small metadata)."""
    total = []
    walk(params, lambda path, x: total.append(np.asarray(x).nbytes))
    return int(sum(total))


def _logical_count(path: str, x) -> int:
    """Parameters a leaf stands for: int8 kernels count, their scales are storage overhead."""
    return 0 if path.endswith("kernel" + SCALE_SUFFIX) else int(np.size(x))


def describe(params) -> dict[str, Any]:
    """Parameter counts and bytes per top-level module and bytes per dtype (for size tables and --inspect)."""
    by_module: dict[str, dict[str, Any]] = {}
    by_dtype: dict[str, int] = {}
    for mod in sorted(params, key=lambda m: (MODULE_ORDER.index(m) if m in MODULE_ORDER else len(MODULE_ORDER), m)):
        sub = params[mod]
        count, nbytes, dtypes = [0], [0], set()

        def visit(path, x, count=count, nbytes=nbytes, dtypes=dtypes):
            x = np.asarray(x)
            count[0] += _logical_count(path, x)
            nbytes[0] += x.nbytes
            dtypes.add(str(x.dtype))
            by_dtype[str(x.dtype)] = by_dtype.get(str(x.dtype), 0) + int(x.nbytes)

        walk(sub if isinstance(sub, dict) else {mod: sub}, visit)
        by_module[mod] = {"params": count[0], "bytes": nbytes[0], "dtypes": sorted(dtypes)}
    return {"modules": by_module, "dtypes": by_dtype, "params": sum(m["params"] for m in by_module.values()),
            "bytes": tree_nbytes(params)}
