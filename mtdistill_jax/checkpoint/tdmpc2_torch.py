"""Import official PyTorch TD-MPC2 checkpoints (``{"model": state_dict}``) as a config + Flax params.

Both key formats are read:

- current (HEAD, ``api_model_conversion`` output): ``_Qs.params.{layer}.{weight,bias,ln.weight,ln.bias}``,
  ``_target_Qs_params.{layer}.{...}`` (plus ``_detach_Qs_params.*``, ``_action_masks``, ``log_std_*``);
- release era (the published checkpoints): ``_Qs.params.{0..9}`` and ``_target_Qs.params.{0..9}``, index
  ``n`` being layer ``n // 4``, field ``['weight', 'bias', 'ln.weight', 'ln.bias'][n % 4]``.

Files are read by :mod:`mtdistill_jax.checkpoint.torch_pickle`, an allow-list unpickler that never runs
code from the file; torch itself is not needed. Torch Linear weights ``[out, in]`` become Flax kernels
``[in, out]``; Q-ensemble tensors keep the head as their leading axis.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from mtdistill_jax.configs.model_sizes import MODEL_SIZES, get_model_config
from mtdistill_jax.configs.tasks import TASK_SETS, get_task_set
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import abstract_params, action_masks, make_world_model

FIELDS = ("weight", "bias", "ln.weight", "ln.bias")
_FLAX_FIELD = {"weight": "kernel", "bias": "bias", "ln.weight": "ln_scale", "ln.bias": "ln_bias"}
# flax module name -> torch module prefix
_MODULES = {"encoder": "_encoder.state", "dynamics": "_dynamics", "reward_head": "_reward", "pi_head": "_pi"}


class CheckpointMismatchError(UserError):
    """A state dict that does not describe a TD-MPC2 world model of a known size (names key and shape)."""


@dataclasses.dataclass
class ImportedCheckpoint:
    """Result of :func:`load_tdmpc2_checkpoint`."""

    config: ml_collections.ConfigDict  # model config (size, task set, widths)
    params: dict  # Flax params of WorldModel (online networks)
    target_q_params: dict | None  # target Q-ensemble params (same tree as params['Qs']), None if absent
    key_format: str  # 'current' or 'release'
    source_dtype: str  # dtype of the floating tensors in the file, e.g. 'float16'
    notes: list[str]  # things the importer did that a user should know


def _detect_format(sd: Mapping[str, Any]) -> str:
    if any(re.fullmatch(r"_Qs\.params\.\d+\.(weight|bias|ln\.weight|ln\.bias)", k) for k in sd):
        return "current"
    if any(re.fullmatch(r"_Qs\.params\.\d+", k) for k in sd):
        return "release"
    raise CheckpointMismatchError(
        "no Q-ensemble keys found: expected '_Qs.params.<layer>.weight' (current format) or "
        "'_Qs.params.<n>' (release format); is this a TD-MPC2 world-model state dict?")


def _q_key(prefix: str, layer: int, field: str, fmt: str) -> str:
    """Key of a Q tensor; ``prefix`` is 'online' or 'target'."""
    if fmt == "current":
        base = "_Qs.params" if prefix == "online" else "_target_Qs_params"
        return f"{base}.{layer}.{field}"
    base = "_Qs.params" if prefix == "online" else "_target_Qs.params"
    return f"{base}.{4 * layer + FIELDS.index(field)}"


def _shape(sd, key):
    v = sd.get(key)
    return None if v is None else tuple(np.shape(v))


def infer_model_config(sd: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Model size and task set from the tensor shapes of a state dict (either key format)."""
    emb = _shape(sd, "_task_emb.weight")
    if emb is None or len(emb) != 2:
        raise CheckpointMismatchError("missing key '_task_emb.weight' [num_tasks, task_dim]: only multi-task "
                                      "(MT30/MT80) checkpoints are supported")
    num_tasks, task_dim = emb
    matches = [ts for ts in TASK_SETS.values() if ts.num_tasks == num_tasks]
    if not matches:
        raise CheckpointMismatchError(
            f"'_task_emb.weight' has {num_tasks} rows; known task sets: "
            + ", ".join(f"{t.name} ({t.num_tasks} tasks)" for t in TASK_SETS.values()))
    ts = matches[0]
    enc_layers = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"_encoder\.state\.(\d+)\.weight", k))})
    dyn0, dyn_last = _shape(sd, "_dynamics.0.weight"), _shape(sd, "_dynamics.2.weight")
    enc0 = _shape(sd, "_encoder.state.0.weight")
    if not enc_layers or dyn0 is None or dyn_last is None or enc0 is None:
        raise CheckpointMismatchError("missing encoder/dynamics weights ('_encoder.state.0.weight', "
                                      "'_dynamics.0.weight', '_dynamics.2.weight')")
    fmt = _detect_format(sd)
    q0 = _shape(sd, _q_key("online", 0, "weight", fmt))
    found = dict(enc_dim=enc0[0], mlp_dim=dyn0[0], latent_dim=dyn_last[0], num_enc_layers=len(enc_layers),
                 num_q=q0[0] if q0 else None, task_dim=task_dim)
    for size in MODEL_SIZES:
        cfg = get_model_config(size, ts.name)
        if all(cfg[k] == v for k, v in found.items()):
            return cfg
    raise CheckpointMismatchError(
        f"the shapes fit no official model size on {ts.name}: found {found}; expected one of "
        + "; ".join(f"{s}: " + str({k: get_model_config(s, ts.name)[k] for k in found}) for s in MODEL_SIZES))


