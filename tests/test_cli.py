"""Command-line errors of the launch/ mains: one `error: ...` line on stderr, no traceback, exit 2 (command line) or
1 (inputs); MTDISTILL_TRACEBACK=1 / --verbosity=1 bring the traceback back; bugs keep theirs.

Every bad input must be rejected before anything is compiled, so each subprocess takes about a second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from absl import flags
from refdata import REPO, reference_dir

from mtdistill_jax import cli
from mtdistill_jax.errors import UnknownNameError, UserError

STUDENT = "paper_student_fp16.pt"


def _run(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _student():
    path = reference_dir() / STUDENT
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture
def files(tmp_path):
    """Paths the cases refer to: {ref} (the student .pt), {cut} (its first half), {bad_json}, {file}, {tmp}."""

    def fill(arg: str) -> str:
        if "{ref}" in arg:
            arg = arg.replace("{ref}", str(_student()))
        if "{cut}" in arg:
            cut = tmp_path / "cut.pt"
            raw = _student().read_bytes()
            cut.write_bytes(raw[: len(raw) // 2])
            arg = arg.replace("{cut}", str(cut))
        if "{bad_json}" in arg:
            (tmp_path / "bad.json").write_text('{"tasks": [')
            arg = arg.replace("{bad_json}", str(tmp_path / "bad.json"))
        if "{file}" in arg:
            (tmp_path / "file").write_text("")
            arg = arg.replace("{file}", str(tmp_path / "file"))
        return arg.replace("{tmp}", str(tmp_path))

    return fill


def case(script, args, code, pattern, id):
    return pytest.param(script, args, code, pattern, id=f"{script}-{id}")


CASES = [
    # launch/evaluate.py
    case("evaluate", ["--agent={ref}", "--workdir={tmp}/w", "--tasks=walker-wlak,cup-catch"], 2,
         r"error: --tasks: unknown tasks \['walker-wlak'\] for mt30; valid: walker-stand, walker-walk, .*pendulum-spin",
         "unknown-task"),
    case("evaluate", ["--agent={ref}", "--workdir={tmp}/w", "--episodes=0"], 2,
         r"error: flag --episodes=0: 0 is not a positive integer", "episodes-0"),
    case("evaluate", ["--agent={ref}", "--workdir={tmp}/w", "--chunk=7"], 2,
         r"error: --chunk=7 must divide the task set's episode length 500 \(or give --episode_length\)", "chunk"),
    case("evaluate", ["--agent={ref}", "--workdir={tmp}/w", "--chunk=7", "--episode_length=20"], 2,
         r"error: --chunk=7 must divide --episode_length=20", "chunk-given-length"),
    case("evaluate", ["--agent=/nonexistent.pt", "--workdir={tmp}/w"], 1,
         r"error: no such file or directory: /nonexistent\.pt", "missing-agent"),
    case("evaluate", ["--agent={tmp}", "--workdir={tmp}/w"], 1,
         r"error: .* is not an agent export \(no agent\.json\); convert a \.pt with .*", "dir-not-export"),
    case("evaluate", ["--agent={cut}", "--workdir={tmp}/w"], 1,
         r"error: .*cut\.pt: truncated or corrupted checkpoint file: .*", "truncated-pt"),
    case("evaluate", ["--agent=x.pt", "--workdir={tmp}/w", "--episdoes=3"], 2,
         r"error: Unknown command line flag 'episdoes'\. Did you mean: episodes \? \(--helpshort lists the flags\)",
         "unknown-flag"),
    case("evaluate", ["--agent=x.pt"], 2, r"error: missing required flag --workdir", "missing-flag"),
    case("evaluate", ["--agent=x.pt", "--workdir={tmp}/w", "--compute_dtype=float16"], 2,
         r"error: flag --compute_dtype=float16: value should be one of <float32\|bfloat16>", "compute-dtype"),
    case("evaluate", ["--agent=x.pt", "--workdir={file}/w"], 2, r"error: --workdir=.*/w: .*file is not a directory",
         "workdir-under-file"),
    case("evaluate", ["--merge={bad_json}", "--workdir={tmp}/w"], 1, r"error: .*bad\.json: not a JSON file \(.*\)",
         "merge-bad-json"),
    # launch/convert.py
    case("convert", ["--from_torch=/nonexistent.pt", "--out={tmp}/a"], 1,
         r"error: no such file or directory: /nonexistent\.pt", "missing-input"),
    case("convert", ["--from={tmp}/nothing", "--out={tmp}/a", "--dtype=int8"], 1,
         r"error: no such file or directory: .*/nothing", "missing-export"),
    case("convert", ["--inspect={cut}"], 1, r"error: .*cut\.pt: truncated or corrupted checkpoint file: .*",
         "truncated-pt"),
    case("convert", ["--from_torch={ref}", "--out={tmp}/a", "--dtype=float8"], 2,
         r"error: flag --dtype=float8: value should be one of <float32\|bfloat16\|float16\|int8>", "bad-dtype"),
    case("convert", ["--from_torch={ref}", "--out={tmp}/a", "--model_size=5", "--task_set=mt30"], 1,
         r"error: .*: key '_encoder\.state\.0\.weight' has shape \[256, 120\], expected \[256, 88\] \(it does not "
         r"fit the given model size 5 on mt30; .*\)", "shape-mismatch"),
    case("convert", ["--from_torch=x.pt"], 2, r"error: give --out=DIR \(agent export\) and/or --to_torch=FILE\.pt",
         "missing-out"),
    case("convert", ["--from_torch=x.pt", "--out={tmp}", "--bogus"], 2,
         r"error: Unknown command line flag 'bogus' \(--helpshort lists the flags\)", "unknown-flag"),
    # launch/train.py
    case("train", ["--workdir={tmp}/run", "--data={tmp}/missing.pt"], 1,
         r"error: no such file or directory: .*/missing\.pt", "missing-data"),
    case("train", ["--workdir={tmp}/run", "--data={cut}"], 1,
         r"error: .*cut\.pt: truncated or corrupted checkpoint file: .*", "truncated-data"),
    case("train", ["--workdir={tmp}/run", "--data={tmp}/missing.pt", "--config.train.batch_sze=8"], 2,
         r"error: --config\.train\.batch_sze: the config has no field 'batch_sze'; did you mean \"batch_size\".*",
         "misspelled-override"),
    case("train", ["--workdir={tmp}/run", "--data={tmp}/missing.pt", "--config.train.batch_size=0"], 2,
         r"error: --config: config field train\.batch_size must be an int >= 1, got 0", "bad-override"),
    case("train", ["--workdir={tmp}/run", "--data={tmp}/missing.pt", "--config.steps=ten"], 2,
         r"error: flag --config\.steps=ten: invalid literal for int\(\) .*", "override-not-int"),
    case("train", ["--workdir={tmp}/run", "--data={tmp}/missing.pt", "--config={tmp}/nope.py"], 2,
         r"error: --config=.*/nope\.py: no such config file", "missing-config"),
    case("train", [], 2, r"error: missing required flag --workdir", "missing-workdir"),
    case("train", ["--workdir={tmp}/run"], 2, r"error: missing required flag --data \(an offline config trains on a "
         r"dataset; launch/train\.py with --config=mtdistill_jax/configs/online\.py trains online instead\)",
         "missing-data-offline"),
    case("train", ["--workdir={tmp}/run", "--config=mtdistill_jax/configs/online.py", "--data={tmp}/x.pt"], 2,
         r"error: --data is given but the config is an online one \(.*\); drop it, or give an offline config",
         "data-with-online"),
    case("train", ["--workdir={tmp}/run", "--config=mtdistill_jax/configs/online.py", "--config.tasks=cartpole-x"], 2,
         r"error: --config: config field tasks: cartpole-x not in mt30; valid: .*", "online-unknown-task"),
    case("train", ["--workdir={tmp}/run", "--config=mtdistill_jax/configs/online.py",
                   "--config.online.envs_per_task=3", "--config.steps=3000"], 2,
         r"error: --config: config field log_every=1000 is not a multiple of the 3 envs .*", "online-not-multiple"),
    case("train", ["--workdir={tmp}/run", "--config=mtdistill_jax/configs/online.py",
                   "--config.online.envs_per_task=3", "--config.steps=3000", "--config.log_every=300"], 2,
         r"error: --save_every=10000 is not a multiple of the 3 envs of the config .*", "online-save-not-multiple"),
    case("train", ["--workdir={tmp}/run", "--config=mtdistill_jax/configs/online.py", "--config.model_size=2"], 2,
         r"error: --config: unknown model size 2; valid: \[1, 5, 19, 48, 317\]", "online-bad-model-size"),
]


@pytest.mark.parametrize("script,args,code,pattern", CASES)
def test_bad_input_is_one_line(script, args, code, pattern, files, tmp_path):
    r = _run([f"launch/{script}.py", *map(files, args)])
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(pattern, _last_line(r.stderr)), r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [_last_line(r.stderr)], r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "a").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("switch", [{"env": {cli.TRACEBACK_ENV: "1"}}, {"args": ["--verbosity=1"]}],
                         ids=["env", "verbosity"])
def test_debug_switch_shows_traceback(switch):
    r = _run(["launch/evaluate.py", "--agent=/nonexistent.pt", "--workdir=unused", *switch.get("args", [])],
             env=switch.get("env"))
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "FileNotFoundError" in r.stderr, r.stderr
    assert _last_line(r.stderr) == "error: no such file or directory: /nonexistent.pt"


_PROGRAM = """
import sys
from mtdistill_jax import cli
from mtdistill_jax.errors import UserError

