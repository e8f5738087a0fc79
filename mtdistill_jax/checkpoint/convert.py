"""The conversions behind ``launch/convert.py``: official .pt -> agent export, dtype transforms, export -> .pt,
and inspection. Each returns the report it prints (before/after size tables), so tools and tests can read it.
"""

from __future__ import annotations

import dataclasses
import os

from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.checkpoint.export import (
    AgentExport,
    bytes_on_disk,
    from_torch_file,
    load_agent_stored,
    save_agent,
    to_compute,
)
from mtdistill_jax.errors import UserError


def _full_tree(export: AgentExport) -> dict:
    tree = {"params": export.params}
    if export.target_q_params is not None:
        tree["target_Qs"] = export.target_q_params
    return tree


def _stored_dtype_name(export: AgentExport) -> str:
    return "int8" if transforms.is_quantized(export.params) else export.dtype


def _mb(n: int) -> str:
    return f"{n / 1e6:8.3f} MB"


def size_table(before: AgentExport, after: AgentExport, before_disk: int | None = None,
               after_disk: int | None = None) -> str:
    """Per-module parameter bytes before and after, with the ratio to the same params in float32."""
    b, a = transforms.describe(before.params), transforms.describe(after.params)
    rows = [f"{'module':14s} {'params':>10s} {'before':>12s} {'after':>12s} {'after/fp32':>10s}"]
    for mod in b["modules"]:
        n = b["modules"][mod]["params"]
        rows.append(f"{mod:14s} {n:>10,d} {_mb(b['modules'][mod]['bytes'])} {_mb(a['modules'][mod]['bytes'])} "
                    f"{a['modules'][mod]['bytes'] / (4 * n):>9.1%}")
    if before.target_q_params is not None and after.target_q_params is not None:
        db, da = transforms.describe({"Qs": before.target_q_params}), transforms.describe({"Qs": after.target_q_params})
        rows.append(f"{'target Qs':14s} {db['params']:>10,d} {_mb(db['bytes'])} {_mb(da['bytes'])} "
                    f"{da['bytes'] / (4 * db['params']):>9.1%}")
    tb, ta = transforms.describe(_full_tree(before)), transforms.describe(_full_tree(after))
    rows.append(f"{'total':14s} {tb['params']:>10,d} {_mb(tb['bytes'])} {_mb(ta['bytes'])} "
                f"{ta['bytes'] / (4 * tb['params']):>9.1%}")
    if before_disk is not None and after_disk is not None:
        rows.append(f"{'on disk':14s} {'':>10s} {_mb(before_disk)} {_mb(after_disk)} "
                    f"{after_disk / (4 * tb['params']):>9.1%}")
    head = (f"{_stored_dtype_name(before)} -> {_stored_dtype_name(after)} "
            "(after/fp32: bytes relative to the same parameters in float32)")
    return head + "\n" + "\n".join(rows)


def import_torch(path: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
                 model_size: int | None = None, task_set: str | None = None) -> str:
    """Official TD-MPC2 / td-mpc-opt ``.pt`` (either key format, any float dtype) -> agent export in ``out``.

    Without target-Q tensors in the file the online Qs are copied as targets (said in the report and the
    export's notes). ``dtype`` (optional) applies a transform; by default the file's dtype is kept.
    """
    source = from_torch_file(path, model_size=model_size, task_set=task_set, copy_missing_targets=True)
    c = source.config
    result = _apply_dtype(source, dtype) if dtype else source
    save_agent(out, result, overwrite=overwrite)
    lines = [f"{path}: MT{c.task_set[2:]} {c.model_size}M model, {source.param_count:,d} parameters; "
             + source.notes[0]]
    lines += [f"note: {n}" for n in source.notes[1:]]
    lines.append(size_table(source, load_agent_stored(out), bytes_on_disk(path), bytes_on_disk(out)))
    lines.append(f"wrote agent export {os.path.abspath(out)}")
    return "\n".join(lines)


