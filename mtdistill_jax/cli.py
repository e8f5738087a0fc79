"""Command-line behaviour shared by the ``launch/`` mains: one line for a user's mistake, a traceback for a bug.

Every main ends with ``cli.run(main)`` instead of absl's ``app.run(main)``. A *user error* then stops the
program with ``error: <message>`` as the one line it writes to stderr, and exit status

* 2: the command line is wrong: an unknown or malformed flag, a bad flag value, a missing, conflicting or
  misspelled flag (absl's flag errors, ``app.UsageError`` = :data:`UsageError`);
* 1: the command is well-formed but what it names is not usable: a missing or unreadable file, a corrupt
  checkpoint, an unknown task, a shape or config mismatch (:class:`~mtdistill_jax.errors.UserError` and
  its subclasses, ``OSError``).

Any other exception is a bug: Python prints its traceback (exit status 1), so plain ``ValueError``/``KeyError``/
``TypeError`` are never hidden; library code marks rejected input by raising ``UserError``. With
``MTDISTILL_TRACEBACK=1`` in the environment, or ``--verbosity=1`` (once the flags parse), user errors print
their traceback too, before the ``error:`` line.

Before ``main`` runs, :func:`use_compilation_cache` turns on JAX's persistent compilation cache (unless the user
configured one or turned it off), so a program compiled by an earlier run loads from disk instead of compiling.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

from mtdistill_jax.errors import UnknownNameError, UserError

__all__ = ["COMPILATION_CACHE_ENV", "TRACEBACK_ENV", "UnknownNameError", "UsageError", "UserError",
           "check_output_dir", "define_config_file", "exit_code", "format_error", "is_user_error", "run",
           "use_compilation_cache"]

TRACEBACK_ENV = "MTDISTILL_TRACEBACK"
COMPILATION_CACHE_ENV = "MTDISTILL_COMPILATION_CACHE"  # a folder, or 0/off/false/no for no cache
_OFF = ("0", "false", "no", "off")
UsageError = app.UsageError  # raise it for a wrong command line (exit status 2)

FLAGS = flags.FLAGS

_deferred: list[BaseException] = []  # errors found while flags were being defined (config overrides)
_config_flags: list[str] = []  # names of the flags made by define_config_file
_REQUIRED = re.compile(r"flag --(\S+)=None: Flag --\1 must have a value other than None\.")
_verbose = False  # --verbosity >= 1, read right after parsing (a main may change the verbosity later)


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` reports a mistake of the user (printed as one line) rather than a bug (traceback)."""
    return isinstance(e, (UserError, UsageError, flags.Error, OSError))


def exit_code(e: BaseException) -> int:
    """2 for a wrong command line, 1 for everything else."""
    return 2 if isinstance(e, (UsageError, flags.Error)) else 1


def format_error(e: BaseException) -> str:
    """The message of ``e`` as one line (an ``OSError`` as ``<reason>: <path>``, without ``[Errno n]``)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        msg = f"{e.strerror[:1].lower()}{e.strerror[1:]}: {os.fsdecode(e.filename)}"
        if e.filename2 is not None:
            msg += f" -> {os.fsdecode(e.filename2)}"
    elif isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])  # not repr(), as KeyError.__str__ does
    else:
        msg = str(e)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    required = [m.group(1) for line in lines if (m := _REQUIRED.fullmatch(line))]
    if required and len(required) == len(lines):  # absl: "flag --x=None: Flag --x must have a value other than None."
        return f"missing required flag{'s' * (len(required) > 1)} " + ", ".join(f"--{n}" for n in required)
    if isinstance(e, flags.UnrecognizedFlagError):
        lines.append("(--helpshort lists the flags)")
    if "Traceback (most recent call last):" in lines:  # e.g. absl's message for a config file that failed
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])  # drop the exception class of its last line
        lines = lines[:lines.index("Traceback (most recent call last):")] + [last]
    return " ".join(lines) or type(e).__name__


def traceback_requested() -> bool:
    """``MTDISTILL_TRACEBACK`` set to a true value, or ``--verbosity`` >= 1 on the command line."""
    return _verbose or os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", *_OFF)


def _fail(e: BaseException) -> NoReturn:
    sys.stdout.flush()
    if traceback_requested():
        traceback.print_exception(e)
    sys.stderr.write(f"error: {format_error(e)}\n")
    sys.stderr.flush()
    sys.exit(exit_code(e))


def _override_paths(name: str, argv: Sequence[str]) -> list[str]:
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    return [m.group(1) for a in argv if (m := pattern.match(a))]


def _override_error(name: str, e: BaseException, argv: Sequence[str]) -> str:
    """One line for a ``--<name>.<path>`` override that names no field of the config (ml_collections raises a
    ``KeyError`` with a "did you mean" hint, sometimes wrapped in an ``AttributeError``)."""
    key_error = next((x for x in (e, *(e.args[:1]), e.__cause__, e.__context__) if isinstance(x, KeyError)), None)
    if key_error is None:
        return f"bad --{name}.* override: {format_error(e)}"
    lines = [line.strip() for line in str(key_error.args[0] if key_error.args else "").splitlines() if line.strip()]
    field = lines[0].strip("'\"") if lines else "?"
    hint = " ".join(lines[1:])
    path = next((p for p in _override_paths(name, argv) if field in p.split(".")), None)
    where = f"--{name}.{path}" if path else f"--{name}.*"
    return f"{where}: the config has no field {field!r}" + (f"; {hint[:1].lower()}{hint[1:]}" if hint else "")


def define_config_file(name: str, default: str | None = None, help_string: str = "", **kwargs: Any):
    """``config_flags.DEFINE_config_file`` whose errors become one-line usage errors.

    ml_collections applies ``--<name>.x=...`` overrides of the default config while the flag is *defined*
    (at import time), so a misspelled field raises there, before :func:`run` could catch it; here it is kept
    and reported by :func:`run` as a usage error naming the flag.
    """
    from ml_collections import config_flags

    _config_flags.append(name)
    try:
        return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except (AttributeError, KeyError) as e:
        err = UsageError(_override_error(name, e, sys.argv))
        err.__cause__ = e
        _deferred.append(err)
        return None


def _check_config_files() -> None:
    from ml_collections import config_flags

    for name in _config_flags:
        path = config_flags.get_config_filename(FLAGS[name]).split(":", 1)[0]
        if path and not os.path.isfile(path):
            raise UsageError(f"--{name}={path}: no such config file")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line and exit status 2."""
    global _verbose
    try:
        if _deferred:
            raise _deferred[0]
        try:
            args = FLAGS(argv)
        except (AttributeError, KeyError) as e:  # a --config override naming no field (with --config=FILE)
            name = next((n for n in _config_flags if _override_paths(n, argv)), None)
            if name is None:
                raise
            raise UsageError(_override_error(name, e, argv)) from e
        _verbose = FLAGS["verbosity"].value >= 1 if "verbosity" in FLAGS else False
        _check_config_files()
        return args
    except (UsageError, flags.Error) as e:
        _fail(e)


