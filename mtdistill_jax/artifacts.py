"""Public artifacts by name: checkpoints and datasets, found locally or downloaded, verified and cached.

A small registry (:data:`REGISTRY`) names each artifact this project uses: where it is published (URLs), its file
name, its sha256 and size where they are known, and the file name under which the reference data folder of this
repository's test setup holds it. Three functions cover the uses:

* :func:`locate` (``name -> Path | None``): a local copy, looked for in this order:
  the folders given by the caller, ``$MTDISTILL_REFERENCE_DIR/<reference name>``, ``<repo>/../shared/reference/
  <reference name>`` (only when this package runs from a checkout), then the cache. A copy whose size or sha256
  differs from the pinned one is not used: a :class:`ArtifactWarning` says so and the search goes on.
* :func:`fetch` (``name -> Path``): :func:`locate`, else a download into the cache
  (``$MTDISTILL_CACHE``, default ``~/.cache/mtdistill_jax``, one folder per artifact). The transfer goes to
  ``<file>.part``; an interrupted one resumes from there with an HTTP ``Range`` request (a server that ignores the
  range sends the whole file again), shows a progress bar with rate and ETA, is checked against the pinned size and
  sha256, and is renamed into place only when complete and verified. A checksum mismatch deletes the file.
* :func:`get` / :func:`list_artifacts`: the registry entries (an unknown name is an
  :class:`~mtdistill_jax.errors.UnknownNameError` listing the valid ones).

Only the standard library speaks HTTP here (``urllib.request``). Errors a user can act on (no network, a bad
checksum, reference data that is not there) are :class:`~mtdistill_jax.errors.UserError` naming the URL or the
places searched. ``python launch/download.py --list`` prints the registry; ``python launch/download.py NAME``
fetches one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from mtdistill_jax.errors import UnknownNameError, UserError

__all__ = ["CACHE_ENV", "REFERENCE_ENV", "REGISTRY", "Artifact", "ArtifactWarning", "cache_dir", "cache_path",
           "fetch", "get", "list_artifacts", "locate", "reference_dirs", "sha256_file"]

CACHE_ENV = "MTDISTILL_CACHE"
REFERENCE_ENV = "MTDISTILL_REFERENCE_DIR"
BLOCK = 1 << 20  # bytes per read when hashing or downloading
TIMEOUT = 60.0  # seconds without any byte from the server before a download gives up (it can be resumed)
USER_AGENT = "mtdistill-jax (python urllib)"

# This package inside a source checkout: <repo>/mtdistill_jax/artifacts.py with <repo>/setup.py beside it.
_REPO = Path(__file__).resolve().parents[1]


class ArtifactWarning(UserWarning):
    """A local copy of an artifact was found but not used (its size or sha256 differs from the pinned one)."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One named file. ``sha256``/``size`` are ``None`` where not known (then a download is *unverified*)."""

    name: str  # registry key, e.g. "paper_student_1m_fp16"
    filename: str  # file name in the cache (and as published)
    description: str  # one line
    urls: tuple[str, ...] = ()  # public addresses, tried in order; empty: local-only reference data
    sha256: str | None = None  # lowercase hex of the whole file
    size: int | None = None  # bytes
    reference_name: str | None = None  # file name in the reference data folder, if it holds a copy

    @property
    def verified(self) -> bool:
        """Whether a copy is checked against a pinned sha256."""
        return self.sha256 is not None


# --- The registry ------------------------------------------------------------------------------------------------

_TD_MPC_OPT_COMMIT = "d5a28a8cc34ca2c573ffce510fd5ae688ab868d2"  # github.com/dmytro-kuzmenko/td-mpc-opt, branch main
_TD_MPC_OPT_FILE = "tdmpc2/models/mt30_1M_steps_045dist_fp16.pt"
_HF_MODELS = "https://huggingface.co/nicklashansen/tdmpc2/resolve/main"  # official TD-MPC2 checkpoints
_HF_DATA = "https://huggingface.co/datasets/nicklashansen/tdmpc2/resolve/main"  # official TD-MPC2 datasets
_DATA_CHUNKS = {"mt30": 4, "mt80": 20}  # chunk_0.pt ... chunk_{n-1}.pt per task set
_OFFICIAL_SIZES = (1, 5, 19, 48, 317)  # million parameters


