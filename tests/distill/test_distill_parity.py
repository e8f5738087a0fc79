"""The distillation step against the official-code recording (``distill/`` of every ``update_*.npz``).

The recording (reference README, "Distillation") adds td-mpc-opt's term to the official HEAD update: the teacher
(the json's ``distill.teacher``, e.g. the paper's fp16 student) encodes ``obs[0]``, its reward logits at
``action[0]`` are decoded (two-hot expectation, symexp), and ``d_coef`` times the batch mean of the squared
difference to the student's decoded reward is added to the world-model loss. Our step with the default
distillation config (steps 'first', reward MSE, constant d_coef from the json) must reproduce every stored
quantity with the update suite's tolerances (``tests/update_ref.py``), plus the teacher's and student's
latents, reward logits and rewards, the distillation loss and the objective with and without it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from refdata import reference_dir, update_cases
from update_ref import SCALAR_RTOL, SCALARS, STEP1_ATOL, batch_of, case, draws_of, step_records, variant_config

from mtdistill_jax import distill
from mtdistill_jax.configs import distill as distill_config

CASES = [n for n in update_cases() if "distill/d_coef" in case(n)[1]]
pytestmark = pytest.mark.skipif(not CASES, reason=f"no update_*.npz with a distill/ step in {reference_dir()}")

# reference name -> our metric (the total with the term is the world-model objective)
DISTILL_SCALARS = {**SCALARS, "total_loss": "train/wm_objective", "total_loss_no_distill": "train/total_loss",
                   "distill_loss": "distill/reward_mse"}


def distill_case_config(name: str):
    """The update case's student config (HEAD variant) with the recording's distillation settings."""
    meta, ref, _, _ = case(name)
    base = variant_config(name, "head")
    config = distill_config.get_config(base.model.model_size, base.model.task_set)
    with config.unlocked():
        config.model = base.model
        config.train = base.train
    config.distill.d_coef = float(ref["distill/d_coef"])
    assert meta["distill"]["batch"] == "batch1"
    return config


@functools.cache
def distilled(name: str):
    meta, ref, ckpt, _ = case(name)
    config = distill_case_config(name)
    teacher = distill.load_teacher(reference_dir() / meta["distill"]["teacher"])
    update = jax.jit(distill.make_distill_update(config, teacher.config, return_intermediates=True))
    state = distill.init_distill_state(config, teacher.config, params=ckpt.params,
                                       target_q_params=ckpt.target_q_params)
    out = update(state, batch_of(ref, 1), jax.random.key(1), draws_of(ref, "distill"), teacher.params)
    return jax.device_get(out), config, teacher


@pytest.mark.parametrize("name", CASES)
def test_distill_step_matches_official(name):
    meta, ref, _, _ = case(name)
    (state, metrics, inter), config, teacher = distilled(name)
    assert teacher.config.latent_dim == meta["distill"]["teacher_cfg"]["latent_dim"]
    recs = step_records(meta, ref, config, "distill", 1, state, metrics, inter, leak=True, scalars=DISTILL_SCALARS)
    t, ro = inter["aux"], inter["rollout"]
    mc = config.model
    from mtdistill_jax import math as tdmath

    ours = {"teacher_z": t.zs[0], "teacher_reward_logits": t.reward_logits[0],
            "teacher_reward": tdmath.two_hot_inv(t.reward_logits[0], mc.num_bins, mc.vmin, mc.vmax),
            "student_z": ro.z, "student_reward_logits": ro.reward_logits[0],
            "student_reward": tdmath.two_hot_inv(ro.reward_logits[0], mc.num_bins, mc.vmin, mc.vmax)}
    for f, v in ours.items():
        want = ref[f"distill/{f}"]
        assert np.shape(v) == want.shape, f
        # logits reach ~40 in magnitude: absolute 1e-5 plus a relative term of a few ulps there
        err = np.abs(np.asarray(v, np.float64) - want) - 1e-6 * np.abs(want)
        recs.append(("teacher/student", 1, f, float(np.max(err)), STEP1_ATOL if "logits" not in f else 1e-4))
    kinds = {r[0] for r in recs}
    assert {"array", "scalar", "params", "wm_grad", "teacher/student"} <= kinds
    assert any(r[2] == "distill_loss" for r in recs)
    bad = [r for r in recs if not r[3] <= r[4]]
    assert not bad, "\n".join(f"distill {kind} {f}: error {e:.3g} > tol {tol:.1g}" for kind, _, f, e, tol in bad)


@pytest.mark.parametrize("name", CASES)
def test_distill_term_is_what_separates_the_step_from_the_plain_update(name):
    """The reference's HEAD step 1 (same batch and draws, no term) is not within tolerance of the distilled
    step: the comparison would catch a term that is silently dropped."""
    _, ref, _, _ = case(name)
    (_, metrics, _), _, _ = distilled(name)
    plain = float(ref["head/step1/grad_norm"])
    assert abs(float(metrics["train/grad_norm"]) - plain) / plain > 100 * SCALAR_RTOL
    np.testing.assert_allclose(float(metrics["train/total_loss"]), float(ref["head/step1/total_loss"]), rtol=1e-6)
