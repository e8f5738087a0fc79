"""Test-session set-up: 8 virtual CPU devices (for the mesh tests) and the persistent compilation cache."""

import os

# Must happen before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