def _registry() -> dict[str, Artifact]:
    arts = [
        Artifact(
            name="paper_student_1m_fp16",
            filename="mt30_1M_steps_045dist_fp16.pt",
            description="the distillation paper's 1M MT30 student (td-mpc-opt, d_coef 0.45, 1M steps, float16)",
            urls=(f"https://raw.githubusercontent.com/dmytro-kuzmenko/td-mpc-opt/{_TD_MPC_OPT_COMMIT}/{_TD_MPC_OPT_FILE}",
                  f"https://raw.githubusercontent.com/dmytro-kuzmenko/td-mpc-opt/main/{_TD_MPC_OPT_FILE}"),
            sha256="3e35489756abf6e0e244371698d063487f70ffb5d109e3d8c84ae7dda5955bfb",
            size=3_982_258,
            reference_name="paper_student_fp16.pt",
        ),
        Artifact(
            name="mt30_tiny_chunk",
            filename="mt30_tiny_chunk.pt",
            description="10 MT30 episodes in the official offline-dataset format (reference data, not published)",
            sha256="4be9fe06d03491049f66807883bec318b2569335719133d47abf5e3c62fdb94e",
            size=643_885,
            reference_name="mt30_tiny_chunk.pt",
        ),
    ]
    for task_set in ("mt30", "mt80"):
        for size in _OFFICIAL_SIZES:
            arts.append(Artifact(
                name=f"tdmpc2_{task_set}_{size}m",
                filename=f"{task_set}-{size}M.pt",
                description=f"official TD-MPC2 {task_set.upper()} multi-task checkpoint, {size}M parameters",
                urls=(f"{_HF_MODELS}/multitask/{task_set}-{size}M.pt",),
            ))
    for task_set, n in _DATA_CHUNKS.items():
        for i in range(n):
            arts.append(Artifact(
                name=f"tdmpc2_{task_set}_chunk_{i}",
                filename=f"chunk_{i}.pt",
                description=f"official TD-MPC2 {task_set.upper()} offline dataset, chunk {i + 1} of {n}",
                urls=(f"{_HF_DATA}/{task_set}/chunk_{i}.pt",),
            ))
    return {a.name: a for a in arts}


REGISTRY: dict[str, Artifact] = _registry()


def get(name: str) -> Artifact:
    """The registry entry ``name``; an unknown name raises :class:`UnknownNameError` listing the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown artifact {name!r}; valid: {', '.join(REGISTRY)}") from None


def list_artifacts() -> list[Artifact]:
    """Every registry entry, in registry order."""
    return list(REGISTRY.values())


# --- Where copies live ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$MTDISTILL_CACHE``, default ``~/.cache/mtdistill_jax`` (not created here)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtdistill_jax"


def cache_path(name: str) -> Path:
    """Where :func:`fetch` puts ``name``: ``<cache_dir>/<name>/<file name>`` (one folder per artifact, so files of
    the same name, e.g. the MT30 and MT80 ``chunk_0.pt``, never collide)."""
    art = get(name)
    return cache_dir() / art.name / art.filename


def _checkout_reference_dir() -> Path | None:
    """``<repo>/../shared/reference`` when this package runs from a source checkout, else ``None``."""
    if (_REPO / "setup.py").is_file() and (_REPO / "mtdistill_jax").is_dir():
        return _REPO.parent / "shared" / "reference"
    return None


def reference_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The reference data folders searched, in order: ``extra``, ``$MTDISTILL_REFERENCE_DIR``, the checkout's
    ``../shared/reference``; duplicates removed."""
    dirs = [Path(d) for d in extra]
    env = os.environ.get(REFERENCE_ENV, "").strip()
    if env:
        dirs.append(Path(env).expanduser())
    checkout = _checkout_reference_dir()
    if checkout is not None:
        dirs.append(checkout)
    out, seen = [], set()
    for d in dirs:
        key = os.path.abspath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _candidates(art: Artifact, extra: Iterable[str | os.PathLike]) -> list[Path]:
    paths = [d / art.reference_name for d in reference_dirs(extra)] if art.reference_name else []
    return [*paths, cache_path(art.name)]


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def _mismatch(art: Artifact, path: Path) -> str | None:
    """Why ``path`` is not a good copy of ``art`` (size, then sha256, each only where pinned), or ``None``."""
    if art.size is not None and (got := path.stat().st_size) != art.size:
        return f"size mismatch: expected {art.size:,} bytes, got {got:,}"
    if art.sha256 is not None and (got := sha256_file(path)) != art.sha256:
        return f"sha256 mismatch: expected {art.sha256}, got {got}"
    return None


