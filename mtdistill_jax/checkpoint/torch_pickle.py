"""Torch-free, allow-list reader for PyTorch ``.pt`` checkpoints (the zip format of ``torch.save``).

``torch.save`` (torch >= 1.6) writes a zip archive with one top-level folder (any name) holding

* ``data.pkl``: a pickle of the saved object. Tensors are pickled as calls to
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``, or
  to ``_rebuild_tensor_v3(..., hooks, dtype[, metadata])`` for dtypes without a legacy storage class
  (``uint16``, ``float8``, ...). Parameters wrap that in ``torch._utils._rebuild_parameter``.
* ``data/<key>``: the raw bytes of every storage, referenced from the pickle by the persistent id
  ``('storage', <storage class>, key, location, numel)``. The storage class is a typed marker such as
  ``torch.FloatStorage`` (``numel`` counts elements) or ``torch.storage.UntypedStorage`` (``numel`` counts
  bytes).
* ``byteorder`` (``little``/``big``), ``version``, ``.format_version``, ``.storage_alignment`` and
  ``.data/serialization_id``, of which only ``byteorder`` matters here.

:func:`load_pt` unpickles ``data.pkl`` with an unpickler whose ``find_class`` only resolves a small allow-list
of globals (the tensor rebuild functions, storage/dtype markers, ``torch.Size``, ``collections.OrderedDict``),
so a crafted file can never run arbitrary code: anything else raises :class:`UnsafePickleError` before it is
called. Tensors come back as contiguous :class:`numpy.ndarray` copies (``bfloat16``/``float8`` via
``ml_dtypes``), ``torch.Size`` as a plain tuple of ints. Damaged or unsupported files raise
:class:`CheckpointFormatError`.
"""

from __future__ import annotations

import collections
import io
import operator
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from mtdistill_jax.errors import UserError

__all__ = ["CheckpointFormatError", "UnsafePickleError", "load_pt"]


class UnsafePickleError(UserError):
    """The checkpoint's pickle references a global outside the allow-list; nothing of it was executed."""


class CheckpointFormatError(UserError):
    """The file is not a readable PyTorch zip checkpoint (truncated, corrupted or of an unsupported kind)."""


class _StorageType:
    """Stand-in for a torch storage class (``torch.FloatStorage``, ``torch.storage.UntypedStorage``, ...).

    It only tells ``persistent_load`` how to interpret a storage record; it is deliberately not callable.
    """

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object, as passed to ``_rebuild_tensor_v3``; not callable."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<dtype torch.{self.name}>"


_LEGACY_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

_STORAGE_TYPES: dict[tuple[str, str], _StorageType] = {
    ("torch", name): _StorageType(f"torch.{name}", np.dtype(dt))
    for name, dt in _LEGACY_STORAGE_DTYPES.items()
}
_STORAGE_TYPES[("torch.storage", "UntypedStorage")] = _StorageType(
    "torch.storage.UntypedStorage", np.dtype(np.uint8)
)
_STORAGE_TYPES[("torch", "UntypedStorage")] = _StorageType("torch.UntypedStorage", np.dtype(np.uint8))

