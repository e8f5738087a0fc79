"""Online training config: the training config plus the tasks to learn and ``online`` (envs, seeding, replay).

``get_config()`` is what ``launch/train.py --config=mtdistill_jax/configs/online.py`` uses: the official online
trainer's settings (``tdmpc2/config.yaml``: 10M env steps, ``seed_steps = max(1000, 5 * episode_length)`` of
random actions, then one update per env step, buffer ``min(steps, 1M)``, batch 256, the 5M model) on one task,
cartpole-balance, with one env. ``--config.tasks=a,b,c`` learns several MT30 tasks in one program,
``--config.online.envs_per_task=N`` steps N envs of each task in lockstep (then give ``steps``, ``log_every``,
``--save_every`` and ``--eval_every`` as multiples of the number of envs, see below). ``--config.model_size=N``
picks the model size (the MT30 multi-task architecture: padded observations and actions, a task embedding).

Steps are *env steps*, all envs together, as the official ``steps``: ``config.steps``, ``config.log_every`` and
the launch flags ``--save_every``/``--eval_every`` count env steps and must be multiples of the number of envs
(tasks x envs_per_task), since all envs step at once.
"""

from __future__ import annotations

import ml_collections

from mtdistill_jax.configs import train as train_config
from mtdistill_jax.configs.distill import resolve  # noqa: F401  (model_size -> model, shared with distill)
from mtdistill_jax.errors import UserError

OFFICIAL_BUFFER_SIZE = 1_000_000  # official buffer_size; capacity = min(steps, buffer_size)


def get_online_config() -> ml_collections.ConfigDict:
    """Envs, seed phase, update ratio and replay of the fused online loop (:mod:`mtdistill_jax.tdmpc2.online`)."""
    c = ml_collections.ConfigDict()
    c.envs_per_task = 1  # envs of each task stepping in lockstep (official: 1 env)
    c.episode_length = 0  # agent steps per episode (0: the task set's, MT30 500 = official)
    c.seed_steps = -1  # env steps of uniform random actions before learning (-1: official max(1000, 5 x length))
    c.seed_updates = -1  # updates at the end of the seed phase (-1: official, as many as seed_steps)
    c.utd = 1.0  # updates per env step after the seed phase (official 1)
    c.buffer_size = OFFICIAL_BUFFER_SIZE  # replay capacity in transitions = min(steps, buffer_size)
    c.agent_steps_per_dispatch = 50  # most agent steps (every env steps once) inside one compiled chunk
    c.lock()
    return c


def get_config(model_size: int = 5, task_set: str = "mt30") -> ml_collections.ConfigDict:
    """Training config (``configs/train.py``) + ``tasks`` + ``model_size`` + ``online``."""
    c = train_config.get_config(model_size, task_set)
    with c.unlocked():
        c.tasks = "cartpole-balance"  # comma-separated tasks of the task set learned online in one program
        c.model_size = model_size  # model size (1/5/19/48/317; official single-task default 5)
        c.online = get_online_config()  # envs, seeding, update ratio, replay
    c.steps = 10_000_000  # env steps, all envs together (official steps)
    c.log_every = 1000  # env steps between metric logs
    return c


def task_list(config: ml_collections.ConfigDict) -> list[str]:
    """``config.tasks`` (a config or its saved JSON) as a list of names (comma-separated string or a list)."""
    tasks = config["tasks"]
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    return list(tasks)


def num_envs(config: ml_collections.ConfigDict) -> int:
    return len(task_list(config)) * int(config.online.envs_per_task)


def check_config(config: ml_collections.ConfigDict) -> None:
    """The training config's checks plus the online fields (a UserError naming the field)."""
    from mtdistill_jax.configs.tasks import get_task_set

    train_config.check_config(config)
    if config.get("model_size") is not None and config.model_size not in (1, 5, 19, 48, 317):
        raise UserError(f"config field model_size must be one of 1, 5, 19, 48, 317, got {config.model_size!r}")
    ts = get_task_set(config.model.task_set)
    tasks = task_list(config)
    if not tasks:
        raise UserError(f"config field tasks is empty; give tasks of {ts.name}, e.g. --config.tasks=cartpole-balance")
    unknown = [t for t in tasks if t not in ts.tasks]
    if unknown:
        raise UserError(f"config field tasks: {', '.join(unknown)} not in {ts.name}; valid: {', '.join(ts.tasks)}")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"config field tasks names a task twice: {', '.join(tasks)}")
    o = config.online
    for name in ("envs_per_task", "agent_steps_per_dispatch", "buffer_size"):
        if not (isinstance(o[name], int) and o[name] >= 1):
            raise UserError(f"config field online.{name} must be an int >= 1, got {o[name]!r}")
    if not (isinstance(o.episode_length, int) and o.episode_length >= 0):
        raise UserError(f"config field online.episode_length must be an int >= 0 (0: the task set's), got "
                        f"{o.episode_length!r}")
    for name in ("seed_steps", "seed_updates"):
        if not (isinstance(o[name], int) and o[name] >= -1):
            raise UserError(f"config field online.{name} must be an int >= 0 (-1: official), got {o[name]!r}")
    if not o.utd > 0:
        raise UserError(f"config field online.utd must be > 0, got {o.utd!r}")
    m = num_envs(config)
    for name in ("steps", "log_every"):
        if config[name] % m:
            raise UserError(f"config field {name}={config[name]} is not a multiple of the {m} envs "
                            f"({len(tasks)} tasks x online.envs_per_task={o.envs_per_task}) that step together")


def get_smoke_config() -> ml_collections.ConfigDict:
    """A small online config for tests: the 1M model, the training smoke config's batch and planner, episodes of
    8 steps, 3 seed steps and 3 pretraining updates, 16 env steps."""
    c = get_config(1, "mt30")
    smoke = train_config.get_smoke_config()
    c.train.batch_size = smoke.train.batch_size
    c.planner = smoke.planner
    c.online.episode_length = 8
    c.online.seed_steps = 3
    c.online.seed_updates = 3
    c.online.agent_steps_per_dispatch = 4
    c.steps = 16
    c.log_every = 4
    return c
