"""TD-MPC2 model sizes (1M / 5M / 19M / 48M / 317M learnable parameters).

Widths are the official ones (``tdmpc2/common/__init__.py`` MODEL_SIZE plus the two adjustments in the
official ``parse_cfg``): on MT30 the 19M model uses ``latent_dim=512``, and ``task_dim`` is 96 for MT80 and
for sizes 1 and 317, 64 otherwise.
"""

from __future__ import annotations

import ml_collections

from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.errors import UserError

MODEL_SIZES: dict[int, dict[str, int]] = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2, num_q=5),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3, num_q=5),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4, num_q=5),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}

# Official parameter counts (learnable parameters, target Q copy excluded), used by the tests.
OFFICIAL_PARAM_COUNTS: dict[str, dict[int, int]] = {
    "mt30": {1: 1_426_427, 5: 5_241_066, 19: 16_031_210, 48: 48_242_410, 317: 317_316_889},
    "mt80": {1: 1_435_067, 5: 5_389_930, 19: 18_970_218, 48: 48_791_146, 317: 317_383_129},
}

MODEL_FIELDS = ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "task_dim")


def official_task_dim(task_set: str, model_size: int) -> int:
    """Task-embedding width of the official configs (96 for MT80 and sizes 1/317, else 64)."""
    return 96 if task_set.lower() == "mt80" or model_size in (1, 317) else 64


def get_model_config(model_size: int = 1, task_set: str = "mt30") -> ml_collections.ConfigDict:
    """World-model config for an official size on a task set.

    Returns a locked ``ConfigDict``: assigning a misspelled field raises instead of silently adding it.
    """
    if model_size not in MODEL_SIZES:
        raise UserError(f"unknown model size {model_size!r}; valid: {sorted(MODEL_SIZES)}")
    ts = get_task_set(task_set)
    c = ml_collections.ConfigDict()
    c.task_set = ts.name  # 'mt30' or 'mt80': task ids, obs/action padding, action masks
    c.model_size = model_size  # nominal size in millions of parameters (1, 5, 19, 48 or 317)
    c.update(MODEL_SIZES[model_size])  # enc_dim, mlp_dim, latent_dim, num_enc_layers, num_q
    if ts.name == "mt30" and model_size == 19:
        c.latent_dim = 512  # the official MT30 19M checkpoint is slightly smaller
    c.task_dim = official_task_dim(ts.name, model_size)  # learnable task-embedding width
    c.simnorm_dim = 8  # SimNorm group size
    c.num_bins = 101  # two-hot bins for reward and value regression
    c.vmin = -10.0  # lowest bin centre (symlog space)
    c.vmax = 10.0  # highest bin centre (symlog space)
    c.dropout = 0.01  # dropout on the first layer of each Q head (training only)
    c.log_std_min = -10.0  # policy log-std lower bound
    c.log_std_max = 2.0  # policy log-std upper bound
    c.lock()
    return c


def check_model_config(c: ml_collections.ConfigDict) -> None:
    """Raise a :class:`~mtdistill_jax.errors.UserError` (a ``ValueError``) naming the field when a model config
    cannot describe a TD-MPC2 world model."""
    get_task_set(c.task_set)
    for f in MODEL_FIELDS + ("simnorm_dim", "num_bins"):
        v = c[f]
        if not isinstance(v, int) or v <= 0:
            raise UserError(f"model config field {f} must be a positive int, got {v!r}")
    if c.latent_dim % c.simnorm_dim:
        raise UserError(f"latent_dim {c.latent_dim} is not a multiple of simnorm_dim {c.simnorm_dim}")
    if c.num_q < 2:
        raise UserError(f"num_q must be >= 2 (two heads are subsampled), got {c.num_q}")
    if c.num_bins < 2:
        raise UserError(f"num_bins must be >= 2 for two-hot regression, got {c.num_bins}")
    if not c.vmin < c.vmax:
        raise UserError(f"vmin {c.vmin} must be below vmax {c.vmax}")