def use_compilation_cache(environ=os.environ) -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns its folder, or None when off.

    A cache the user configured wins (``JAX_COMPILATION_CACHE_DIR``, or ``jax_compilation_cache_dir`` already set);
    otherwise ``$MTDISTILL_COMPILATION_CACHE``, default ``<$MTDISTILL_CACHE or ~/.cache/mtdistill_jax>/jax``;
    ``MTDISTILL_COMPILATION_CACHE=0`` turns it off. Programs that compile for a second or more are kept (JAX's
    ``jax_persistent_cache_min_compile_time_secs``); the folder grows until it is cleared (JAX evicts nothing by
    default). Must run before the first compile: JAX reads the setting once per process. Where JAX is not imported
    yet (a main that may never use it, e.g. ``launch/download.py``), the folder goes into ``JAX_COMPILATION_CACHE_DIR``
    for JAX to read when it is (child processes inherit it), so this costs no JAX import."""
    from mtdistill_jax.artifacts import cache_dir

    jax = sys.modules.get("jax")
    configured = environ.get("JAX_COMPILATION_CACHE_DIR") or (jax and jax.config.jax_compilation_cache_dir)
    if configured:
        return configured
    choice = environ.get(COMPILATION_CACHE_ENV, "").strip()
    if choice.lower() in _OFF:
        return None
    folder = os.path.expanduser(choice) if choice else str(cache_dir() / "jax")
    if jax is None:
        environ["JAX_COMPILATION_CACHE_DIR"] = folder
    else:
        jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def _guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    def guarded_main(argv: list[str]) -> Any:
        try:
            use_compilation_cache()
            return main(argv)
        except Exception as e:
            if is_user_error(e):
                _fail(e)
            raise

    guarded_main.__name__ = getattr(main, "__name__", "main")
    guarded_main.__doc__ = main.__doc__
    return guarded_main


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """``app.run(main)`` with the error handling of this module (see the module docstring)."""
    app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)


def check_output_dir(path: str, flag: str) -> str:
    """Raise a usage error now, before any work, if the directory ``--<flag>=path`` could not be created or
    written later (creates nothing); returns ``path``."""
    target = os.path.abspath(path)
    probe = target
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "exists and is not a directory" if probe == target else f"{probe} is not a directory"
        raise UsageError(f"--{flag}={path}: {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag}={path}: permission denied: cannot write in {probe}")
    return path


def check_torch_output(path: str, flag: str = "to_torch") -> str:
    """Usage errors, before any work, for ``--<flag>=path``, an official-format ``.pt`` to be written later: not
    a directory, its folder writable, torch installed; returns ``path``."""
    import importlib.util

    if os.path.isdir(path):
        raise UsageError(f"--{flag}={path} is a directory; give a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)
    if importlib.util.find_spec("torch") is None:
        raise UsageError(f"--{flag} needs torch: pip install 'mtdistill-jax[torch]'")
    return path


def start_main(argv: Sequence[str]) -> None:
    """The prologue of a long-running main: no positional arguments, INFO logs from the library, orbax's
    per-save INFO lines (through absl) silenced."""
    import logging

    from absl import logging as absl_logging

    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {list(argv[1:])}")
    absl_logging.set_verbosity(max(absl_logging.get_verbosity(), absl_logging.INFO))
    logging.getLogger("absl").setLevel(logging.WARNING)