_TORCH_DTYPES: dict[tuple[str, str], _TorchDtype] = {
    ("torch", name): _TorchDtype(name, np.dtype(dt))
    for name, dt in {
        "float32": np.float32,
        "float64": np.float64,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "int64": np.int64,
        "int32": np.int32,
        "int16": np.int16,
        "int8": np.int8,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
        "complex64": np.complex64,
        "complex128": np.complex128,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
        "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
        "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    }.items()
}

_MAX_NAME_IN_MESSAGE = 200


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    """Stand in for ``torch.Size``: return a plain tuple of ints."""
    return tuple(operator.index(d) for d in dims)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_native_order(arr: np.ndarray) -> np.ndarray:
    """Byte-swap an array whose buffer holds big-endian values into native (little-endian) values."""
    if arr.dtype.itemsize == 1:
        return arr
    if arr.dtype.kind in "biufc":
        return arr.byteswap()  # complex: numpy swaps the real and imaginary parts separately
    # ml_dtypes types (bfloat16, ...) are single scalars of itemsize bytes.
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}")).byteswap().view(arr.dtype)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that resolves only allow-listed globals and reads storages from the zip."""

    def __init__(
        self,
        file: BinaryIO,
        *,
        archive: zipfile.ZipFile,
        prefix: str,
        source: str,
        big_endian: bool,
        extra_globals: Mapping[tuple[str, str], Callable[..., Any]] | None,
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._prefix = prefix
        self._source = source
        self._big_endian = big_endian
        self._raw: dict[str, bytearray] = {}
        self._typed: dict[tuple[str, str], np.ndarray] = {}
        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch", "Size"): _torch_size,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            **_STORAGE_TYPES,
            **_TORCH_DTYPES,
        }
        if extra_globals:
            for key, value in extra_globals.items():
                if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
                    raise TypeError(f"extra_globals keys must be (module, name) string pairs, got {key!r}")
                self._globals[key] = value

    # -- pickle hooks ----------------------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is allow-listed; refuse everything else."""
        try:
            return self._globals[(module, name)]
        except (KeyError, TypeError):
            pass
        qualified = f"{module}.{name}"
        if len(qualified) > _MAX_NAME_IN_MESSAGE:
            qualified = qualified[:_MAX_NAME_IN_MESSAGE] + "..."
        raise UnsafePickleError(
            f"{self._source}: refused to load: its pickle references the global {qualified}, which is not "
            "on the allow-list of this torch-free reader; the file was refused without executing it. "
            "If you trust the file and that object is harmless, allow it via extra_globals."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        """Turn a ``('storage', storage_type, key, location, numel)`` id into a 1-D native-order array."""
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise self._error(f"unsupported persistent id {_short_repr(pid)} in data.pkl")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise self._error(f"persistent id {_short_repr(pid)} does not name a storage class")
        if not isinstance(key, str) or not key or not isinstance(location, str):
            raise self._error(f"persistent id {_short_repr(pid)} has a malformed storage key or location")
        if not _is_int(numel) or numel < 0:
            raise self._error(f"persistent id {_short_repr(pid)} has an invalid element count")
        cached = self._typed.get((key, storage_type.name))
        if cached is not None and cached.size == numel:
            return cached
        raw = self._read_storage(key, numel * storage_type.dtype.itemsize, storage_type.name, numel)
        arr = np.frombuffer(raw, dtype=storage_type.dtype)
        if self._big_endian:
            arr = _to_native_order(arr)
        self._typed[(key, storage_type.name)] = arr
        return arr

    # -- allow-listed callables ------------------------------------------------------------------------------

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> np.ndarray:
        """``torch._utils._rebuild_tensor_v2``: a contiguous copy of the strided view of a typed storage."""
        del requires_grad, backward_hooks, metadata  # no autograd / python-side tensor state in numpy
        if not isinstance(storage, np.ndarray) or storage.ndim != 1:
            raise self._error(f"_rebuild_tensor_v2 got {_short_repr(storage)} instead of a storage")
        return self._strided_copy(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> np.ndarray:
        """``torch._utils._rebuild_tensor_v3``: like v2, but on an untyped (byte) storage plus a dtype."""
        del requires_grad, backward_hooks, metadata
        if not isinstance(dtype, _TorchDtype):
            raise self._error(f"_rebuild_tensor_v3 got {_short_repr(dtype)} instead of a torch dtype")
        if not isinstance(storage, np.ndarray) or storage.ndim != 1 or storage.dtype != np.uint8:
            raise self._error(f"_rebuild_tensor_v3 got {_short_repr(storage)} instead of an untyped storage")
        if storage.nbytes % dtype.dtype.itemsize:
            raise self._error(
                f"untyped storage of {storage.nbytes} bytes is not a whole number of "
                f"torch.{dtype.name} elements"
            )
        out = self._strided_copy(storage.view(dtype.dtype), storage_offset, size, stride)
        return _to_native_order(out) if self._big_endian else out

    @staticmethod
    def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
        """``torch._utils._rebuild_parameter``: a parameter is just its tensor here."""
        del requires_grad, backward_hooks
        return data

    # -- helpers --------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Drop the storage caches and the bound-method globals (a reference cycle with ``self``)."""
        self._raw.clear()
        self._typed.clear()
        self._globals.clear()

    def _error(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self._source}: {what}")

    def _read_storage(self, key: str, nbytes: int, type_name: str, numel: int) -> bytearray:
        """Read ``<prefix>/data/<key>`` (once), checking it holds exactly ``nbytes`` bytes."""
        record = f"{self._prefix}data/{key}"
        described = f"storage record '{record}' ({type_name}, {numel} elements = {nbytes} bytes)"
        raw = self._raw.get(key)
        if raw is None:
            try:
                info = self._archive.getinfo(record)
            except KeyError:
                raise self._error(f"{described} is missing from the archive") from None
            if info.file_size != nbytes:
                raise self._error(f"{described} holds {info.file_size} bytes instead")
            raw = bytearray(nbytes)
            try:
                with self._archive.open(info) as fh:
                    got = fh.readinto(raw)
                    if fh.read(1):
                        got += 1
            except _ZIP_READ_ERRORS as exc:
                raise self._error(f"cannot read {described}: {exc} (truncated or corrupted file?)") from exc
            if got != nbytes:
                raise self._error(f"{described} is truncated: only {got} bytes could be read")
            self._raw[key] = raw
        elif len(raw) != nbytes:
            raise self._error(f"{described} was already read with {len(raw)} bytes (inconsistent size)")
        return raw

    def _strided_copy(self, storage: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
        """Return a C-contiguous copy of ``storage`` viewed with torch ``offset``/``size``/``stride``."""
        if not _is_int(offset) or offset < 0:
            raise self._error(f"invalid tensor storage offset {_short_repr(offset)}")
        if not isinstance(size, (tuple, list)) or not all(_is_int(n) and n >= 0 for n in size):
            raise self._error(f"invalid tensor size {_short_repr(size)}")
        if (
            not isinstance(stride, (tuple, list))
            or len(stride) != len(size)
            or not all(_is_int(s) and s >= 0 for s in stride)
        ):
            raise self._error(f"invalid tensor stride {_short_repr(stride)} for size {_short_repr(size)}")
        shape = tuple(size)
        if 0 in shape:
            return np.zeros(shape, dtype=storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if last >= storage.size:
            raise self._error(
                f"tensor view (offset {offset}, size {shape}, stride {tuple(stride)}) reaches element "
                f"{last}, beyond its storage of {storage.size} elements"
            )
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], shape=shape, strides=tuple(s * itemsize for s in stride), writeable=False
        )
        return view.copy(order="C")


_ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    NotImplementedError,
    RuntimeError,
)

_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    struct.error,
)


