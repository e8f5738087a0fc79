"""Update-step parity with the official TD-MPC2 code (``update_*.npz``, reference README section 5).

Every ``update_<name>.npz`` found in ``MTDISTILL_REFERENCE_DIR`` is replayed from the world-model checkpoint its
json names: three consecutive updates in the HEAD, release and clip (grad_clip_norm 0.1) variants, dropout off
and the recorded draws (policy noise, Q-head choices) injected through ``update(..., draws=Draws(...))``.
Everything stored is compared: TD targets, latents, policy outputs, every loss, grad norms (global and per
tensor), pre-clip gradients, the running scale and the parameters after the stored steps. The ``distill/``
prefix belongs to the distillation suite.

Tolerances (reference README, "Suggested tolerances"; float32 round-off, an independent re-implementation
stays below a fifth of them): step-1 arrays atol 1e-5, step-2/3 arrays atol 1e-4, scalars rtol 1e-4,
parameters atol 3e-5. ``pi_scaled_entropy_all`` (values reach ~140) is action_dims times a sum over the
A padded dims of log-std terms, so it is compared per term: divided by action_dims * A, on the log-std
scale, with the array atol. Arrays also get rtol 1e-6 (a few float32 ulps). They still tell HEAD from
release: ``test_head_and_release_are_told_apart``.

Run ``python tests/tdmpc2/test_update_parity.py`` to print the worst error per prefix, step and kind.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from refdata import load_update_case, reference_dir, update_cases

from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint, params_to_state_dict
from mtdistill_jax.configs import get_config
from mtdistill_jax.configs.tasks import get_task_set, task_discounts
from mtdistill_jax.configs.train import check_config
from mtdistill_jax.nn import make_world_model
from mtdistill_jax.tdmpc2.losses import Draws, running_scale_percentiles, running_scale_update
from mtdistill_jax.tdmpc2.train import init_training_state, make_update_fn
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
CASES = update_cases()
pytestmark = pytest.mark.skipif(not CASES, reason=f"no update_*.npz in {reference_dir()}")


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


@functools.cache
def trajectory(name: str, variant: str):
    """Our three updates with the recorded draws: ``[(state after step k, metrics, intermediates)]``."""
    _, ref, ckpt, _ = case(name)
    config = variant_config(name, variant)
    model = make_world_model(config.model)
    update = jax.jit(make_update_fn(model, config, return_intermediates=True))
    state = init_training_state(config, params=ckpt.params, target_q_params=ckpt.target_q_params)
    out = []
    for k in (1, 2, 3):
        state, metrics, inter = update(state, batch_of(ref, k), jax.random.key(k),
                                       draws_of(ref, step_prefix(variant, k)))
        out.append(jax.device_get((state, metrics, inter)))
    return out, config


def torch_named(config, tree) -> dict:
    """Our params-shaped tree under the official state_dict names, torch layout (the importer's mapping)."""
    sd = params_to_state_dict(config.model, tree, tree["Qs"])
    return {k: np.asarray(v) for k, v in sd.items() if isinstance(v, np.ndarray)}


def wm_grad_tree(config, inter, state):
    """Pre-clip world-model gradients as a full params tree (zeros for the policy, which has none here)."""
    pi = jax.tree_util.tree_map(np.zeros_like, state.params["pi_head"])
    return torch_named(config, {**inter["wm_grads"], "pi_head": pi})


def records(name: str, variant: str):
    """``(kind, step, field, error, tolerance)`` for every stored quantity of one variant."""
    meta, ref, ckpt, _ = case(name)
    traj, config = trajectory(name, variant)
    out = []
    for k, (state, metrics, inter) in enumerate(traj, start=1):
        p = step_prefix(variant, k)
        if variant == "release" and k == 1:
            continue  # identical to head/step1 (checked by the recording)
        atol = STEP1_ATOL if k == 1 else LATER_ATOL
        fields = list(ARRAYS) + (["leaked_task_emb_grad"] if variant == "head" else [])
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
        for f, m in SCALARS.items():
            want = float(ref[f"{p}/{f}"])
            out.append(("scalar", k, f, abs(float(metrics[m]) - want) / max(abs(want), 1e-12), SCALAR_RTOL))
        assert float(ref[f"{p}/termination_loss"]) == 0.0  # episodic false: no termination head
        clip = variant_config(name, variant).train.grad_clip_norm
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


def worst(recs):
    """Worst (error / tolerance) per (kind, step)."""
    table = {}
    for kind, k, f, err, tol in recs:
        cur = table.get((kind, k))
        if cur is None or err / tol > cur[1] / cur[2]:
            table[(kind, k)] = (f, err, tol)
    return table


def test_config_matches_reference_hyperparameters():
    for name in CASES:
        meta, ref, ckpt, config = case(name)
        hp, tc, mc = meta["hyperparameters"], config.train, config.model
        for k in ("horizon", "rho", "consistency_coef", "reward_coef", "value_coef", "entropy_coef", "tau",
                  "grad_clip_norm", "lr", "enc_lr_scale", "discount_denom", "discount_min", "discount_max"):
            assert tc[k] == pytest.approx(hp[k], rel=1e-12), k
        for k in ("num_q", "num_bins", "vmin", "vmax", "log_std_min", "log_std_max"):
            assert mc[k] == pytest.approx(hp[k], rel=1e-12), k
        for k in ("latent_dim", "task_dim", "mlp_dim", "enc_dim", "num_enc_layers", "simnorm_dim"):
            assert mc[k] == meta["cfg"][k], k
        assert not hp["episodic"]  # no termination head in our learner
        groups = meta["optimizers"]["world_model"]["param_groups"]
        assert {g["eps"] for g in groups} == {tc.adam_eps}
        assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.999)}
        assert min(g["lr"] for g in groups if g["n_params"]) == pytest.approx(tc.lr * tc.enc_lr_scale)
        assert meta["optimizers"]["pi"]["param_groups"][0]["eps"] == tc.pi_adam_eps
        np.testing.assert_array_equal(task_discounts(config), ref["discount"])
        assert tc.task_emb_policy_grad == "release"  # the default stays the release behaviour


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_steps_match_official(name, variant):
    recs = records(name, variant)
    kinds = {r[0] for r in recs}
    assert {"array", "scalar", "params"} <= kinds if variant != "clip" else {"scalar", "params"} <= kinds
    bad = [r for r in recs if not r[3] <= r[4]]
    assert not bad, "\n".join(f"{variant}/step{k} {kind} {f}: error {e:.3g} > tol {t:.1g}" for kind, k, f, e, t in bad)


