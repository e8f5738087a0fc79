"""What the mains that roll an agent out in MJX share (``launch/evaluate.py``, ``launch/collect.py``)."""

from __future__ import annotations

from collections.abc import Sequence

from mtdistill_jax import cli


def rollout_setup(agent_path: str, tasks: Sequence[str] | None, episodes: int, mode: str, chunk: int,
                  episode_length: int | None, policy: str = "planner"):
    """``(agent, config, tasks, episode_length)`` for rolling out the agent export or official ``.pt`` at
    ``agent_path``: the agent (compute-ready params), a training config around its network config, the checked
    task list (default: the agent's whole task set) and the episode length. Bad tasks, modes or lengths are
    usage errors naming the flag; nothing is built or compiled."""
    from mtdistill_jax.checkpoint.export import load_agent
    from mtdistill_jax.configs.train import get_config
    from mtdistill_jax.evaluate import check_eval_args, episode_length_of

    agent = load_agent(agent_path)
    try:  # the task names against the agent's task set, before anything is built or compiled
        tasks = check_eval_args(agent.config.task_set, tasks, episodes, mode, 1, episode_length, policy)
        length = episode_length_of(agent.config.task_set, tasks, episode_length)
    except cli.UserError as e:
        raise cli.UsageError(f"--tasks: {e}") from e
    if length % chunk:
        raise cli.UsageError(f"--chunk={chunk} must divide the task set's episode length {length} "
                             "(or give --episode_length)")
    config = get_config(agent.config.model_size, agent.config.task_set)
    with config.unlocked():
        config.model = agent.config
    return agent, config, tasks, length
