"""ml_collections configs: model sizes, task sets, training/planning defaults."""

from mtdistill_jax.configs.model_sizes import (
    MODEL_SIZES,
    OFFICIAL_PARAM_COUNTS,
    check_model_config,
    get_model_config,
)
from mtdistill_jax.configs.tasks import MT30, MT80, TASK_SETS, TaskSet, get_task_set
from mtdistill_jax.configs.train import get_config, get_planner_config, get_smoke_config, get_train_config

__all__ = [
    "MODEL_SIZES", "OFFICIAL_PARAM_COUNTS", "check_model_config", "get_model_config",
    "MT30", "MT80", "TASK_SETS", "TaskSet", "get_task_set",
    "get_config", "get_planner_config", "get_smoke_config", "get_train_config",
]