@pytest.mark.parametrize("name", CASES)
def test_head_and_release_are_told_apart(name):
    """The tolerances separate the two task-embedding behaviours: each run fails the other's reference."""
    _, ref, _, config = case(name)
    head, _ = trajectory(name, "head")
    release, _ = trajectory(name, "release")
    for k in (2, 3):
        for ours, other in ((head, "release"), (release, "head")):
            got, want = float(ours[k - 1][1]["train/grad_norm"]), float(ref[f"{other}/step{k}/grad_norm"])
            assert abs(got - want) / want > 10 * SCALAR_RTOL, (k, other)
    key = "_task_emb.weight"
    h = params_to_state_dict(config.model, head[2][0].params)[key]
    r = params_to_state_dict(config.model, release[2][0].params)[key]
    assert np.max(np.abs(h - ref[f"release/step3/params/{key}"])) > 10 * PARAM_ATOL
    assert np.max(np.abs(r - ref[f"head/step3/params/{key}"])) > 10 * PARAM_ATOL
    # release carries nothing; HEAD carries the leaked gradient
    assert not np.any(release[2][0].task_emb_grad) and np.any(head[2][0].task_emb_grad)


@pytest.mark.parametrize("name", CASES)
def test_running_scale_check(name):
    _, ref, _, _ = case(name)
    scale, i = jnp.ones((), jnp.float32), 1
    while f"scale_check/x{i}" in ref:
        x = jnp.asarray(ref[f"scale_check/x{i}"])
        lo, hi = running_scale_percentiles(x)
        np.testing.assert_allclose(np.asarray([lo, hi]), ref[f"scale_check/percentiles{i}"][:, 0], rtol=1e-6,
                                   atol=1e-6)
        scale = running_scale_update(scale, x, 0.01)
        np.testing.assert_allclose(float(scale), ref[f"scale_check/value_after{i}"][0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(x / scale), ref[f"scale_check/scaled{i}"], rtol=1e-6, atol=1e-7)
        i += 1
    assert i > 1, "scale_check/ holds no inputs"


if __name__ == "__main__":
    for name in CASES:
        for variant in VARIANTS:
            for (kind, k), (f, err, tol) in sorted(worst(records(name, variant)).items()):
                print(f"{name} {variant}/step{k} {kind:10s} worst {f:32s} {err:.3g} (tol {tol:.0e})")