def _apply_dtype(export: AgentExport, dtype: str) -> AgentExport:
    try:  # the params do not fit the dtype (e.g. values beyond the float16 range): the error names the tensor
        params = transforms.transform(export.params, dtype)
        target = None if export.target_q_params is None else transforms.transform(export.target_q_params, dtype)
    except ValueError as e:
        raise UserError(f"cannot store {export.source or 'the agent'} as {dtype}: {e}") from e
    note = f"transformed {_stored_dtype_name(export)} -> {dtype}"
    return dataclasses.replace(export, params=params, target_q_params=target, dtype=dtype,
                               notes=[*export.notes, note])


def convert_dtype(src: str, out: str, dtype: str, *, overwrite: bool = False) -> str:
    """Agent export ``src`` -> agent export ``out`` stored as ``dtype`` (float32/bfloat16/float16/int8)."""
    if dtype not in transforms.DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(transforms.DTYPES)}")
    before = load_agent_stored(src)
    after = _apply_dtype(before, dtype)
    save_agent(out, after, overwrite=overwrite)
    return "\n".join([size_table(before, load_agent_stored(out), bytes_on_disk(src), bytes_on_disk(out)),
                      f"wrote agent export {os.path.abspath(out)}"])


def export_torch(src: str, path: str, *, key_format: str = "current") -> str:
    """Agent export (or .pt) -> official-format ``.pt`` that the official ``TDMPC2.load`` accepts.

    Floating params keep their dtype (float32/bfloat16/float16); int8 exports are dequantised to float32
    (the official model has no int8 layers).
    """
    from mtdistill_jax.checkpoint.tdmpc2_torch import save_tdmpc2_checkpoint

    stored = load_agent_stored(src)
    export, notes = stored, []
    if transforms.is_quantized(stored.params):
        export = dataclasses.replace(to_compute(stored), dtype="float32")
        notes.append("int8 kernels dequantised to float32 (official TD-MPC2 has no int8 layers)")
    if export.target_q_params is None:
        notes.append("no target Qs in the export: the online Qs were written as target Qs")
    save_tdmpc2_checkpoint(path, export.config, export.params, export.target_q_params, key_format=key_format)
    lines = [size_table(stored, export, bytes_on_disk(src), bytes_on_disk(path)),
             f"wrote {os.path.abspath(path)} ({key_format} key format)"]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def inspect(path: str) -> str:
    """Parameter counts per module, dtypes and bytes (in memory and on disk) of an export or a ``.pt``."""
    export = load_agent_stored(path)
    kind = "agent export" if os.path.isdir(path) else "official .pt"
    c = export.config
    lines = [f"{path}: {kind}",
             f"model: {c.task_set} {c.model_size}M (enc {c.enc_dim}, mlp {c.mlp_dim}, latent {c.latent_dim}, "
             f"{c.num_enc_layers} enc layers, {c.num_q} Qs, task_dim {c.task_dim})",
             f"{'module':14s} {'params':>10s} {'bytes':>12s}  dtypes"]
    d = transforms.describe(export.params)
    for mod, m in d["modules"].items():
        lines.append(f"{mod:14s} {m['params']:>10,d} {_mb(m['bytes'])}  {', '.join(m['dtypes'])}")
    if export.target_q_params is not None:
        t = transforms.describe({"Qs": export.target_q_params})
        lines.append(f"{'target Qs':14s} {t['params']:>10,d} {_mb(t['bytes'])}  "
                     f"{', '.join(t['modules']['Qs']['dtypes'])}")
    else:
        lines.append("target Qs: none")
    full = transforms.describe(_full_tree(export))
    lines.append(f"{'total':14s} {full['params']:>10,d} {_mb(full['bytes'])}  "
                 + ", ".join(f"{k}: {v / 1e6:.3f} MB" for k, v in sorted(full["dtypes"].items())))
    lines.append(f"learnable parameters (online): {d['params']:,d}; on disk: {bytes_on_disk(path) / 1e6:.3f} MB")
    if export.notes:
        lines += [f"note: {n}" for n in export.notes]
    return "\n".join(lines)

