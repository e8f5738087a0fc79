"""Download public artifacts (checkpoints, datasets) by name into the cache, verified; or list the registry.

``mtdistill-download`` (console entry point) and ``python launch/download.py`` run this module:

  python launch/download.py --list                         name, size, verified?, description, local copy
  python launch/download.py paper_student_1m_fp16 [NAME ...]   prints the local path of each, one per line

A local copy is used first (the reference data folder: $MTDISTILL_REFERENCE_DIR, or ../shared/reference beside a
checkout; then the cache). Downloads go to $MTDISTILL_CACHE (default ~/.cache/mtdistill_jax), resume after an
interruption, and are checked against the pinned sha256 where the registry has one ("unverified" otherwise).
Errors are one `error: ...` line on stderr (exit 2: an unknown name or no name, 1: network or checksum);
MTDISTILL_TRACEBACK=1 or --verbosity=1 adds the traceback.
"""

from __future__ import annotations

import sys

from absl import flags

from mtdistill_jax import artifacts, cli
from mtdistill_jax.errors import UnknownNameError

flags.DEFINE_bool("list", False, "print the registry: name, size, verified or not, description, local copy")
flags.DEFINE_bool("progress", True, "show a progress bar while downloading")
FLAGS = flags.FLAGS


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def registry_table() -> str:
    """The registry as a text table; the last column is the local copy :func:`artifacts.locate` finds, if any."""
    rows = [("name", "size", "checksum", "description", "local copy")]
    for art in artifacts.list_artifacts():
        local = artifacts.locate(art.name)
        if local is None:
            local = "-" if art.urls else "- (reference data, no public URL)"
        rows.append((art.name, _size(art.size), "verified" if art.verified else "unverified", art.description,
                     str(local)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"\ncache: {artifacts.cache_dir()} (${artifacts.CACHE_ENV}); reference folders searched first: "
                 + (", ".join(str(d) for d in artifacts.reference_dirs()) or "none"))
    return "\n".join(lines)


def main(argv):
    names = list(argv[1:])
    if FLAGS.list:
        if names:
            raise cli.UsageError(f"--list takes no names (got {names})")
        print(registry_table())
        return
    if not names:
        raise cli.UsageError("name at least one artifact (--list prints the registry)")
    try:
        arts = [artifacts.get(n) for n in names]  # every name checked before any download
    except UnknownNameError as e:
        raise cli.UsageError(str(e)) from e
    for art in arts:
        path = artifacts.fetch(art.name, progress=FLAGS.progress)
        if not art.verified:
            print(f"note: {art.name} has no pinned sha256: not verified", file=sys.stderr)
        print(path, flush=True)


def entry_point() -> None:
    """Console entry point ``mtdistill-download`` (and ``python launch/download.py``)."""
    cli.run(main)


if __name__ == "__main__":
    entry_point()
