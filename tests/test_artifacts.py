"""Artifacts by name (mtdistill_jax/artifacts.py, launch/download.py): local lookup, download into the cache with
resume, checksum verification, errors. No test reaches the internet: downloads come from an HTTP server on
127.0.0.1 started here, and any other address fails the test."""

from __future__ import annotations

import http.server
import os
import random
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from refdata import REPO, reference_dir

from mtdistill_jax import artifacts, cli
from mtdistill_jax.artifacts import Artifact, ArtifactWarning
from mtdistill_jax.errors import UnknownNameError, UserError

DATA = random.Random(0).randbytes(3 * (1 << 20) + 12_345)  # a few download blocks and a ragged end
CUT = 1_000_000  # bytes sent before an interrupted transfer stops
REF = reference_dir()  # the real reference folder (the tests below point $MTDISTILL_REFERENCE_DIR elsewhere)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.honor_range = True  # False: answer every request with the whole file (200)
        self.cut_after: int | None = None  # send only this many body bytes of the next response, then close
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status sent)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        srv: _Server = self.server
        rng = self.headers.get("Range")
        data = srv.files.get(self.path)
        if data is None:
            srv.requests.append((self.path, rng, 404))
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and srv.honor_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                srv.requests.append((self.path, rng, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        srv.requests.append((self.path, rng, status))
        body = data[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body, srv.cut_after = body[: srv.cut_after], None
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh cache and an empty reference folder; the checkout's ../shared/reference is not searched; any request
    to another host than 127.0.0.1 fails the test."""
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "ref").mkdir()
    monkeypatch.setenv(artifacts.REFERENCE_ENV, str(tmp_path / "ref"))
    monkeypatch.setattr(artifacts, "_checkout_reference_dir", lambda: None)
    real_urlopen = urllib.request.urlopen

    def local_only(req, *args, **kwargs):
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", f"a test tried to reach {url}"
        return real_urlopen(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)
    return tmp_path


def register(monkeypatch, *urls: str, name: str = "test_blob", data: bytes = DATA, **kwargs) -> Artifact:
    import hashlib

    art = Artifact(name=name, filename="blob.bin", description="synthetic test file", urls=urls,
                   sha256=hashlib.sha256(data).hexdigest(), size=len(data), **kwargs)
    monkeypatch.setitem(artifacts.REGISTRY, name, art)
    return art


def cache_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def test_download_verifies_and_caches(server, monkeypatch, tmp_path):
    server.files["/blob.bin"] = DATA
    register(monkeypatch, server.url("/blob.bin"))
    path = artifacts.fetch("test_blob", progress=True)
    assert path == tmp_path / "cache" / "test_blob" / "blob.bin" == artifacts.cache_path("test_blob")
    assert path.read_bytes() == DATA
    assert cache_files(tmp_path) == ["test_blob/blob.bin"]  # no .part left
    assert server.requests == [("/blob.bin", None, 200)]
    # the second call finds the verified cached copy: no request
    assert artifacts.fetch("test_blob") == path
    assert artifacts.locate("test_blob") == path
    assert len(server.requests) == 1


@pytest.mark.parametrize("served, pattern", [
    (DATA[:-1] + bytes([DATA[-1] ^ 1]), r"sha256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"),
    (DATA[:-10], rf"size mismatch: expected {len(DATA):,} bytes, got {len(DATA) - 10:,}"),
], ids=["flipped-byte", "short-file"])
def test_corrupt_download_is_deleted(server, monkeypatch, tmp_path, served, pattern):
    server.files["/blob.bin"] = served
    art = register(monkeypatch, server.url("/blob.bin"))
    with pytest.raises(UserError, match=pattern) as e:
        artifacts.fetch("test_blob", progress=False)
    msg = str(e.value)
    assert art.urls[0] in msg and "deleted" in msg
    if "sha256" in pattern:
        import hashlib

        assert f"expected {art.sha256}, got {hashlib.sha256(served).hexdigest()}" in msg
    assert cache_files(tmp_path) == []
    assert artifacts.locate("test_blob") is None


def test_interrupted_transfer_resumes_with_range(server, monkeypatch, tmp_path):
    server.files["/blob.bin"] = DATA
    url = register(monkeypatch, server.url("/blob.bin")).urls[0]
    server.cut_after = CUT
    with pytest.raises(UserError, match=rf"could not download test_blob: {re.escape(url)}: transfer ended after "
                                        rf"{CUT:,} of {len(DATA):,} bytes .*run again to resume"):
        artifacts.fetch("test_blob", progress=False)
    part = tmp_path / "cache" / "test_blob" / "blob.bin.part"
    assert part.is_file() and part.stat().st_size == CUT
    assert artifacts.locate("test_blob") is None  # a .part is never a copy
    path = artifacts.fetch("test_blob", progress=False)
    assert server.requests[-1] == ("/blob.bin", f"bytes={CUT}-", 206)
    assert path.read_bytes() == DATA
    assert cache_files(tmp_path) == ["test_blob/blob.bin"]


def test_server_ignoring_range_sends_everything_again(server, monkeypatch, tmp_path):
    server.files["/blob.bin"] = DATA
    register(monkeypatch, server.url("/blob.bin"))
    server.honor_range = False
    server.cut_after = CUT
    with pytest.raises(UserError, match="transfer ended after"):
        artifacts.fetch("test_blob", progress=False)
    path = artifacts.fetch("test_blob", progress=False)
    assert server.requests[-1] == ("/blob.bin", f"bytes={CUT}-", 200)  # asked to resume, got the whole file
    assert path.read_bytes() == DATA
    assert cache_files(tmp_path) == ["test_blob/blob.bin"]


def test_complete_part_is_verified_without_a_new_transfer(server, monkeypatch, tmp_path):
    server.files["/blob.bin"] = DATA
    register(monkeypatch, server.url("/blob.bin"))
    part = tmp_path / "cache" / "test_blob" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA)  # a run stopped between the last byte and the rename
    assert artifacts.fetch("test_blob", progress=False).read_bytes() == DATA
    assert server.requests == []


def test_unreachable_url_names_it(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/blob.bin"
    register(monkeypatch, url)
    with pytest.raises(UserError, match=rf"could not download test_blob: {re.escape(url)}: .*refused"):
        artifacts.fetch("test_blob", progress=False, timeout=5)
    assert cache_files(tmp_path) == []


def test_next_url_after_a_failing_one(server, monkeypatch):
    server.files["/mirror/blob.bin"] = DATA
    register(monkeypatch, server.url("/gone/blob.bin"), server.url("/mirror/blob.bin"))
    assert artifacts.fetch("test_blob", progress=False).read_bytes() == DATA
    assert [(p, s) for p, _, s in server.requests] == [("/gone/blob.bin", 404), ("/mirror/blob.bin", 200)]
    register(monkeypatch, server.url("/gone/blob.bin"), name="test_gone")
    with pytest.raises(UserError, match=r"could not download test_gone: http://127\.0\.0\.1:\d+/gone/blob\.bin: "
                                        r"HTTP 404"):
        artifacts.fetch("test_gone", progress=False)


def test_locate_prefers_the_reference_dir_and_refuses_a_wrong_copy(monkeypatch, tmp_path):
    register(monkeypatch, reference_name="ref_blob.bin")
    ref = tmp_path / "ref" / "ref_blob.bin"
    cached = artifacts.cache_path("test_blob")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(DATA)
    assert artifacts.locate("test_blob") == cached
    ref.write_bytes(DATA)
    assert artifacts.locate("test_blob") == ref  # $MTDISTILL_REFERENCE_DIR before the cache
    other = tmp_path / "other"
    other.mkdir()
    (other / "ref_blob.bin").write_bytes(DATA)
    assert artifacts.locate("test_blob", search=[other]) == other / "ref_blob.bin"  # the caller's folders first
    ref.write_bytes(DATA[:-1] + b"\0")  # same size, other bytes
    with pytest.warns(ArtifactWarning, match=rf"not using {re.escape(str(ref))} for test_blob: sha256 mismatch"):
        assert artifacts.locate("test_blob") == cached  # falls through to the cache
    cached.unlink()
    with pytest.warns(ArtifactWarning):
        assert artifacts.locate("test_blob") is None


def test_checkout_reference_dir_is_searched(monkeypatch, tmp_path):
    register(monkeypatch, reference_name="ref_blob.bin")
    shared = tmp_path / "shared_reference"
    shared.mkdir()
    (shared / "ref_blob.bin").write_bytes(DATA)
    monkeypatch.setattr(artifacts, "_checkout_reference_dir", lambda: shared)
    assert artifacts.reference_dirs() == [tmp_path / "ref", shared]
    assert artifacts.locate("test_blob") == shared / "ref_blob.bin"


def test_reference_data_without_url_says_where_it_looked(tmp_path):
    assert artifacts.locate("mt30_tiny_chunk") is None
    with pytest.raises(UserError) as e:
        artifacts.fetch("mt30_tiny_chunk")
    msg = str(e.value)
    assert "reference data of this repository's test setup and has no public URL" in msg
    assert str(tmp_path / "ref" / "mt30_tiny_chunk.pt") in msg
    assert str(tmp_path / "cache" / "mt30_tiny_chunk" / "mt30_tiny_chunk.pt") in msg
    assert artifacts.REFERENCE_ENV in msg


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownNameError, match=r"unknown artifact 'paper_studnet'; valid: paper_student_1m_fp16, "
                                               r"mt30_tiny_chunk, tdmpc2_mt30_1m, .*tdmpc2_mt80_chunk_19$"):
        artifacts.get("paper_studnet")
    assert isinstance(UnknownNameError("x"), KeyError)


def test_registry_entries():
    arts = artifacts.list_artifacts()
    assert [a.name for a in arts] == list(artifacts.REGISTRY)
    for a in arts:
        assert a.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", a.sha256)
        assert a.urls or a.reference_name, a.name  # published, or reference data found locally
        assert all(u.startswith("https://") for u in a.urls)
    names = {a.name for a in arts}
    assert {f"tdmpc2_{s}_{m}m" for s in ("mt30", "mt80") for m in (1, 5, 19, 48, 317)} <= names
    assert artifacts.get("tdmpc2_mt30_317m").urls == (
        "https://huggingface.co/nicklashansen/tdmpc2/resolve/main/multitask/mt30-317M.pt",)
    assert artifacts.get("tdmpc2_mt80_chunk_19").urls == (
        "https://huggingface.co/datasets/nicklashansen/tdmpc2/resolve/main/mt80/chunk_19.pt",)
    # same file name, different folders in the cache
    assert artifacts.cache_path("tdmpc2_mt30_chunk_0") != artifacts.cache_path("tdmpc2_mt80_chunk_0")


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv(artifacts.CACHE_ENV)
    assert artifacts.cache_dir() == Path.home() / ".cache" / "mtdistill_jax"


@pytest.mark.parametrize("name, ref_name", [("paper_student_1m_fp16", "paper_student_fp16.pt"),
                                            ("mt30_tiny_chunk", "mt30_tiny_chunk.pt")])
def test_pinned_checksums_match_the_reference_files(name, ref_name):
    path = REF / ref_name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    art = artifacts.get(name)
    assert art.reference_name == ref_name
    assert (art.sha256, art.size) == (artifacts.sha256_file(path), path.stat().st_size)


def test_demo_lookup_uses_the_reference_copy_without_network(monkeypatch):
    """What `make demo` does: the student from the reference folder, no request at all."""
    path = REF / "paper_student_fp16.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found")

    def no_network(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert artifacts.fetch("paper_student_1m_fp16", search=[REF]) == path


# --- launch/download.py -------------------------------------------------------------------------------------------

def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV},
           artifacts.CACHE_ENV: str(tmp_path / "cli_cache"), **env}
    return subprocess.run([sys.executable, "launch/download.py", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)


def test_cli_list(tmp_path):
    r = _run(["--list"], tmp_path, **{artifacts.REFERENCE_ENV: str(REF)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "size", "checksum", "description"]
    row = next(line for line in lines if line.startswith("paper_student_1m_fp16 "))
    assert "3.8 MiB" in row and " verified " in row
    assert re.search(r"^tdmpc2_mt30_317m +\? +unverified +official TD-MPC2 MT30", r.stdout, re.M)
    if (REF / "paper_student_fp16.pt").is_file():
        assert row.endswith(str(REF / "paper_student_fp16.pt"))
    assert f"cache: {tmp_path / 'cli_cache'}" in r.stdout


@pytest.mark.parametrize("args, pattern", [
    (["paper_studnet"], r"error: unknown artifact 'paper_studnet'; valid: paper_student_1m_fp16, mt30_tiny_chunk, .*"),
    ([], r"error: name at least one artifact \(--list prints the registry\)"),
    (["--list", "mt30_tiny_chunk"], r"error: --list takes no names \(got \['mt30_tiny_chunk'\]\)"),
], ids=["unknown-name", "no-name", "list-with-name"])
def test_cli_usage_errors(tmp_path, args, pattern):
    r = _run(args, tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and re.fullmatch(pattern, r.stderr.strip()), r.stderr
    assert not (tmp_path / "cli_cache").exists()


def test_cli_prints_local_paths(tmp_path):
    for ref_name in ("paper_student_fp16.pt", "mt30_tiny_chunk.pt"):
        if not (REF / ref_name).is_file():
            pytest.skip(f"{REF / ref_name} not found")
    r = _run(["paper_student_1m_fp16", "mt30_tiny_chunk"], tmp_path, **{artifacts.REFERENCE_ENV: str(REF)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(REF / "paper_student_fp16.pt"),
                                     str(REF / "mt30_tiny_chunk.pt")]


def test_unpinned_artifact_resumes_and_handles_416(server, monkeypatch, tmp_path):
    """No pinned size or sha256 (the official checkpoints): the server's length decides completeness; a complete
    .part answered with 416 is kept."""
    server.files["/blob.bin"] = DATA
    monkeypatch.setitem(artifacts.REGISTRY, "test_unpinned", Artifact(
        name="test_unpinned", filename="blob.bin", description="unverified", urls=(server.url("/blob.bin"),)))
    assert not artifacts.get("test_unpinned").verified
    server.cut_after = CUT
    with pytest.raises(UserError, match=rf"transfer ended after {CUT:,} of {len(DATA):,} bytes"):
        artifacts.fetch("test_unpinned", progress=False)
    assert artifacts.fetch("test_unpinned", progress=False).read_bytes() == DATA
    assert server.requests[-1] == ("/blob.bin", f"bytes={CUT}-", 206)
    part = tmp_path / "cache" / "test_unpinned" / "blob.bin.part"
    artifacts.cache_path("test_unpinned").rename(part)  # complete, but not yet renamed
    assert artifacts.fetch("test_unpinned", progress=False).read_bytes() == DATA
    assert server.requests[-1] == ("/blob.bin", f"bytes={len(DATA)}-", 416)
    assert cache_files(tmp_path) == ["test_unpinned/blob.bin"]


def test_paper_student_download_is_verified_against_its_pin(server, monkeypatch, tmp_path):
    """A clone without the reference folder: the student comes over HTTP (here: the local server, at the registry's
    path) and passes the pinned size and sha256."""
    import dataclasses

    path = REF / "paper_student_fp16.pt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    art = artifacts.get("paper_student_1m_fp16")
    url_path = "/" + art.urls[0].split("/", 3)[3]
    server.files[url_path] = path.read_bytes()
    monkeypatch.setitem(artifacts.REGISTRY, art.name, dataclasses.replace(art, urls=(server.url(url_path),)))
    assert artifacts.locate(art.name) is None  # no reference copy in this test's folders
    got = artifacts.fetch(art.name, progress=False)
    assert got == tmp_path / "cache" / "paper_student_1m_fp16" / "mt30_1M_steps_045dist_fp16.pt"
    assert artifacts.sha256_file(got) == art.sha256
    assert [(p, s) for p, _, s in server.requests] == [(url_path, 200)]
