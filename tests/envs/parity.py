"""Replaying recorded official (dm_control + TD-MPC2 wrapper) episodes through our MJX environments."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtdistill_jax import envs

MODEL_FIELDS = ("geom_pos", "geom_size", "site_pos", "site_size", "body_pos", "body_quat")


@functools.cache
def get_env(task: str):
    return envs.make(task)


def load_episode(path) -> dict:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def episode_info(env, ep: dict) -> dict:
    fields = {f: ep[f"model_{f}"] for f in MODEL_FIELDS if f"model_{f}" in ep}
    return env.info_from_model_fields(fields)


def _state(env, ep, t, info, prefix=""):
    act = ep[prefix + "act"][t] if ep[prefix + "act"].size else None
    return env.state_from_physics(ep[prefix + "qpos"][t], ep[prefix + "qvel"][t], act, ep[prefix + "time"][t],
                                  ctrl=ep["ctrl"][t] if not prefix else None,
                                  qacc_warmstart=ep["qacc_warmstart"][t] if not prefix else None, info=info)


def obs_key_slices(ep) -> dict[str, slice]:
    out, start = {}, 0
    for k, n in zip(ep["obs_keys"], ep["obs_key_sizes"], strict=True):
        out[str(k)] = slice(start, start + int(n))
        start += int(n)
    return out


@functools.cache
def _batched_fns(task: str):
    env = get_env(task)

    def obs_at(qpos, qvel, act, time, ctrl, info):
        return env.state_from_physics(qpos, qvel, act, time, ctrl=ctrl, info=info).obs

    def step_from(qpos, qvel, act, time, ctrl, warm, info, action):
        s = env.state_from_physics(qpos, qvel, act, time, ctrl=ctrl, qacc_warmstart=warm, info=info)
        n = env.step(s, action)
        return n.obs, n.reward, n.data.qpos, n.data.qvel

    in_axes = (0, 0, 0, 0, 0, None)
    return (jax.jit(jax.vmap(obs_at, in_axes=in_axes)),
            jax.jit(jax.vmap(step_from, in_axes=(0, 0, 0, 0, 0, 0, None, 0))))


def replay(task: str, ep: dict) -> dict:
    """Observations at every recorded state, and one step from every recorded state with its action."""
    env = get_env(task)
    info = episode_info(env, ep)
    obs_fn, step_fn = _batched_fns(task)
    T = ep["action"].shape[0]
    act = ep["act"] if ep["act"].size else np.zeros((T + 1, 0))
    nu = env.action_size
    ctrl = ep["ctrl"] if ep["ctrl"].shape[-1] == nu else np.zeros((T + 1, nu))
    obs = np.asarray(obs_fn(ep["qpos"], ep["qvel"], act, ep["time"], ctrl, info))
    s_obs, s_rew, s_qpos, s_qvel = step_fn(ep["qpos"][:T], ep["qvel"][:T], act[:T], ep["time"][:T], ctrl[:T],
                                           ep["qacc_warmstart"][:T], info, jnp.asarray(ep["action"]))
    return {"obs": obs, "step_obs": np.asarray(s_obs), "step_reward": np.asarray(s_rew),
            "step_qpos": np.asarray(s_qpos), "step_qvel": np.asarray(s_qvel)}