def main(argv):
    if sys.argv[1:] == ["--", "bug"]:
        return [1, 2] + (3, 4)  # a genuine bug: TypeError
    raise UserError("the input is wrong\\nin two lines")

cli.run(main)
"""


def test_bugs_keep_their_traceback():
    r = _run(["-c", _PROGRAM, "--", "bug"])
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, r.stderr
    assert _last_line(r.stderr).startswith("TypeError: can only concatenate list")
    r = _run(["-c", _PROGRAM, "--", "user"])
    assert r.returncode == 1 and r.stderr == "error: the input is wrong in two lines\n"


def test_format_error():
    assert cli.format_error(FileNotFoundError(2, "No such file or directory", "/x.pt")) == \
        "no such file or directory: /x.pt"
    assert cli.format_error(FileExistsError("/x exists; pass --overwrite")) == "/x exists; pass --overwrite"
    assert cli.format_error(UnknownNameError("unknown task 'a'; valid: b")) == "unknown task 'a'; valid: b"
    assert cli.format_error(KeyError("plain")) == "plain"
    embedded = ("flag --config=c.py:x: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
                "  File \"c.py\", line 3\nValueError: unknown model size 'x'\n")
    assert cli.format_error(flags.IllegalFlagValueError(embedded)) == \
        "flag --config=c.py:x: Error whilst parsing config file: unknown model size 'x'"
    assert cli.is_user_error(UserError("x")) and cli.is_user_error(cli.UsageError("x"))
    assert cli.is_user_error(PermissionError(13, "Permission denied", "/x"))
    assert not cli.is_user_error(ValueError("x")) and not cli.is_user_error(TypeError("x"))
    assert not cli.is_user_error(KeyError("x"))
    assert cli.exit_code(cli.UsageError("x")) == 2 and cli.exit_code(flags.Error("x")) == 2
    assert cli.exit_code(UserError("x")) == 1 and cli.exit_code(OSError("x")) == 1


_COMPILES = """
import jax
from mtdistill_jax import cli

