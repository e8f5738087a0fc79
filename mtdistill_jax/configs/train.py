"""Training and planning config for TD-MPC2 (official defaults from ``tdmpc2/config.yaml``).

``get_config()`` is the config used by ``launch/train.py``; ``get_smoke_config()`` is a one-step config
for tests. Each field has one comment; configs are locked so a misspelled override raises, and
``check_config`` rejects values no run can use (naming the field) before anything is built.
"""

from __future__ import annotations

import ml_collections

from mtdistill_jax.configs.model_sizes import check_model_config, get_model_config
from mtdistill_jax.errors import UserError


def get_train_config() -> ml_collections.ConfigDict:
    """Optimisation hyperparameters of the TD-MPC2 update."""
    c = ml_collections.ConfigDict()
    c.horizon = 3  # latent rollout length H of the world-model losses
    c.rho = 0.5  # temporal weight rho**t of the per-step losses
    c.consistency_coef = 20.0  # weight of the latent consistency (MSE) loss
    c.reward_coef = 0.1  # weight of the reward soft cross-entropy
    c.value_coef = 0.1  # weight of the value soft cross-entropy
    c.entropy_coef = 1e-4  # policy entropy bonus (on the scaled entropy)
    c.lr = 3e-4  # Adam learning rate of world model and policy
    c.enc_lr_scale = 0.3  # encoder learning rate = lr * enc_lr_scale
    c.adam_eps = 1e-8  # Adam epsilon of the world-model optimiser
    c.pi_adam_eps = 1e-5  # Adam epsilon of the policy optimiser
    c.grad_clip_norm = 20.0  # global-norm gradient clip (world model and policy separately)
    c.batch_size = 256  # sub-trajectories per update
    c.tau = 0.01  # Polyak rate of the target Qs and of the running value scale
    c.discount_denom = 5  # per-task discount = clip((L/denom - 1)/(L/denom), min, max)
    c.discount_min = 0.95  # lower clip of the discount
    c.discount_max = 0.995  # upper clip of the discount
    c.task_emb_policy_grad = "release"  # 'release': no policy gradient on the task embedding; 'head': official leak
    c.steps_per_dispatch = 100  # most updates run inside one compiled lax loop per host dispatch (K)
    c.lock()
    return c


def get_planner_config() -> ml_collections.ConfigDict:
    """MPPI planner hyperparameters."""
    c = ml_collections.ConfigDict()
    c.horizon = 3  # planning horizon (agent steps)
    c.iterations = 6  # MPPI iterations (the official code adds 2 when action_dim >= 20)
    c.num_samples = 512  # action sequences per iteration, policy trajectories included
    c.num_pi_trajs = 24  # sequences proposed by the policy prior
    c.num_elites = 64  # elites kept per iteration
    c.temperature = 0.5  # softmax temperature on elite values
    c.min_std = 0.05  # lower clip of the sampling std
    c.max_std = 2.0  # initial std and upper clip
    # the world model's matmuls while planning: float32 (official) or bfloat16 (params and the layers' outputs in
    # bf16, products accumulated and normalised in float32; the MPPI statistics, rewards, values and returned
    # actions in float32)
    c.compute_dtype = "float32"
    c.lock()
    return c


def get_config(model_size: int = 1, task_set: str = "mt30") -> ml_collections.ConfigDict:
    """Full agent config: ``model``, ``train``, ``planner`` and run-level fields."""
    c = ml_collections.ConfigDict()
    c.model = get_model_config(model_size, task_set)  # world-model architecture
    c.train = get_train_config()  # update-step hyperparameters
    c.planner = get_planner_config()  # MPPI hyperparameters
    c.seed = 1  # PRNG seed of the run
    c.steps = 10_000_000  # update steps
    c.log_every = 1000  # steps between metric logs
    c.lock()
    return c


def _positive(v) -> bool:
    return v > 0


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# field -> (test, what it must be); fields absent from a config are skipped
_CHECKS = {
    "steps": (_positive_int, "an int >= 1"),
    "log_every": (_positive_int, "an int >= 1"),
    "train.horizon": (_positive_int, "an int >= 1"),
    "train.batch_size": (_positive_int, "an int >= 1"),
    "train.steps_per_dispatch": (_positive_int, "an int >= 1"),
    "train.rho": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.consistency_coef": (lambda v: v >= 0, ">= 0"),
    "train.reward_coef": (lambda v: v >= 0, ">= 0"),
    "train.value_coef": (lambda v: v >= 0, ">= 0"),
    "train.entropy_coef": (lambda v: v >= 0, ">= 0"),
    "train.lr": (_positive, "> 0"),
    "train.enc_lr_scale": (lambda v: v >= 0, ">= 0"),
    "train.adam_eps": (_positive, "> 0"),
    "train.pi_adam_eps": (_positive, "> 0"),
    "train.grad_clip_norm": (_positive, "> 0"),
    "train.tau": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.discount_denom": (_positive, "> 0"),
    "train.discount_min": (lambda v: 0 < v < 1, "in (0, 1)"),
    "train.discount_max": (lambda v: 0 < v < 1, "in (0, 1)"),
    "train.task_emb_policy_grad": (lambda v: v in ("release", "head"), "'release' or 'head'"),
    "planner.horizon": (_positive_int, "an int >= 1"),
    "planner.iterations": (_positive_int, "an int >= 1"),
    "planner.num_samples": (_positive_int, "an int >= 1"),
    "planner.num_elites": (_positive_int, "an int >= 1"),
    "planner.temperature": (_positive, "> 0"),
    "planner.min_std": (_positive, "> 0"),
    "planner.max_std": (_positive, "> 0"),
    "planner.compute_dtype": (lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise a :class:`~mtdistill_jax.errors.UserError` naming the field when a value (e.g. a command-line
    override) cannot work: sizes and counts >= 1, rates and coefficients in range, planner counts consistent."""
    check_model_config(config.model)
    for path, (test, what) in _CHECKS.items():
        node = config
        for key in path.split("."):
            node = node.get(key) if node is not None else None
        if node is not None and not test(node):
            raise UserError(f"config field {path} must be {what}, got {node!r}")
    t, p = config.get("train"), config.get("planner")
    if t is not None and t.discount_min > t.discount_max:
        raise UserError(f"config field train.discount_min {t.discount_min} is above train.discount_max "
                        f"{t.discount_max}")
    if p is not None:
        if not 0 <= p.num_pi_trajs < p.num_samples:
            raise UserError(f"config field planner.num_pi_trajs must be in [0, planner.num_samples="
                            f"{p.num_samples}), got {p.num_pi_trajs}")
        if p.num_elites > p.num_samples:
            raise UserError(f"config field planner.num_elites must be <= planner.num_samples={p.num_samples}, "
                            f"got {p.num_elites}")
        if p.min_std > p.max_std:
            raise UserError(f"config field planner.min_std {p.min_std} is above planner.max_std {p.max_std}")


def get_smoke_config() -> ml_collections.ConfigDict:
    """A small config for tests: 1M model, batch 8, 16 planner samples, 2 iterations."""
    c = get_config(1, "mt30")
    c.train.batch_size = 8
    c.planner.iterations = 2
    c.planner.num_samples = 16
    c.planner.num_pi_trajs = 4
    c.planner.num_elites = 4
    c.steps = 1
    return c
