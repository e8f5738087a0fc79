"""Tests for the torch-free ``.pt`` reader :mod:`mtdistill_jax.checkpoint.torch_pickle`.

Most tests build ``.pt`` zips by hand (with the tiny pickle-opcode writer below), so they need no torch;
the round-trip and reference-file tests use torch (skipped when it is absent) as the ground truth.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from mtdistill_jax.checkpoint.torch_pickle import CheckpointFormatError, UnsafePickleError, load_pt

REFERENCE_DIR = Path(
    os.environ.get(
        "MTDISTILL_REFERENCE_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "reference"
    )
)
LEGACY_MESSAGE = r"legacy torch serialization not supported; re-save with torch>=1\.6"
REFERENCE_FILES = ["wm_mt30_size1_seed0.pt", "wm_mt30_size1_seed0_release.pt", "paper_student_fp16.pt"]


# ------------------------------------------------------------------------------------------------------------
# A minimal writer of torch-style pickles and zips (protocol 2 opcodes), so no torch is needed.
# ------------------------------------------------------------------------------------------------------------


class _PickleWriter:
    """Emit pickle opcodes by hand; enough to mimic what ``torch.save`` writes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = [b"\x80\x02"]  # PROTO 2

    def op(self, code: bytes) -> _PickleWriter:
        self.parts.append(code)
        return self

    def global_(self, module: str, name: str) -> _PickleWriter:
        return self.op(b"c" + f"{module}\n{name}\n".encode())

    def str_(self, text: str) -> _PickleWriter:
        data = text.encode()
        return self.op(b"X" + struct.pack("<I", len(data)) + data)

    def int_(self, value: int) -> _PickleWriter:
        return self.op(b"J" + struct.pack("<i", value))

    def ints(self, values: tuple[int, ...]) -> _PickleWriter:
        self.op(b"(")
        for v in values:
            self.int_(v)
        return self.op(b"t")

    def tensor(
        self,
        storage_cls: str,
        key: str,
        numel: int,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        *,
        rebuild: tuple[str, str] = ("torch._utils", "_rebuild_tensor_v2"),
    ) -> _PickleWriter:
        self.global_(*rebuild).op(b"(")
        self.op(b"(").str_("storage").global_("torch", storage_cls).str_(key).str_("cpu").int_(numel).op(b"t")
        self.op(b"Q")  # BINPERSID
        self.int_(offset).ints(shape).ints(stride).op(b"\x89")  # NEWFALSE (requires_grad)
        self.global_("collections", "OrderedDict").op(b")R")  # backward hooks
        return self.op(b"tR")

    def dict_(self, items: list[tuple[str, object]]) -> _PickleWriter:
        """Write a dict; values are callables that emit themselves."""
        self.op(b"}(")
        for key, emit in items:
            self.str_(key)
            emit(self)  # type: ignore[operator]
        return self.op(b"u")

    def getvalue(self) -> bytes:
        return b"".join(self.parts) + b"."


def _make_pt(
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    byteorder: bytes | None = b"little",
    with_data_pkl: bool = True,
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        if with_data_pkl:
            zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


_F32 = np.arange(12, dtype=np.float32) * 1.5 - 4.0
_BF16 = np.array([1.0, -2.5, 3.25, 65280.0], dtype=ml_dtypes.bfloat16)
_I64 = np.array([7, -3, 2**40], dtype=np.int64)


def _sample_pickle() -> bytes:
    """Pickle a dict of a [3,4] tensor, its transpose, an offset slice, a 0-d view, bf16, int64, Size."""
    w = _PickleWriter()
    w.dict_(
        [
            ("mat", lambda w: w.tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1))),
            ("mat_t", lambda w: w.tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4))),
            ("row_slice", lambda w: w.tensor("FloatStorage", "0", 12, 5, (2, 2), (4, 1))),
            ("scalar", lambda w: w.tensor("FloatStorage", "0", 12, 7, (), ())),
            ("bf16", lambda w: w.tensor("BFloat16Storage", "1", 4, 0, (4,), (1,))),
            ("i64", lambda w: w.tensor("LongStorage", "2", 3, 0, (3,), (1,))),
            ("empty", lambda w: w.tensor("LongStorage", "2", 3, 0, (0, 5), (5, 1))),
            ("size", lambda w: w.global_("torch", "Size").ints((2, 3)).op(b"\x85R")),
            ("none", lambda w: w.op(b"N")),
        ]
    )
    return w.getvalue()