def main(argv):
    jax.jit(lambda x: x * 2 + 1)(jax.numpy.arange(3.0)).block_until_ready()
    print(jax.config.jax_compilation_cache_dir)

cli.run(main)
"""


# the same, but JAX imported only inside main (as launch/download.py never imports it): the folder reaches JAX
# through the environment, and the launcher's start-up imports no JAX
_COMPILES_LAZILY = """
import sys
from mtdistill_jax import cli

def main(argv):
    print("jax imported before main:", "jax" in sys.modules)
    import jax
    jax.jit(lambda x: x * 2 + 1)(jax.numpy.arange(3.0)).block_until_ready()
    print(jax.config.jax_compilation_cache_dir)

cli.run(main)
"""


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_launchers_keep_compiled_programs_in_a_persistent_cache(tmp_path):
    """Every ``cli.run`` main gets JAX's persistent compilation cache: by default in ``$MTDISTILL_CACHE/jax``;
    ``MTDISTILL_COMPILATION_CACHE`` moves it or (0) turns it off; a ``JAX_COMPILATION_CACHE_DIR`` of the user's
    wins."""
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", cli.COMPILATION_CACHE_ENV)}
    env = {**base, "MTDISTILL_CACHE": str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PLATFORMS": "cpu"}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", _COMPILES], capture_output=True, text=True, cwd=REPO,
                              env={**env, **extra}, timeout=120)

    r = run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "cache" / "jax") and _files(tmp_path / "cache" / "jax")
    r = subprocess.run([sys.executable, "-c", _COMPILES_LAZILY], capture_output=True, text=True, cwd=REPO,
                       env={**env, "MTDISTILL_CACHE": str(tmp_path / "lazy")}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["jax imported before main: False", str(tmp_path / "lazy" / "jax")]
    assert _files(tmp_path / "lazy" / "jax")
    r = run(**{cli.COMPILATION_CACHE_ENV: str(tmp_path / "mine")})
    assert r.stdout.strip() == str(tmp_path / "mine") and _files(tmp_path / "mine")
    r = run(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "users"), **{cli.COMPILATION_CACHE_ENV: str(tmp_path / "x")})
    assert r.stdout.strip() == str(tmp_path / "users") and _files(tmp_path / "users")
    assert not (tmp_path / "x").exists()
    before = _files(tmp_path / "cache" / "jax")
    r = run(**{cli.COMPILATION_CACHE_ENV: "off"})
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    assert _files(tmp_path / "cache" / "jax") == before
