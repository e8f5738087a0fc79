"""The XLA:CPU memory-mapping guard: the fewer-kernels flag, the budget check, and that the flag really cuts
the mappings a compiled program holds on the installed jax."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from refdata import REPO

from mtdistill_jax import xla_cpu
from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.evaluate import evaluate
from mtdistill_jax.nn.world_model import init_params, make_world_model


def test_use_fewer_kernels_adds_flag_once_and_keeps_others():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.use_fewer_kernels(env) and xla_cpu.fewer_kernels_on(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + xla_cpu.FEWER_KERNELS_FLAG
    xla_cpu.use_fewer_kernels(env)
    assert env["XLA_FLAGS"].count("xla_cpu_use_fusion_emitters") == 1
    empty = {}
    assert xla_cpu.use_fewer_kernels(empty) and empty["XLA_FLAGS"] == xla_cpu.FEWER_KERNELS_FLAG
    user = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=true"}  # the user's explicit choice wins
    assert not xla_cpu.use_fewer_kernels(user) and user["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=true"


def test_use_fewer_kernels_leaves_a_jaxlib_without_the_flag_alone():
    """jaxlib 0.11's XLA no longer knows the flag and aborts the process on it: nothing is added there."""
    for version in ("0.11.2", "0.12.0.1"):
        env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        assert not xla_cpu.use_fewer_kernels(env, jaxlib_version=version)
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    env = {}
    assert xla_cpu.use_fewer_kernels(env, jaxlib_version="0.10.2") and env["XLA_FLAGS"] == xla_cpu.FEWER_KERNELS_FLAG


def test_check_mapping_budget():
    per = xla_cpu.MAPS_PER_PHYSICS
    xla_cpu.check_mapping_budget(30, "cpu", limit=65530, current=3000, fewer_kernels=True)  # 30 x 1850 fits
    with pytest.raises(RuntimeError, match="vm.max_map_count") as e:
        xla_cpu.check_mapping_budget(30, "cpu", limit=65530, current=3000, fewer_kernels=False)
    assert xla_cpu.FEWER_KERNELS_FLAG in str(e.value) and f"{30 * per[False]:,}" in str(e.value)
    with pytest.raises(RuntimeError) as e:
        xla_cpu.check_mapping_budget(30, "cpu", limit=40000, current=3000, fewer_kernels=True)
    assert xla_cpu.FEWER_KERNELS_FLAG not in str(e.value) and "sysctl -w vm.max_map_count=" in str(e.value)
    xla_cpu.check_mapping_budget(300, "gpu", limit=10, current=10, fewer_kernels=False)  # not an XLA:CPU matter
    assert xla_cpu.estimated_mappings(3, True) == 3 * per[True] < xla_cpu.estimated_mappings(3, False)


def test_evaluate_refuses_before_compiling(monkeypatch):
    config = get_smoke_config()
    params = init_params(make_world_model(config.model), jax.random.key(0))
    monkeypatch.setattr(xla_cpu, "max_map_count", lambda: (xla_cpu.mapping_count() or 0) + 100)
    monkeypatch.setattr(xla_cpu, "mapping_count", lambda: 1000)
    with pytest.raises(RuntimeError, match="memory mappings"):
        evaluate(params, config, ["pendulum-swingup"], episodes=1, episode_length=10, progress=False)


PROBE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    def maps():
        with open('/proc/self/maps') as f:
            return sum(1 for _ in f)
    def f(x):  # many distinct fusions: elementwise chains cut by reductions
        for i in range(40):
            x = jnp.tanh(x * (i + 1.5) + jnp.sin(x)) - jnp.mean(x ** 2, axis=-1, keepdims=True) * (0.1 + i)
        return x
    x = jnp.ones((8, 16))
    before = maps()
    jax.jit(f).lower(x).compile()
    print(maps() - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_fewer_kernels_flag_cuts_mappings():
    def added(flags):
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    default, fewer = added(""), added(xla_cpu.FEWER_KERNELS_FLAG)
    assert fewer * 2 < default, (default, fewer)


def test_tune_for_cpu_adds_speed_flags_once_respects_the_user_and_old_jaxlibs():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.tune_for_cpu(env, "0.10.2") == list(xla_cpu.SPEED_FLAGS)
    assert env["XLA_FLAGS"] == " ".join(["--xla_force_host_platform_device_count=8", *xla_cpu.SPEED_FLAGS])
    assert xla_cpu.tune_for_cpu(env, "0.10.2") == [] and env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}  # the user's own value wins
    assert xla_cpu.tune_for_cpu(user, "0.10.2") == [] and user["XLA_FLAGS"].endswith("=dot")
    old = {}
    assert xla_cpu.tune_for_cpu(old, "0.9.0") == [] and "XLA_FLAGS" not in old
    off = {xla_cpu.TUNING_ENV: "0"}
    assert xla_cpu.tune_for_cpu(off, "0.10.2") == [] and "XLA_FLAGS" not in off