def _expected_torch_shape(flax_shape, field, ensemble):
    if field == "weight":
        return (flax_shape[0], flax_shape[2], flax_shape[1]) if ensemble else (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def _fetch(sd, key, flax_shape, field, ensemble, dtype):
    expected = _expected_torch_shape(flax_shape, field, ensemble)
    if key not in sd:
        raise CheckpointMismatchError(f"missing key {key!r} (expected shape {list(expected)})")
    v = np.asarray(sd[key])
    if tuple(v.shape) != expected:
        raise CheckpointMismatchError(f"key {key!r} has shape {list(v.shape)}, expected {list(expected)}")
    if not np.issubdtype(v.dtype, np.floating) and v.dtype.name != "bfloat16":
        raise CheckpointMismatchError(f"key {key!r} has dtype {v.dtype}, expected a floating dtype")
    if field == "weight":
        v = np.swapaxes(v, -1, -2)
    return np.ascontiguousarray(v.astype(dtype))


def state_dict_to_params(sd: Mapping[str, Any], config: ml_collections.ConfigDict | None = None,
                         dtype=np.float32) -> ImportedCheckpoint:
    """Convert an official state dict (current or release key format) to Flax params.

    ``config`` fixes the model (else it is inferred from the shapes). Every expected key is checked:
    a missing key or a wrong shape raises :class:`CheckpointMismatchError` naming the key and the expected
    shape. Tensors are cast to ``dtype`` (``None`` keeps the file's dtype).
    """
    sd = dict(sd)
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = dict(sd["model"])
    fmt = _detect_format(sd)
    if config is None:
        config = infer_model_config(sd)
    abstract = abstract_params(make_world_model(config))
    floats = {np.asarray(v).dtype.name for v in sd.values() if isinstance(v, np.ndarray)
              and (np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16")}
    source_dtype = ",".join(sorted(floats)) or "unknown"
    notes: list[str] = []

    def convert(tree, torch_prefix, ensemble=False, qsource=None):
        out = {}
        for layer_name, leaves in tree.items():
            layer = int(layer_name.removeprefix("layer"))
            out[layer_name] = {}
            for field in FIELDS:
                flax_field = _FLAX_FIELD[field]
                if flax_field not in leaves:
                    continue
                key = (_q_key(qsource, layer, field, fmt) if ensemble else f"{torch_prefix}.{layer}.{field}")
                out[layer_name][flax_field] = _fetch(sd, key, leaves[flax_field].shape, field, ensemble,
                                                     dtype or np.asarray(sd.get(key, np.zeros(()))).dtype)
        return out

    params = {name: convert(abstract[name], prefix) for name, prefix in _MODULES.items()}
    emb_shape = abstract["task_emb"]["embedding"].shape
    params["task_emb"] = {"embedding": _fetch(sd, "_task_emb.weight", emb_shape, "bias", False,
                                              dtype or sd["_task_emb.weight"].dtype)}
    params["Qs"] = convert(abstract["Qs"], None, ensemble=True, qsource="online")
    has_target = _q_key("target", 0, "weight", fmt) in sd
    if has_target:
        target = convert(abstract["Qs"], None, ensemble=True, qsource="target")
    else:
        target = None
        notes.append("no target-Q tensors in the file")
    if "_action_masks" in sd:
        masks = np.asarray(sd["_action_masks"], np.float32)
        ours = action_masks(config.task_set)
        if masks.shape != ours.shape or not np.array_equal(masks, ours):
            raise CheckpointMismatchError(
                f"'_action_masks' {list(masks.shape)} differs from the {config.task_set} masks {list(ours.shape)}: "
                "the checkpoint uses another task order or action padding")
    for k, expected in (("log_std_min", config.log_std_min), ("log_std_dif", config.log_std_max - config.log_std_min)):
        if k in sd and float(np.asarray(sd[k])) != float(expected):
            raise CheckpointMismatchError(f"{k!r} is {float(np.asarray(sd[k]))}, the config says {expected}")
    return ImportedCheckpoint(config=config, params=params, target_q_params=target, key_format=fmt,
                              source_dtype=source_dtype, notes=notes)


def load_tdmpc2_checkpoint(path: str | os.PathLike, *, model_size: int | None = None, task_set: str | None = None,
                           dtype=np.float32) -> ImportedCheckpoint:
    """Read an official TD-MPC2 ``.pt`` safely and return config + Flax params.

    ``model_size``/``task_set`` may be given to fix the model; otherwise they are inferred from the shapes
    (both must be given together, or neither). The file is never unpickled with arbitrary code execution.
    """
    from mtdistill_jax.checkpoint.torch_pickle import load_pt

    if (model_size is None) != (task_set is None):
        raise UserError("give both model_size and task_set, or neither (then they are inferred)")
    obj = load_pt(path)
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{os.fspath(path)}: expected a dict, found {type(obj).__name__}")
    sd = obj.get("model", obj)
    config = None if model_size is None else get_model_config(model_size, get_task_set(task_set).name)
    try:
        return state_dict_to_params(sd, config, dtype)
    except CheckpointMismatchError as e:
        forced = "" if config is None else (f" (it does not fit the given model size {model_size} on "
                                            f"{config.task_set}; give neither to infer them from the shapes)")
        raise CheckpointMismatchError(f"{os.fspath(path)}: {e}{forced}") from None


# --------------------------------------------------------------------------------------------- export to torch
TORCH_FORMATS = ("current", "release")


def _torch_layers(tree: Mapping[str, Any]):
    """``(layer index, {torch field: array})`` of a module's Flax tree in layer order; weights transposed back
    to torch's ``[out, in]`` (``[members, out, in]`` for the Q-ensemble)."""
    for layer_name in sorted(tree, key=lambda n: int(n.removeprefix("layer"))):
        leaves = tree[layer_name]
        fields = {}
        for field in FIELDS:
            if _FLAX_FIELD[field] in leaves:
                v = np.asarray(leaves[_FLAX_FIELD[field]])
                fields[field] = np.ascontiguousarray(np.swapaxes(v, -1, -2) if field == "weight" else v)
        yield int(layer_name.removeprefix("layer")), fields


def params_to_state_dict(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                         target_q_params: Mapping[str, Any] | None = None, *,
                         key_format: str = "current") -> collections.OrderedDict[str, Any]:
    """Official ``WorldModel.state_dict()`` (as numpy arrays) from Flax params: the inverse of the importer.

    ``key_format='current'`` gives exactly the entries, order, dtypes and shapes that the official HEAD code's
    ``TDMPC2.save`` writes (action masks, ``log_std_*`` buffers, online/detach/target Q tensordicts with their
    ``__batch_size``/``__device`` entries); ``'release'`` the release-era layout (``_Qs.params.0..9``,
    ``_target_Qs.params.0..9``). Without ``target_q_params`` the online Qs are written as targets.
    Floating tensors keep the params' dtype.
    """
    if key_format not in TORCH_FORMATS:
        raise UserError(f"unknown key_format {key_format!r}; valid: {', '.join(TORCH_FORMATS)}")
    target_q_params = params["Qs"] if target_q_params is None else target_q_params
    sd: collections.OrderedDict[str, Any] = collections.OrderedDict()
    if key_format == "current":
        # a buffer of the module: it follows the module's dtype (model.half() casts it too)
        sd["_action_masks"] = action_masks(config.task_set).astype(np.asarray(params["task_emb"]["embedding"]).dtype)
        for name, value in (("log_std_min", config.log_std_min),
                            ("log_std_dif", config.log_std_max - config.log_std_min)):
            sd[name] = np.asarray(int(value) if float(value).is_integer() else value,
                                  np.int64 if float(value).is_integer() else np.float32)
    sd["_task_emb.weight"] = np.asarray(params["task_emb"]["embedding"])
    for flax_name, prefix in _MODULES.items():
        for layer, fields in _torch_layers(params[flax_name]):
            for field, v in fields.items():
                sd[f"{prefix}.{layer}.{field}"] = v

    def q_entries(tree):
        return {(layer, field): v for layer, fields in _torch_layers(tree) for field, v in fields.items()}

    online, target = q_entries(params["Qs"]), q_entries(target_q_params)
    if key_format == "current":
        for base, entries in (("_Qs.params", online), ("_detach_Qs_params", online), ("_target_Qs_params", target)):
            for (layer, field), v in entries.items():
                sd[f"{base}.{layer}.{field}"] = v
            sd[f"{base}.__batch_size"] = (int(config.num_q),)
            sd[f"{base}.__device"] = None
    else:
        for which, entries in (("online", online), ("target", target)):
            for (layer, field), v in entries.items():
                sd[_q_key(which, layer, field, "release")] = v
    return sd


def save_tdmpc2_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict, params: Mapping[str, Any],
                           target_q_params: Mapping[str, Any] | None = None, *, key_format: str = "current") -> str:
    """Write ``{"model": state_dict}`` with ``torch.save``, as the official ``TDMPC2.save`` does.

    Needs torch (``pip install 'mtdistill-jax[torch]'``). The file loads with ``torch.load(weights_only=True)``
    and with the official ``TDMPC2.load``.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("writing an official .pt needs torch: pip install 'mtdistill-jax[torch]' "
                          "(pinned CPU build torch==2.13.0)") from None
    sd = params_to_state_dict(config, params, target_q_params, key_format=key_format)

    def to_torch(v):
        if v is None:
            return None
        if isinstance(v, tuple):
            return torch.Size(v)
        v = np.asarray(v)
        if v.dtype.name == "bfloat16":
            return torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(v.copy())

    out = collections.OrderedDict((k, to_torch(v)) for k, v in sd.items())
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": out}, path)
    return path