def _sample_pt(*, big_endian: bool = False, byteorder: bytes | None = b"", **kwargs) -> bytes:
    """Build the sample file; ``byteorder`` overrides the record (``None`` drops it)."""
    order = ">" if big_endian else "<"
    storages = {
        "0": _F32.astype(f"{order}f4").tobytes(),
        "1": _BF16.view(np.uint16).astype(f"{order}u2").tobytes(),
        "2": _I64.astype(f"{order}i8").tobytes(),
    }
    if byteorder == b"":
        byteorder = b"big" if big_endian else b"little"
    return _make_pt(_sample_pickle(), storages, byteorder=byteorder, **kwargs)


def _check_sample(out: dict) -> None:
    mat = _F32.reshape(3, 4)
    expected = {
        "mat": mat,
        "mat_t": mat.T,
        "row_slice": mat[1:3, 1:3],
        "scalar": np.array(_F32[7]),
        "bf16": _BF16,
        "i64": _I64,
        "empty": np.zeros((0, 5), np.int64),
    }
    assert list(out) == [*expected, "size", "none"]
    for key, want in expected.items():
        got = out[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        assert got.flags.c_contiguous and got.flags.writeable, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    assert out["size"] == (2, 3) and type(out["size"]) is tuple
    assert out["none"] is None
    assert not np.shares_memory(out["mat"], out["mat_t"])


# ------------------------------------------------------------------------------------------------------------
# Hand-built files (no torch needed)
# ------------------------------------------------------------------------------------------------------------


def test_hand_built_file_bytes_path_and_fileobj(tmp_path: Path) -> None:
    raw = _sample_pt()
    _check_sample(load_pt(raw))
    path = tmp_path / "sample.pt"
    path.write_bytes(raw)
    _check_sample(load_pt(path))
    _check_sample(load_pt(str(path)))
    with path.open("rb") as fh:
        _check_sample(load_pt(fh))


def test_any_folder_name_and_big_endian() -> None:
    _check_sample(load_pt(_sample_pt(prefix="some_other_name")))
    _check_sample(load_pt(_sample_pt(big_endian=True)))


def test_missing_byteorder_record_means_little_endian() -> None:
    _check_sample(load_pt(_sample_pt(byteorder=None)))


def test_rebuild_parameter_and_untyped_storage_v3() -> None:
    values = np.array([1, 60000, 7], dtype=np.uint16)
    w = _PickleWriter()
    w.dict_(
        [
            (
                "param",
                lambda w: (
                    w.global_("torch._utils", "_rebuild_parameter")
                    .op(b"(")
                    .tensor("FloatStorage", "0", 12, 0, (12,), (1,))
                    .op(b"\x88")  # requires_grad=True
                    .global_("collections", "OrderedDict")
                    .op(b")RtR")
                ),
            ),
            (
                "u16",
                lambda w: (
                    w.global_("torch._utils", "_rebuild_tensor_v3")
                    .op(b"((")
                    .str_("storage")
                    .global_("torch.storage", "UntypedStorage")
                    .str_("1")
                    .str_("cpu")
                    .int_(6)
                    .op(b"tQ")
                    .int_(1)
                    .ints((2,))
                    .ints((1,))
                    .op(b"\x89")
                    .global_("collections", "OrderedDict")
                    .op(b")R")
                    .global_("torch", "uint16")
                    .op(b"tR")
                ),
            ),
        ]
    )
    out = load_pt(_make_pt(w.getvalue(), {"0": _F32.tobytes(), "1": values.tobytes()}))
    np.testing.assert_array_equal(out["param"], _F32)
    assert out["u16"].dtype == np.uint16
    np.testing.assert_array_equal(out["u16"], values[1:])


def test_extra_globals_allow_more() -> None:
    w = _PickleWriter().global_("my.module", "Box").str_("hi").op(b"\x85R")
    data = _make_pt(w.getvalue())
    with pytest.raises(UnsafePickleError, match=r"my\.module\.Box"):
        load_pt(data)
    assert load_pt(data, extra_globals={("my.module", "Box"): lambda x: ("boxed", x)}) == ("boxed", "hi")


# --- malicious pickles --------------------------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``, like a malicious ``__reduce__``."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _malicious_payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('pwned')"
    nested = collections.OrderedDict(a=1, b=[_Reduce(os.system, touch)])
    return {
        "os.system": pickle.dumps(_Reduce(os.system, touch), protocol=2),
        "os.system proto 5 (STACK_GLOBAL)": pickle.dumps(_Reduce(os.system, touch), protocol=5),
        "builtins.eval": pickle.dumps(_Reduce(builtins.eval, write), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(builtins.exec, write), protocol=4),
        "builtins.open": pickle.dumps(_Reduce(builtins.open, str(marker), "w"), protocol=2),
        "nested in an allowed OrderedDict": pickle.dumps({"model": nested}, protocol=2),
        "posix.system by hand": _PickleWriter()
        .global_("posix", "system")
        .str_(touch)
        .op(b"\x85R")
        .getvalue(),
        "rebuild lookalike in torch": _PickleWriter()
        .global_("torch", "_rebuild_tensor_v2")
        .str_(touch)
        .op(b"\x85R")
        .getvalue(),
        "torch._utils.os": _PickleWriter().global_("torch._utils", "os").getvalue(),
        "dotted-name lookalike": _PickleWriter()
        .global_("torch._utils", "_rebuild_tensor_v2.__globals__")
        .getvalue(),
    }


def test_malicious_globals_are_refused_without_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    for label, payload in _malicious_payloads(marker).items():
        with pytest.raises(UnsafePickleError, match="refused without executing") as info:
            load_pt(_make_pt(payload))
        assert "not on the allow-list" in str(info.value), label
        assert not marker.exists(), label
    assert list(tmp_path.iterdir()) == []


def test_unsafe_error_names_the_global(tmp_path: Path) -> None:
    payload = _PickleWriter().global_("posix", "system").str_("true").op(b"\x85R").getvalue()
    with pytest.raises(UnsafePickleError, match=r"posix\.system"):
        load_pt(_make_pt(payload))
    with pytest.raises(UnsafePickleError, match=r"(builtins|__builtin__)\.eval"):
        load_pt(_make_pt(pickle.dumps(_Reduce(builtins.eval, "1+1"), protocol=2)))


def test_raw_pickle_outside_a_zip_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    with pytest.raises(CheckpointFormatError, match="legacy torch serialization not supported"):
        load_pt(pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2))
    assert not marker.exists()


