"""Test-session set-up: 8 virtual CPU devices (for the mesh tests) and the persistent compilation cache."""

import gc
import os

import pytest

# Must happen before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# LLVM -O0 for the suite's programs (and the launch/ subprocesses, which inherit XLA_FLAGS): the suite compiles far
# more than it runs, and LLVM's code generation is ~60 % of an XLA:CPU compile (benchmarks/compile_update.py
# --phases). Measured on a 2-core Xeon, `bash .ci/run` in a fresh clone: 68.7 -> 55.0 min. Set
# --xla_backend_optimization_level yourself in XLA_FLAGS to test at another level.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from mtdistill_jax.xla_cpu import mapping_count, max_map_count  # noqa: E402

_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", _cache)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)  # the launch/ subprocesses share it
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


_MAX_MAP_COUNT = max_map_count()


@pytest.fixture(autouse=True)
def _release_compiled_code():
    """Drop JAX's in-memory executables once this worker holds half the kernel's mapping limit.

    Each loaded XLA:CPU executable keeps anonymous memory mappings for its JIT-compiled code until it is
    released. An xdist worker that compiles a large share of the suite otherwise climbs past ``vm.max_map_count``
    (65530 by default; measured: ~60,700 mappings in one worker before it segfaulted serialising the next
    executable for the cache, and ~22,000 within tests/envs/test_parity.py alone), after which the next mmap
    fails. Executables needed again come back from the persistent cache.
    """
    yield
    if _MAX_MAP_COUNT is not None and (mapping_count() or 0) > _MAX_MAP_COUNT // 2:
        from mtdistill_jax.evaluate.program import clear_program_cache

        clear_program_cache()  # the rollout programs evaluate/collect keep for reuse
        jax.clear_caches()
        gc.collect()
