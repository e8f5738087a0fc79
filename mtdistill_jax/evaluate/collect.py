"""Data collection: roll an agent out in the MJX MT30 tasks and write the episodes as a native dataset.

:func:`collect` runs the evaluation program (:func:`~mtdistill_jax.evaluate.program.make_eval_program`: K tasks x
E episodes side by side, ``chunk`` agent steps per compiled ``lax.scan``) with the transitions recorded, and
writes each finished round of episodes with :class:`~mtdistill_jax.data.native.DatasetWriter` in the official
frame layout (``obs[0]`` the reset observation, ``action[t]``/``reward[t]`` the step that led to ``obs[t]``, frame
0 of action/reward filler). Episodes run in rounds of ``round_episodes`` per task; each round is flushed to disk
(one shard) before the next starts, so a crash loses at most the round in flight, and the same command again
resumes after the rounds on disk. Round ``r`` is seeded with ``fold_in(key(seed), r)``: the same seed gives the
same data, and a run with another seed appends to the dataset (a finished seed of the same agent is refused).

Policies: ``'planner'`` acts as the evaluator does (MPPI, official ``act``); ``'prior'`` acts with the policy prior
alone (one forward per step, far cheaper on CPU); ``noise`` adds Gaussian exploration noise.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from mtdistill_jax.errors import UserError
from mtdistill_jax.evaluate.program import check_eval_args, compiled_program, episode_length_of
from mtdistill_jax.evaluate.result import EvalResult


def transitions_to_episodes(obs0, obs, action, reward, task):
    """Episodes in the official frame layout from per-step arrays of N envs over T steps.

    ``obs0 [N, O]`` reset observations; ``obs [T, N, O]`` the observation each step produced, ``action [T, N, A]``,
    ``reward [T, N]``, ``task [N]`` -> :class:`~mtdistill_jax.data.tdmpc2_format.Episodes` with obs [N, T+1, O],
    action [N, T+1, A], reward [N, T+1] (frame 0 of action and reward: NaN filler, as in the official files).
    """
    from mtdistill_jax.data.tdmpc2_format import Episodes

    obs0, obs, action, reward = (np.asarray(x, np.float32) for x in (obs0, obs, action, reward))
    N, A = obs0.shape[0], action.shape[-1]
    frames = np.concatenate([obs0[None], obs]).transpose(1, 0, 2)
    action = np.concatenate([np.full((1, N, A), np.nan, np.float32), action]).transpose(1, 0, 2)
    reward = np.concatenate([np.full((1, N), np.nan, np.float32), reward]).transpose(1, 0)
    return Episodes(obs=np.ascontiguousarray(frames), action=np.ascontiguousarray(action),
                    reward=np.ascontiguousarray(reward), task=np.asarray(task, np.int32))


def collect(params, config: ml_collections.ConfigDict, out: str | os.PathLike, tasks: Sequence[str] | None = None,
            episodes: int = 10, *, policy: str = "planner", mode: str = "sample", noise: float = 0.0,
            episode_length: int | None = None, seed: int = 0, round_episodes: int | None = None, chunk: int = 10,
            source: str = "", progress: bool = True) -> EvalResult:
    """Roll out ``params`` (a WorldModel tree of ``config.model``) for ``episodes`` episodes of each of ``tasks``
    and append them to the native dataset ``out`` (created if missing). Returns the episodes' returns as an
    :class:`~mtdistill_jax.evaluate.result.EvalResult` (``seconds``: rollout time; ``compile_seconds``: building
    and compiling the program, 0 when this process already compiled it).

    ``round_episodes`` (default: all at once) bounds the episodes per task in flight; ``source`` (e.g. the
    agent's path) is recorded in the manifest with the seed, policy, mode and noise.
    """
    from mtdistill_jax.data.native import DatasetWriter, is_dataset_dir, open_dataset

    tasks = check_eval_args(config.model.task_set, tasks, episodes, mode, chunk, episode_length, policy)
    T = episode_length_of(config.model.task_set, tasks, episode_length)
    if noise < 0:
        raise UserError(f"noise must be >= 0, got {noise}")
    per_round = min(episodes, round_episodes or episodes)
    if per_round < 1:
        raise UserError(f"round_episodes must be >= 1, got {round_episodes}")
    record = {"name": f"collect:{source or 'agent'}:seed{seed}", "kind": "collect", "agent": source, "seed": seed,
              "policy": policy, "mode": mode, "noise": float(noise), "tasks": list(tasks), "episodes": episodes}
    out = os.fspath(out)
    append = is_dataset_dir(out)
    K = len(tasks)
    rounds = math.ceil(episodes / per_round)
    on_disk = []  # shards of an interrupted run of this source: its first rounds, resumed after them
    if append:
        existing = open_dataset(out)
        if any(s.get("name") == record["name"] for s in existing.manifest.get("sources", [])):
            raise UserError(f"{out} already holds episodes collected from {source or 'this agent'} with seed {seed} "
                            f"({record['name']}); use another --seed to add different episodes")
        on_disk = [s for s in existing.manifest["shards"] if s.get("source") == record["name"]]
        sizes = [s["episodes"][1] - s["episodes"][0] for s in on_disk]
        wanted = [K * min(per_round, episodes - r * per_round) for r in range(len(on_disk))]
        if sizes != wanted:
            raise UserError(f"{out} holds {sum(sizes)} episodes of an interrupted collection with seed {seed} in "
                            f"rounds of {sizes}; resume it with the same --tasks, --episodes and --round_episodes "
                            f"(rounds of {K} x {per_round}), or use another --seed")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    key = jax.random.key(seed)
    env, init, run, compile_s = compiled_program(config, tasks, per_round, mode, chunk, T, params=params,
                                                 policy=policy, noise=noise, transitions=True)
    num_envs = env.num_envs
    carry = init(jax.random.fold_in(key, 0))
    returns = np.zeros((K, episodes), np.float64)
    if on_disk:  # the returns of the rounds already written are the sums of their rewards
        data = open_dataset(out)
        for r, shard in enumerate(on_disk):
            eps = data.episodes(np.arange(*shard["episodes"]))
            n = min(per_round, episodes - r * per_round)
            returns[:, r * per_round:r * per_round + n] = np.nansum(eps.reward[:, 1:], axis=1).reshape(K, n)
    seconds = 0.0
    writer = DatasetWriter(out, config.model.task_set, T, shard_episodes=max(1, K * per_round), append=append)
    writer.begin_source(record)
    with tqdm(total=rounds * T, initial=len(on_disk) * T, desc=f"collect {K} tasks x {episodes} episodes ({policy})",
              unit="step", disable=not progress) as bar:
        for r in range(len(on_disk), rounds):
            if r:
                carry = init(jax.random.fold_in(key, r))
            obs0 = np.asarray(carry.env_state.obs)
            task = np.asarray(carry.env_state.task)
            parts = []
            t = time.perf_counter()
            for _ in range(T // chunk):
                carry, tr = run(params, carry)
                parts.append(jax.device_get((tr.next_obs, tr.action, tr.reward)))
                bar.update(chunk)
            seconds += time.perf_counter() - t
            obs, action, reward = (np.concatenate(x) for x in zip(*parts, strict=True))
            n = min(per_round, episodes - r * per_round)  # episodes of this round that are wanted, per task
            rows = (np.arange(K)[:, None] * per_round + np.arange(n)[None, :]).reshape(-1)  # task-major rows
            writer.add(transitions_to_episodes(obs0[rows], obs[:, rows], action[:, rows], reward[:, rows],
                                               task[rows]))
            writer.flush()  # the round is on disk before the next one starts
            returns[:, r * per_round:r * per_round + n] = np.asarray(carry.returns, np.float64).reshape(
                K, per_round)[:, :n]
    writer.end_source()
    writer.close()
    return EvalResult(tasks=list(tasks), returns=returns, mode=f"{policy}/{mode}", seconds=seconds,
                      compile_seconds=compile_s, plan_calls=rounds * T * num_envs, seeds=(seed,),
                      episode_length=T)