# --- damaged and unsupported files --------------------------------------------------------------------------


def test_empty_random_and_legacy_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="empty"):
        load_pt(b"")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match=r"empty\.pt.*empty"):
        load_pt(empty)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(CheckpointFormatError, match="not a zip archive"):
        load_pt(b"\x00" + noise)
    with pytest.raises(CheckpointFormatError, match="truncated or corrupted"):
        load_pt(b"PK\x03\x04" + noise)
    # torch<1.6 files start with the pickled magic number 0x1950a86a20f9469cfc6c.
    legacy = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    with pytest.raises(
        CheckpointFormatError, match=r"legacy torch serialization not supported; re-save with torch>=1\.6"
    ):
        load_pt(legacy)


def test_truncated_hand_built_file() -> None:
    raw = _sample_pt()
    for cut in (len(raw) // 2, len(raw) - 10, 30):
        with pytest.raises(CheckpointFormatError, match="truncated or corrupted"):
            load_pt(raw[:cut])


def test_zip_without_data_pkl() -> None:
    with pytest.raises(CheckpointFormatError, match=r"no '<folder>/data\.pkl'"):
        load_pt(_sample_pt(with_data_pkl=False))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/deeper/data.pkl", _sample_pickle())
    with pytest.raises(CheckpointFormatError, match=r"data\.pkl"):
        load_pt(buf.getvalue())


def test_missing_short_and_long_storage_records() -> None:
    pkl = _sample_pickle()
    good = {"0": _F32.tobytes(), "1": _BF16.tobytes(), "2": _I64.tobytes()}
    with pytest.raises(CheckpointFormatError, match=r"'archive/data/1' .* is missing"):
        load_pt(_make_pt(pkl, {k: v for k, v in good.items() if k != "1"}))
    with pytest.raises(
        CheckpointFormatError,
        match=r"'archive/data/0' \(torch\.FloatStorage, 12 elements = 48 bytes\) holds 40",
    ):
        load_pt(_make_pt(pkl, {**good, "0": good["0"][:40]}))
    with pytest.raises(CheckpointFormatError, match="holds 52 bytes"):
        load_pt(_make_pt(pkl, {**good, "0": good["0"] + b"\0" * 4}))


def test_corrupted_storage_bytes_fail_the_crc_check() -> None:
    raw = bytearray(_sample_pt())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = zf.getinfo("archive/data/0")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 3] ^= 0xFF
    with pytest.raises(CheckpointFormatError, match=r"cannot read storage record 'archive/data/0'.*CRC"):
        load_pt(bytes(raw))


def test_view_outside_its_storage_and_bad_byteorder() -> None:
    w = _PickleWriter().tensor("FloatStorage", "0", 12, 4, (3, 4), (4, 1))
    with pytest.raises(CheckpointFormatError, match="beyond its storage of 12 elements"):
        load_pt(_make_pt(w.getvalue(), {"0": _F32.tobytes()}))
    with pytest.raises(CheckpointFormatError, match="not little/big"):
        load_pt(_sample_pt(byteorder=b"middle"))


