"""Flax linen networks of TD-MPC2."""

from mtdistill_jax.nn.world_model import (
    WorldModel,
    abstract_params,
    action_masks,
    count_params,
    heads_to_evaluate,
    init_params,
    make_world_model,
    q_reduce,
    q_value,
    renorm_rows,
    two_heads,
)

__all__ = ["WorldModel", "abstract_params", "action_masks", "count_params", "heads_to_evaluate", "init_params",
           "make_world_model", "q_reduce", "q_value",
           "renorm_rows", "two_heads"]