def locate(name: str, *, search: Sequence[str | os.PathLike] = ()) -> Path | None:
    """A local copy of ``name`` that matches its pinned size/sha256, or ``None``.

    Searched in order: ``<dir>/<reference name>`` for each folder in ``search``, then ``$MTDISTILL_REFERENCE_DIR``,
    then ``<repo>/../shared/reference`` (when this package runs from a checkout), then the cache. A copy that fails
    the check is skipped with an :class:`ArtifactWarning`.
    """
    art = get(name)
    for path in _candidates(art, search):
        if not path.is_file():
            continue
        why = _mismatch(art, path)
        if why is None:
            return path
        warnings.warn(f"not using {path} for {name}: {why}", ArtifactWarning, stacklevel=2)
    return None


# --- Download ---------------------------------------------------------------------------------------------------

class _TransferError(Exception):
    """A download attempt failed; the message is the cause (the ``.part`` file, if any, is kept)."""


def _reason(e: BaseException) -> str:
    """The cause of a failed request, without the exception class: ``HTTP 404 Not Found``, ``Connection refused``."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else ValueError(str(e.reason))
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _content_range_start(value: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    return int(m.group(1)) if m else None


def _download(url: str, part: Path, art: Artifact, *, progress: bool, timeout: float) -> None:
    """Bring ``part`` to the complete file from ``url``, resuming from its current length if the server honours
    ``Range``; raises :class:`_TransferError` (``part`` keeps what arrived)."""
    offset = part.stat().st_size if part.is_file() else 0
    if art.size is not None and offset > art.size:  # longer than the file can be: start again
        part.unlink()
        offset = 0
    if art.size is not None and offset == art.size:
        return  # complete already (an earlier run stopped between the transfer and the rename)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # nothing left to send from `offset`: the part is complete or wrong
            total = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", e.headers.get("Content-Range", "") or "")
            if total and int(total.group(1)) == offset:
                return
            part.unlink()
            return _download(url, part, art, progress=progress, timeout=timeout)
        raise _TransferError(_reason(e)) from e
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        raise _TransferError(_reason(e)) from e

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and resp.status == 206:
            got = _content_range_start(resp.headers.get("Content-Range"))
            if got != offset:
                part.unlink()
                raise _TransferError(f"asked for bytes from {offset:,}, the server sent a range starting at {got}")
            mode, start = "ab", offset
        else:  # no range asked, or the server ignored it (200): the whole file comes again
            mode, start = "wb", 0
        total = start + length if length is not None else art.size
        from tqdm.auto import tqdm

        received = start
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=art.name, disable=not progress) as bar:
            try:
                while block := resp.read(BLOCK):
                    f.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise _TransferError(f"transfer interrupted after {received:,} bytes: {_reason(e)}") from e
    if total is not None and received < total:
        raise _TransferError(f"transfer ended after {received:,} of {total:,} bytes")


def _not_found_locally(art: Artifact, search: Sequence[str | os.PathLike]) -> UserError:
    looked = ", ".join(str(p) for p in _candidates(art, search))
    return UserError(
        f"{art.name} ({art.filename}) is reference data of this repository's test setup and has no public URL; "
        f"not found in: {looked}. Set {REFERENCE_ENV} to the folder that holds {art.reference_name or art.filename}")


def fetch(name: str, *, progress: bool = True, search: Sequence[str | os.PathLike] = (),
          timeout: float = TIMEOUT) -> Path:
    """A verified local copy of ``name``: :func:`locate`, else a download into the cache (see the module docstring).

    Raises :class:`UserError` when it is local-only and not found (naming the places searched), when every URL fails
    (naming each URL and the cause; a partial ``.part`` file stays and the next call resumes it), and on a size or
    checksum mismatch (naming expected and got; the bad file is deleted). ``timeout``: seconds without data.
    """
    art = get(name)
    found = locate(name, search=search)
    if found is not None:
        return found
    if not art.urls:
        raise _not_found_locally(art, search)
    dest = cache_path(name)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the download cache {dest.parent} ({_reason(e)}); set {CACHE_ENV} to a "
                        f"writable folder") from e
    failures = []
    for url in art.urls:
        try:
            _download(url, part, art, progress=progress, timeout=timeout)
        except _TransferError as e:
            failures.append(f"{url}: {e}")
            continue
        why = _mismatch(art, part)
        if why is not None:
            part.unlink(missing_ok=True)
            raise UserError(f"download of {name} from {url}: {why}; the downloaded file was deleted")
        os.replace(part, dest)
        return dest
    kept = f" ({part.stat().st_size:,} bytes kept in {part}; run again to resume)" if part.is_file() else ""
    raise UserError(f"could not download {name}: " + "; ".join(failures) + kept)