def test_garbage_data_pkl() -> None:
    with pytest.raises(CheckpointFormatError, match=r"data\.pkl' is not a valid torch checkpoint pickle"):
        load_pt(_make_pt(b"\x80\x02garbage"))
    with pytest.raises(CheckpointFormatError, match="unsupported persistent id"):
        load_pt(_make_pt(_PickleWriter().str_("nope").op(b"Q").getvalue()))


# ------------------------------------------------------------------------------------------------------------
# Round trips through torch.save and the reference checkpoints, against torch.load as ground truth
# ------------------------------------------------------------------------------------------------------------


def _assert_same(ours: object, theirs: object, where: str = "root") -> None:
    """Recursively compare a load_pt result with a torch.load result, tensors bit-exactly."""
    import torch

    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.shape == tuple(theirs.shape), where
        want_dtype = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}.get(theirs.dtype)
        if want_dtype is None:
            want_dtype = torch.empty(0, dtype=theirs.dtype).numpy().dtype
        assert ours.dtype == want_dtype, where
        assert ours.flags.c_contiguous, where
        their_bytes = theirs.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert ours.tobytes() == their_bytes, where
    elif isinstance(theirs, torch.Size):
        assert type(ours) is tuple and ours == tuple(theirs), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        for key in theirs:
            _assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def test_torch_save_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    inner = collections.OrderedDict(
        w=torch.randn(3, 5, generator=gen).half(),
        deeper=collections.OrderedDict(b=torch.tensor([True, False, True])),
    )
    obj = {
        "f32": base,
        "f64": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "f16": torch.randn(7, generator=gen).to(torch.float16),
        "bf16": torch.randn(2, 5, generator=gen).to(torch.bfloat16),
        "i64": torch.arange(-5, 5, dtype=torch.int64).reshape(2, 5),
        "i32": torch.tensor([2**31 - 1, -(2**31), 0], dtype=torch.int32),
        "i16": torch.tensor([-7, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True], [False]]),
        "transposed": base.t(),
        "slice": base[1:3, 2:5],
        "strided": base[::2, ::3],
        "zero_d": torch.tensor(3.5),
        "zero_d_view": base[2, 4],
        "empty": torch.zeros(0, 3),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "param": torch.nn.Parameter(torch.randn(3, generator=gen)),
        "u16_v3": torch.tensor([1, 2, 40000], dtype=torch.int32).to(torch.uint16),
        "size": torch.Size([2, 7]),
        "none": None,
        "scalars": [1, 2.5, "text", True, (3, None)],
        "nested": inner,
    }
    path = tmp_path / "roundtrip.pt"
    torch.save(obj, path)
    ours = load_pt(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    assert ours["transposed"].shape == (6, 4) and ours["slice"].shape == (2, 3)
    np.testing.assert_array_equal(ours["transposed"], base.numpy().T)
    np.testing.assert_array_equal(ours["strided"], base.numpy()[::2, ::3])
    assert ours["zero_d_view"].shape == () and ours["zero_d_view"] == base[2, 4].item()
    assert isinstance(ours["nested"], collections.OrderedDict)
    assert ours["bf16"].dtype == ml_dtypes.bfloat16

    # The legacy (non-zip) format is refused with a clear message.
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": base}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(
        CheckpointFormatError, match=r"legacy torch serialization not supported; re-save with torch>=1\.6"
    ):
        load_pt(legacy)


def _reference(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"reference file {path} not available")
    return path


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reference_checkpoints_match_torch_load(name: str) -> None:
    torch = pytest.importorskip("torch")
    path = _reference(name)
    ours = load_pt(path)
    theirs = torch.load(path, weights_only=True, map_location="cpu")
    _assert_same(ours, theirs)
    if name == "paper_student_fp16.pt":
        assert {v.dtype for v in ours["model"].values()} == {np.dtype(np.float16)}


def test_reference_checkpoint_special_entries() -> None:
    model = load_pt(_reference("wm_mt30_size1_seed0.pt"))["model"]
    assert len(model) == 80
    assert model["_Qs.params.__batch_size"] == (2,)
    assert type(model["_Qs.params.__batch_size"]) is tuple
    assert model["_Qs.params.__device"] is None
    assert model["log_std_min"].dtype == np.int64 and model["log_std_min"].shape == ()
    assert model["_Qs.params.2.weight"].shape == (2, 101, 384)
    release = load_pt(_reference("wm_mt30_size1_seed0_release.pt"))["model"]
    assert len(release) == 61
    np.testing.assert_array_equal(release["_task_emb.weight"], model["_task_emb.weight"])


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_truncated_reference_checkpoint(name: str) -> None:
    raw = _reference(name).read_bytes()
    with pytest.raises(CheckpointFormatError, match="truncated or corrupted"):
        load_pt(raw[: len(raw) // 2])