def test_bf16_dot_options_for_bf16_on_cpu_only():
    tuned = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 " + xla_cpu.YNN_FLAG}  # what tune_for_cpu adds
    assert xla_cpu.bf16_dot_options("bfloat16", "cpu", tuned, "0.10.2") == xla_cpu.BF16_DOT_OPTIONS
    assert xla_cpu.bf16_dot_options("bfloat16", "cpu", {}, "0.10.2") == xla_cpu.BF16_DOT_OPTIONS
    assert xla_cpu.bf16_dot_options("float32", "cpu", tuned, "0.10.2") is None
    assert xla_cpu.bf16_dot_options("bfloat16", "gpu", tuned, "0.10.2") is None
    assert xla_cpu.bf16_dot_options("bfloat16", "cpu", tuned, "0.9.0") is None  # an XLA without the option
    assert xla_cpu.bf16_dot_options("bfloat16", "cpu", {**tuned, xla_cpu.TUNING_ENV: "0"}, "0.10.2") is None
    for own in ("=LIBRARY_FUSION_TYPE_ALL", ""):  # the user's own value, or the flag named without one, wins
        user = {"XLA_FLAGS": xla_cpu.YNN_FLAG[:-1] + own}
        assert xla_cpu.bf16_dot_options("bfloat16", "cpu", user, "0.10.2") is None
    options = xla_cpu.bf16_dot_options("bfloat16", "cpu", {}, "0.10.2")
    options["x"] = 1  # a copy: the module's constant stays as it is
    assert "x" not in xla_cpu.BF16_DOT_OPTIONS


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's YNNPACK path")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planner_compiles_bf16_with_the_bf16_dot_path(dtype):
    """Planner.plan_jit hands a bf16 planner's dots to YNNPACK (what reaches the CPU's bf16 units), not a float32
    one's."""
    import jax.numpy as jnp

    from mtdistill_jax.tdmpc2.planner import Planner

    expected = xla_cpu.bf16_dot_options(dtype) is not None
    config = get_smoke_config()
    config.planner.compute_dtype = dtype
    planner = Planner(config)
    params = init_params(planner.model, jax.random.key(0))
    obs, task = jnp.zeros((2, planner.task_set.obs_pad)), jnp.zeros((2,), jnp.int32)
    hlo = planner.plan_jit.lower(params, obs, task, planner.init(2).prev_mean, jnp.zeros((2,), bool),
                                 jax.random.key(0), mode="sample").compile().as_text()
    assert ("__ynn_fusion" in hlo) == expected
    assert expected == (dtype == "bfloat16" and os.environ.get(xla_cpu.TUNING_ENV, "1") != "0")


def test_importing_the_package_tunes_a_fresh_process():
    code = "import os, mtdistill_jax, jax; print(os.environ.get('XLA_FLAGS', '')); print(jax.numpy.ones(3).sum())"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.TUNING_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    from jaxlib.version import __version__ as jaxlib_version

    expected = xla_cpu._version_tuple(jaxlib_version) >= xla_cpu.SPEED_FLAGS_MIN_JAXLIB
    assert (xla_cpu.SPEED_FLAGS[0] in out.stdout) == expected
    assert "3.0" in out.stdout  # XLA accepted the flags and computes


def test_add_flags_respects_the_users_flag_by_name_not_by_prefix():
    env = {"XLA_FLAGS": "--xla_a=1 --xla_b_long=2"}
    assert xla_cpu.add_flags(("--xla_a=0", "--xla_b=3", "--xla_c"), env) == ["--xla_b=3", "--xla_c"]
    assert env["XLA_FLAGS"] == "--xla_a=1 --xla_b_long=2 --xla_b=3 --xla_c"
    assert xla_cpu.add_flags(("--xla_c=true",), env) == []  # named without a value counts as named
    empty = {}
    assert xla_cpu.add_flags(("--xla_d=1",), empty) == ["--xla_d=1"] and empty["XLA_FLAGS"] == "--xla_d=1"


class _FakeLibc:
    def __init__(self, ok: int = 1):
        self.calls, self.ok = [], ok

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.ok


