"""Agent exports: the params of a world model plus its network config, and nothing of training.

An export is a directory::

    agent.json        {"format": "mtdistill-agent", "version": 1, "model_config": {...}, "dtype": "float16",
                       "has_target_q": true, "param_count": 1426427, "source": "...", "notes": [...]}
    params/           orbax checkpoint of {"params": <WorldModel tree>, "target_q_params": <Qs tree>}

``dtype`` is the storage dtype: ``float32``/``bfloat16``/``float16`` (every floating leaf in that dtype) or
``int8`` (weight-only, see :mod:`mtdistill_jax.checkpoint.transforms`). :func:`load_agent` rebuilds the
model config and returns compute-ready params (int8 kernels dequantised, floats cast to the compute dtype),
so the evaluator and the distiller load students without any training code. It also accepts an official
TD-MPC2 ``.pt`` file directly (read through the safe importer).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from typing import Any

import ml_collections
import numpy as np

from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.configs.model_sizes import check_model_config, get_model_config
from mtdistill_jax.errors import UserError

FORMAT, VERSION = "mtdistill-agent", 1
META_FILE, PARAMS_DIR = "agent.json", "params"


class ExportError(UserError):
    """A path that is not a readable agent export (or an export that does not fit its config)."""


@dataclasses.dataclass
class AgentExport:
    """Params + network config of one agent, as stored (``dtype``) or after :func:`load_agent` (compute dtype)."""

    config: ml_collections.ConfigDict  # model config (see configs/model_sizes.py)
    params: dict  # WorldModel params (online networks)
    target_q_params: dict | None = None  # target Q-ensemble (tree of params['Qs']); None if not kept
    dtype: str = "float32"  # storage dtype: float32 / bfloat16 / float16 / int8
    source: str = ""  # where the params came from (a path, a run, a conversion)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def param_count(self) -> int:
        return transforms.describe(self.params)["params"]


def model_config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def model_config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """Rebuild a locked model config; unknown or missing fields raise a ``ValueError`` naming them."""
    try:
        config = get_model_config(int(d["model_size"]), d["task_set"])
    except KeyError as e:
        raise ExportError(f"model config lacks field {e.args[0]!r}") from None
    unknown = sorted(set(d) - set(config.keys()))
    if unknown:
        raise ExportError(f"model config has unknown fields {unknown}; known: {sorted(config.keys())}")
    with config.unlocked():
        for k, v in d.items():
            try:
                config[k] = type(config[k])(v)
            except (TypeError, ValueError):
                raise ExportError(f"model config field {k} is {v!r}, expected a {type(config[k]).__name__}") from None
    check_model_config(config)
    return config


def _storage_dtype(params) -> str:
    if transforms.is_quantized(params):
        return "int8"
    names = {np.asarray(x).dtype.name for x in _leaves(params) if transforms._is_float(x)}
    if len(names) == 1:
        return names.pop()
    raise ExportError(f"params mix floating dtypes {sorted(names)}; cast them with transforms.cast_params first")


def _leaves(tree):
    out = []
    transforms.walk(tree, lambda path, x: out.append(x))
    return out


def _to_numpy(tree):
    return transforms.walk(tree, lambda path, x: np.asarray(x))


def save_agent(path: str | os.PathLike, export: AgentExport, *, overwrite: bool = False) -> str:
    """Write ``export`` to the directory ``path`` (refuses to replace an existing one unless ``overwrite``)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        if not is_agent_dir(path):
            raise ExportError(f"{path} exists and is not an agent export; refusing to delete it")
        shutil.rmtree(path)
    params = _to_numpy(export.params)
    dtype = _storage_dtype(params)
    tree = {"params": params}
    if export.target_q_params is not None:
        tree["target_q_params"] = _to_numpy(export.target_q_params)
    os.makedirs(path)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, PARAMS_DIR), tree)
        ckpt.wait_until_finished()
    meta = {"format": FORMAT, "version": VERSION, "model_config": model_config_to_dict(export.config),
            "dtype": dtype, "has_target_q": export.target_q_params is not None,
            "param_count": transforms.describe(params)["params"], "source": export.source, "notes": export.notes}
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def is_agent_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def _require_exists(path: str | os.PathLike) -> None:
    if not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    _require_exists(path)
    if not is_agent_dir(path):
        raise ExportError(f"{path} is not an agent export (no {META_FILE}); convert a .pt with "
                          "`python launch/convert.py --from_torch=FILE --out=DIR`")
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}/{META_FILE} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}/{META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ExportError(f"{path}: export version {meta['version']} is newer than this library's {VERSION}")
    missing = [k for k in ("model_config", "dtype") if k not in meta]
    if missing:
        raise ExportError(f"{path}/{META_FILE} lacks {missing}")
    return meta


def from_torch_file(path: str | os.PathLike, *, model_size: int | None = None, task_set: str | None = None,
                    copy_missing_targets: bool = False) -> AgentExport:
    """An official TD-MPC2 ``.pt`` as an :class:`AgentExport` in the file's dtype (safe importer, no torch).

    With ``copy_missing_targets`` a file without target-Q tensors gets the online Qs as targets (and a note
    saying so); otherwise ``target_q_params`` stays None.
    """
    from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint

    ck = load_tdmpc2_checkpoint(path, model_size=model_size, task_set=task_set, dtype=None)
    notes = [f"imported from {os.path.basename(os.fspath(path))} ({ck.key_format} key format, {ck.source_dtype})"]
    target = ck.target_q_params
    if target is None and copy_missing_targets:
        target = {k: dict(v) for k, v in ck.params["Qs"].items()}
        notes.append("the file has no target-Q tensors: the online Qs were copied as target Qs")
    else:
        notes += ck.notes
    return AgentExport(config=ck.config, params=ck.params, target_q_params=target, dtype=ck.source_dtype,
                       source=os.path.abspath(os.fspath(path)), notes=notes)


def load_agent_stored(path: str | os.PathLike) -> AgentExport:
    """The agent exactly as stored: an export directory (int8 leaves stay quantised, floats keep their storage
    dtype) or an official ``.pt`` (its tensors in the file's dtype).

    A missing path raises ``FileNotFoundError``; a directory that is no export, or whose params do not fit its
    config, :class:`ExportError`; a ``.pt`` that cannot be read or fits no model the
    :class:`~mtdistill_jax.errors.UserError` subclasses of the safe importer."""
    import orbax.checkpoint as ocp

    _require_exists(path)
    if os.path.isfile(os.fspath(path)):
        return from_torch_file(path)
    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    config = model_config_from_dict(meta["model_config"])
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(os.path.join(path, PARAMS_DIR))
    except Exception as e:  # orbax raises many kinds; say which file and why
        raise ExportError(f"{path}/{PARAMS_DIR}: could not read the params ({type(e).__name__}: {e})") from None
    tree = _to_numpy(tree)
    export = AgentExport(config=config, params=tree["params"], target_q_params=tree.get("target_q_params"),
                         dtype=meta["dtype"], source=meta.get("source", ""), notes=list(meta.get("notes", [])))
    _check_against_config(export, path)
    return export


def _check_against_config(export: AgentExport, where: str) -> None:
    """Every tensor must have the shape the config implies (names the first one that does not)."""
    from mtdistill_jax.nn.world_model import abstract_params, make_world_model

    expected = abstract_params(make_world_model(export.config))
    got = transforms.to_compute(export.params) if transforms.is_quantized(export.params) else export.params

    def compare(exp, have, path=""):
        if set(exp) != set(have):
            raise ExportError(f"{where}: params at {path or '/'} have keys {sorted(have)}, the config implies "
                              f"{sorted(exp)}")
        for k in exp:
            if isinstance(exp[k], dict):
                compare(exp[k], have[k], f"{path}/{k}")
            elif tuple(exp[k].shape) != tuple(np.shape(have[k])):
                raise ExportError(f"{where}: tensor {path}/{k} has shape {list(np.shape(have[k]))}, the config "
                                  f"implies {list(exp[k].shape)}")

    compare(expected, got)
    if export.target_q_params is not None:
        tq = export.target_q_params
        compare(expected["Qs"], transforms.to_compute(tq) if transforms.is_quantized(tq) else tq, "/target_Qs")


def to_compute(export: AgentExport, dtype: str = "float32") -> AgentExport:
    """The same agent with params ready for the model: int8 kernels dequantised, floats cast to ``dtype``
    (``export.dtype`` still says how it was stored)."""
    target = None if export.target_q_params is None else transforms.to_compute(export.target_q_params, dtype)
    return dataclasses.replace(export, params=transforms.to_compute(export.params, dtype), target_q_params=target)


def load_agent(path: str | os.PathLike, *, dtype: str = "float32") -> AgentExport:
    """Load an agent export directory (or an official TD-MPC2 ``.pt``) with compute-ready params."""
    return to_compute(load_agent_stored(path), dtype)


def bytes_on_disk(path: str | os.PathLike) -> int:
    """Total size of a file or of every file under a directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
