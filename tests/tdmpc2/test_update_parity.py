"""Update-step parity with the official TD-MPC2 code (``update_*.npz``, reference README section 5).

Every ``update_<name>.npz`` found in ``MTDISTILL_REFERENCE_DIR`` is replayed from the world-model checkpoint its
json names: three consecutive updates in the HEAD, release and clip (grad_clip_norm 0.1) variants, dropout off
and the recorded draws (policy noise, Q-head choices) injected through ``update(..., draws=Draws(...))``.
Everything stored is compared: TD targets, latents, policy outputs, every loss, grad norms (global and per
tensor), pre-clip gradients, the running scale and the parameters after the stored steps. The ``distill/``
prefix belongs to the distillation suite.

Tolerances and the per-step comparison: ``tests/update_ref.py``. They still tell HEAD from release:
``test_head_and_release_are_told_apart``.

Run ``python tests/tdmpc2/test_update_parity.py`` to print the worst error per prefix, step and kind.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from refdata import update_cases
from update_ref import (
    PARAM_ATOL,
    SCALAR_RTOL,
    VARIANTS,
    batch_of,
    case,
    draws_of,
    step_prefix,
    step_records,
    variant_config,
)

from mtdistill_jax.checkpoint.tdmpc2_torch import params_to_state_dict
from mtdistill_jax.configs.tasks import task_discounts
from mtdistill_jax.nn import make_world_model
from mtdistill_jax.tdmpc2.losses import running_scale_percentiles, running_scale_update
from mtdistill_jax.tdmpc2.train import init_training_state, make_update_fn

CASES = update_cases()
pytestmark = pytest.mark.skipif(not CASES, reason="no update_*.npz in the reference folder")


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


def records(name: str, variant: str):
    """``(kind, step, field, error, tolerance)`` for every stored quantity of one variant."""
    meta, ref, _, _ = case(name)
    traj, config = trajectory(name, variant)
    out = []
    for k, (state, metrics, inter) in enumerate(traj, start=1):
        if variant == "release" and k == 1:
            continue  # identical to head/step1 (checked by the recording)
        out += step_records(meta, ref, config, step_prefix(variant, k), k, state, metrics, inter,
                            leak=variant == "head")
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