def test_tune_malloc_sets_the_allocator_unless_told_not_to(monkeypatch):
    monkeypatch.setattr(xla_cpu, "malloc_tuned", False)
    monkeypatch.setattr(xla_cpu, "malloc_arena_max", None)
    monkeypatch.setattr(xla_cpu.os, "cpu_count", lambda: 4)
    libc = _FakeLibc()
    assert xla_cpu.tune_malloc({}, libc, cpus=1) and xla_cpu.malloc_tuned and xla_cpu.malloc_arena_max == 1
    assert dict(libc.calls) == {xla_cpu.M_MMAP_MAX: 0, xla_cpu.M_ARENA_MAX: 1, xla_cpu.M_TRIM_THRESHOLD: 1 << 30}
    libc = _FakeLibc()  # more than one CPU: glibc's own arena limit, 8 per CPU of the machine (undoing the one arena)
    assert xla_cpu.tune_malloc({}, libc, cpus=2) and xla_cpu.malloc_arena_max == 32
    assert dict(libc.calls) == {xla_cpu.M_MMAP_MAX: 0, xla_cpu.M_ARENA_MAX: 32, xla_cpu.M_TRIM_THRESHOLD: 1 << 30}
    monkeypatch.setattr(xla_cpu.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert xla_cpu.usable_cpus() == 1 and xla_cpu.tune_malloc({}, _FakeLibc()) and xla_cpu.malloc_arena_max == 1
    for env in ({xla_cpu.TUNING_ENV: "0"}, {xla_cpu.MALLOC_TUNING_ENV: "0"}, {"MALLOC_ARENA_MAX": "4"},
                {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}):  # off, or the user configures glibc themselves
        libc = _FakeLibc()
        assert not xla_cpu.tune_malloc(env, libc) and libc.calls == [], env
    failing = _FakeLibc(ok=0)  # mallopt refused: reported, every setting still tried
    assert not xla_cpu.tune_malloc({}, failing) and len(failing.calls) == len(xla_cpu.MALLOC_SETTINGS) + 1
    assert xla_cpu.malloc_arena_max is None
    assert not xla_cpu.tune_malloc({}, object())  # a C library without mallopt (not glibc)


_FAULTS = """
import ctypes, os, resource, sys, threading
n, in_thread, one_cpu = int(sys.argv[1]) << 20, sys.argv[2] == "thread", sys.argv[3] == "one_cpu"
if one_cpu:  # before the import, as a user's taskset would be
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import mtdistill_jax
from mtdistill_jax import xla_cpu
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def use_a_buffer():  # what XLA:CPU does at each call: allocate, write, free
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)

def rounds():
    use_a_buffer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        use_a_buffer()
    out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)

out = []
if in_thread:  # as on XLA's own threads, which allocate from their own glibc arena unless there is one arena
    t = threading.Thread(target=rounds)
    t.start()
    t.join()
else:
    rounds()
print(xla_cpu.malloc_tuned, xla_cpu.malloc_arena_max, n, out[0])
"""


@pytest.mark.skipif(not xla_cpu.on_glibc() or not hasattr(os, "sched_getaffinity"), reason="glibc's allocator only")
def test_importing_the_package_keeps_large_freed_blocks_mapped():
    """The effect tune_malloc is for, in fresh processes that import the package: a large block allocated, written
    and freed again and again (as XLA:CPU's temporary buffer at each call) is page-faulted in anew each time
    without it (one fault per 4 KiB page, 12,288 for 48 MB) and stays mapped with it. A block above glibc's 64 MB
    per-thread heap, used on a thread other than the main one, stays mapped only with one arena, which is set
    where the process runs on one CPU. The effect on XLA's own buffers is measured by
    ``benchmarks/update_step.py`` (faults per update), not here: a test program's buffers depend on XLA's buffer
    assignment and threads."""
    drop = (xla_cpu.TUNING_ENV, xla_cpu.MALLOC_TUNING_ENV, *xla_cpu.USER_MALLOC_ENV)
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "JAX_PLATFORMS": "cpu"}

    def faults(mb, where="main", cpus="all", **extra):
        r = subprocess.run([sys.executable, "-c", _FAULTS, str(mb), where, cpus], env={**env, **extra}, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        tuned, arenas, size, per_call = r.stdout.split()[-4:]
        return tuned == "True", arenas, int(size) // 4096, float(per_call)  # pages: one fault each when faulted in

    tuned, _, pages, per_call = faults(48)
    assert tuned
    untuned, _, _, per_call_untuned = faults(48, **{xla_cpu.MALLOC_TUNING_ENV: "0"})
    assert not untuned
    assert per_call_untuned > 0.5 * pages, per_call_untuned  # the premise: each call faults the block in
    assert per_call < 0.02 * pages, (per_call, per_call_untuned)
    tuned, arenas, pages, per_call = faults(96, "thread", "one_cpu")  # one CPU: one arena, the block stays mapped
    assert tuned and arenas == "1" and per_call < 0.02 * pages, (arenas, per_call)
    if len(os.sched_getaffinity(0)) > 1:  # more CPUs: per-thread arenas (no allocator lock shared by all threads)
        tuned, arenas, pages, per_call = faults(96, "thread")
        assert tuned and arenas != "1" and per_call > 0.5 * pages, (arenas, per_call)
