"""Replaying the update-step reference (``update_*.npz``, reference README section 5): the case's config, its
batches and recorded draws, and the comparison of one step's outputs with every stored quantity.

Tolerances (reference README, "Suggested tolerances"; float32 round-off, an independent re-implementation
stays below a fifth of them): step-1 arrays atol 1e-5, step-2/3 arrays atol 1e-4, scalars rtol 1e-4,
parameters atol 3e-5. ``pi_scaled_entropy_all`` (values reach ~140) is action_dims times a sum over the
A padded dims of log-std terms, so it is compared per term: divided by action_dims * A, on the log-std
scale, with the array atol. Arrays also get rtol 1e-6 (a few float32 ulps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from refdata import load_update_case, reference_dir

from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint, params_to_state_dict
from mtdistill_jax.configs import get_config
from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.tdmpc2.losses import Draws
from mtdistill_jax.types import Batch

STEP1_ATOL, LATER_ATOL, SCALAR_RTOL, PARAM_ATOL = 1e-5, 1e-4, 1e-4, 3e-5
ARRAY_RTOL = 1e-6  # a few float32 ulps
GRAD_NORM_ATOL = 1e-7  # per-tensor grad norms: relative, plus this floor for tensors with ~zero gradient
VARIANTS = ("head", "release", "clip")
ARRAYS = ("td_targets", "td_q", "td_action", "zs", "next_z", "pi_action", "pi_mean", "pi_log_std",
          "pi_scaled_entropy_all", "pi_q", "task_emb_at_td")
SCALARS = {"consistency_loss": "train/consistency_loss", "reward_loss": "train/reward_loss",
           "value_loss": "train/value_loss", "total_loss": "train/total_loss", "grad_norm": "train/grad_norm",
           "pi_loss": "train/pi_loss", "pi_grad_norm": "train/pi_grad_norm", "pi_entropy": "train/pi_entropy",
           "pi_scaled_entropy": "train/pi_scaled_entropy", "pi_scale": "train/pi_scale"}


@functools.cache
def case(name: str):
    """(json, npz, imported checkpoint, config built from the json's hyperparameters)."""
    meta, ref = load_update_case(name)
    ckpt = load_tdmpc2_checkpoint(reference_dir() / meta["start_checkpoint"])
    hp = meta["hyperparameters"]
    config = get_config(ckpt.config.model_size, ckpt.config.task_set)
    for k in ckpt.config:  # the architecture the checkpoint holds (the json's task_dim etc. are checked below)
        config.model[k] = ckpt.config[k]
    config.model.dropout = float(hp["dropout"])  # the recording ran with dropout 0 (deterministic given the draws)
    config.train.batch_size = int(hp["batch_size"])
    check_config(config)
    return meta, ref, ckpt, config


def variant_config(name: str, variant: str):
    _, ref, _, config = case(name)
    config = config.copy_and_resolve_references()
    config.train.task_emb_policy_grad = "release" if variant == "release" else "head"
    if variant == "clip":
        config.train.grad_clip_norm = float(ref["clip/grad_clip_norm"])
    return config


def step_prefix(variant: str, k: int) -> str:
    return f"head/step{k}" if (variant == "release" and k == 1) else f"{variant}/step{k}"  # release/step1 == head


def draws_of(ref, prefix: str) -> Draws:
    return Draws(td_eps=jnp.asarray(ref[f"{prefix}/td_eps"]), td_heads=jnp.asarray(ref[f"{prefix}/td_qidx"], jnp.int32),
                 pi_eps=jnp.asarray(ref[f"{prefix}/pi_eps"]), pi_heads=jnp.asarray(ref[f"{prefix}/pi_qidx"], jnp.int32))


def batch_of(ref, k: int) -> Batch:
    return Batch(obs=jnp.asarray(ref[f"batch{k}/obs"]), action=jnp.asarray(ref[f"batch{k}/action"]),
                 reward=jnp.asarray(ref[f"batch{k}/reward"]), task=jnp.asarray(ref[f"batch{k}/task"], jnp.int32))


def torch_named(config, tree) -> dict:
    """Our params-shaped tree under the official state_dict names, torch layout (the importer's mapping)."""
    sd = params_to_state_dict(config.model, tree, tree["Qs"])
    return {k: np.asarray(v) for k, v in sd.items() if isinstance(v, np.ndarray)}


def wm_grad_tree(config, inter, state):
    """Pre-clip world-model gradients as a full params tree (zeros for the policy, which has none here)."""
    pi = jax.tree_util.tree_map(np.zeros_like, state.params["pi_head"])
    return torch_named(config, {**inter["wm_grads"], "pi_head": pi})


def step_records(meta, ref, config, p: str, k: int, state, metrics, inter, *, leak: bool,
                 scalars: dict[str, str] = SCALARS) -> list[tuple]:
    """``(kind, step, field, error, tolerance)`` for every quantity stored under prefix ``p`` (update step ``k``
    on ``batch{k}``), from our state, metrics and intermediates after that step; ``leak``: compare the
    task-embedding gradient the policy left (HEAD); ``scalars``: reference name -> our metric name."""
    out = []
    atol = STEP1_ATOL if k == 1 else LATER_ATOL
    fields = list(ARRAYS) + (["leaked_task_emb_grad"] if leak else [])
    for f in fields:
        if f"{p}/{f}" not in ref:
            continue
        ours = np.asarray(inter["task_emb_grad"] if f == "leaked_task_emb_grad" else inter[f])
        want = ref[f"{p}/{f}"]
        assert np.shape(ours) == want.shape, (p, f, np.shape(ours), want.shape)
        if f == "pi_scaled_entropy_all":  # action_dims * (sum of A log-prob terms): compare per term
            ts = get_task_set(config.model.task_set)
            terms = np.asarray(ts.action_dims, np.float32)[ref[f"batch{k}/task"]][:, None] * ts.action_pad
            ours, want = ours / terms, want / terms
        err = np.abs(np.asarray(ours, np.float64) - want)
        out.append(("array", k, f, float(np.max(err - ARRAY_RTOL * np.abs(want))), atol))
    for f, m in scalars.items():
        want = float(ref[f"{p}/{f}"])
        out.append(("scalar", k, f, abs(float(metrics[m]) - want) / max(abs(want), 1e-12), SCALAR_RTOL))
    assert float(ref[f"{p}/termination_loss"]) == 0.0  # episodic false: no termination head
    clip = config.train.grad_clip_norm
    for f, norm in (("clip_coef", metrics["train/grad_norm"]), ("pi_clip_coef", metrics["train/pi_grad_norm"])):
        if f"{p}/{f}" in ref:
            want = float(ref[f"{p}/{f}"])
            out.append(("scalar", k, f, abs(min(1.0, clip / (float(norm) + 1e-6)) - want) / want, SCALAR_RTOL))
    if f"{p}/scale_value" in ref:
        want = float(ref[f"{p}/scale_value"][0])
        out.append(("scalar", k, "scale_value", abs(float(state.scale) - want) / want, SCALAR_RTOL))
    # per-tensor grad norms and the stored pre-clip gradients
    if f"{p}/wm_grad_norms" in ref:
        grads = wm_grad_tree(config, inter, state)
        ours = np.asarray([np.linalg.norm(grads[key].astype(np.float64)) for key in meta["wm_grad_norm_keys"]])
        want = ref[f"{p}/wm_grad_norms"]
        out.append(("grad_norms", k, "wm_grad_norms",
                    float(np.max((np.abs(ours - want) - GRAD_NORM_ATOL) / want)), SCALAR_RTOL))
        for key in (kk.split("/wm_grad/")[1] for kk in ref if kk.startswith(f"{p}/wm_grad/")):
            g = grads[key].reshape(-1)
            if f"sample_idx/{key}" in ref:
                g = g[ref[f"sample_idx/{key}"]]
            want = ref[f"{p}/wm_grad/{key}"].reshape(-1)
            out.append(("wm_grad", k, key, float(np.max(np.abs(g - want))), atol))
    if f"{p}/pi_grad_norms" in ref:
        grads = torch_named(config, {**jax.tree_util.tree_map(np.zeros_like, state.params),
                                     "pi_head": inter["pi_grads"]})
        ours = np.asarray([np.linalg.norm(grads[key].astype(np.float64)) for key in meta["pi_grad_norm_keys"]])
        want = ref[f"{p}/pi_grad_norms"]
        out.append(("grad_norms", k, "pi_grad_norms",
                    float(np.max((np.abs(ours - want) - GRAD_NORM_ATOL) / want)), SCALAR_RTOL))
    # parameters after the stored steps (full small tensors, sampled flat indices of large ones)
    keys = [kk.split("/params/")[1] for kk in ref if kk.startswith(f"{p}/params/")]
    if keys:
        sd = params_to_state_dict(config.model, state.params, state.target_q_params)
        for key in keys:
            v = np.asarray(sd[key]).reshape(-1)
            if f"sample_idx/{key}" in ref:
                v = v[ref[f"sample_idx/{key}"]]
            want = ref[f"{p}/params/{key}"].reshape(-1)
            out.append(("params", k, key, float(np.max(np.abs(v - want))), PARAM_ATOL))
    return out


