"""mtdistill-jax: TD-MPC2 world models, MPPI planning and distillation in JAX/Flax.

Importing the package adds XLA:CPU speed flags to ``XLA_FLAGS`` (see :func:`mtdistill_jax.xla_cpu.tune_for_cpu`;
``MTDISTILL_XLA_CPU_TUNING=0`` turns that off). They apply when JAX has not yet started its CPU backend. On Linux
with glibc it also keeps large freed buffers mapped, so that XLA:CPU's per-execution buffers are not page-faulted
in again at every call (:func:`mtdistill_jax.xla_cpu.tune_malloc`; ``MTDISTILL_MALLOC_TUNING=0`` turns that alone
off).
"""

from mtdistill_jax.xla_cpu import tune_for_cpu as _tune_for_cpu
from mtdistill_jax.xla_cpu import tune_malloc as _tune_malloc

_tune_for_cpu()
_tune_malloc()