def _short_repr(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= _MAX_NAME_IN_MESSAGE else text[:_MAX_NAME_IN_MESSAGE] + "..."


def _open_source(path_or_bytes: Any) -> tuple[str, BinaryIO, bool]:
    """Return ``(name for messages, seekable binary file, whether we own it)``."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return "<bytes>", io.BytesIO(bytes(path_or_bytes)), True
    if isinstance(path_or_bytes, (str, os.PathLike)):
        path = os.fspath(path_or_bytes)
        return str(path), open(path, "rb"), True
    if hasattr(path_or_bytes, "read") and hasattr(path_or_bytes, "seek"):
        return str(getattr(path_or_bytes, "name", "<file object>")), path_or_bytes, False
    raise TypeError(
        f"load_pt expects a path, bytes or a binary file object, got {type(path_or_bytes).__name__}"
    )


def _refuse_non_zip(source: str, head: bytes) -> CheckpointFormatError:
    """Build the error for a file that is not a zip archive, recognising the legacy torch formats."""
    if not head:
        return CheckpointFormatError(f"{source}: the file is empty, not a PyTorch checkpoint")
    legacy = "legacy torch serialization not supported; re-save with torch>=1.6"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return CheckpointFormatError(
            f"{source}: not a zip archive but a raw pickle, as written by torch<1.6 or with "
            f"_use_new_zipfile_serialization=False; {legacy} (default settings)"
        )
    if head[257:262] == b"ustar":
        return CheckpointFormatError(f"{source}: a tar archive (the pre-1.0 torch format); {legacy}")
    return CheckpointFormatError(
        f"{source}: not a PyTorch checkpoint: not a zip archive (starts with {head[:8]!r})"
    )


def _find_prefix(source: str, archive: zipfile.ZipFile) -> str:
    """Return the folder prefix (``'name/'`` or ``''``) under which ``data.pkl`` lives."""
    names = archive.namelist()
    candidates = [n[: -len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    candidates = [p for p in candidates if p == "" or (p.endswith("/") and p.count("/") == 1)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise CheckpointFormatError(
            f"{source}: zip archive has no '<folder>/data.pkl' record, so it is not a torch.save checkpoint "
            f"(records: {shown or 'none'})"
        )
    first_top = names[0].split("/", 1)[0] + "/"
    if first_top in candidates:
        return first_top
    raise CheckpointFormatError(f"{source}: zip archive holds several data.pkl records: {candidates}")


def _read_member(source: str, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except _ZIP_READ_ERRORS as exc:
        raise CheckpointFormatError(
            f"{source}: cannot read record '{name}': {exc} (truncated or corrupted file?)"
        ) from exc


def _load_from_file(
    source: str, fobj: BinaryIO, extra_globals: Mapping[tuple[str, str], Callable[..., Any]] | None
) -> Any:
    start = fobj.tell()
    head = fobj.read(512)
    fobj.seek(start)
    if head[:2] != b"PK":
        raise _refuse_non_zip(source, head)
    try:
        archive = zipfile.ZipFile(fobj)
    except _ZIP_READ_ERRORS as exc:
        raise CheckpointFormatError(
            f"{source}: truncated or corrupted checkpoint file: it starts like a zip archive but cannot be "
            f"opened as one ({exc})"
        ) from exc
    with archive:
        prefix = _find_prefix(source, archive)
        byteorder_record = f"{prefix}byteorder"
        big_endian = False
        if byteorder_record in set(archive.namelist()):
            order = _read_member(source, archive, byteorder_record).decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointFormatError(f"{source}: '{byteorder_record}' holds {order!r}, not little/big")
            big_endian = order == "big"
        data_pkl = _read_member(source, archive, f"{prefix}data.pkl")
        unpickler = _TorchUnpickler(
            io.BytesIO(data_pkl),
            archive=archive,
            prefix=prefix,
            source=source,
            big_endian=big_endian,
            extra_globals=extra_globals,
        )
        try:
            return unpickler.load()
        except (UnsafePickleError, CheckpointFormatError):
            raise
        except _UNPICKLE_ERRORS as exc:
            raise CheckpointFormatError(
                f"{source}: '{prefix}data.pkl' is not a valid torch checkpoint pickle: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            unpickler.release()


def load_pt(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
    *,
    extra_globals: Mapping[tuple[str, str], Callable[..., Any]] | None = None,
) -> Any:
    """Load a ``torch.save`` zip checkpoint without torch and without executing code from the file.

    Args:
        path_or_bytes: a filesystem path, the file's content as bytes, or a seekable binary file object.
        extra_globals: additional ``(module, name) -> object`` pairs the pickle may reference (e.g.
            reducers of container classes); they take precedence over the built-in allow-list. Only pass
            objects that are safe to call with arbitrary arguments.

    Returns:
        The unpickled object. Every tensor (and parameter) becomes a C-contiguous :class:`numpy.ndarray`
        copy with the tensor's dtype (``bfloat16``/``float8`` through ``ml_dtypes``), shape, strides and
        storage offset honoured; a bare storage becomes a 1-D array (``uint8`` for an untyped storage);
        ``torch.Size`` becomes a tuple of ints; dicts, ``OrderedDict``, lists, tuples, ``None``, numbers
        and strings stay as they are.

    Raises:
        UnsafePickleError: the pickle references a global outside the allow-list.
        CheckpointFormatError: the file is empty, not a zip, a legacy (pre-1.6) torch file, truncated or
            corrupted, lacks ``data.pkl`` or a storage record, or a storage has the wrong size.
    """
    source, fobj, owned = _open_source(path_or_bytes)
    try:
        return _load_from_file(source, fobj, extra_globals)
    finally:
        if owned:
            fobj.close()
