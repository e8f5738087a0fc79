"""Properties of the fused distillation step and of each distillation term (mtdistill_jax/distill/).

Parity with the official-code recording is in test_distill_parity.py; here: the step is the plain update when
d_coef is 0, the teacher is never changed, donated or retraced, every option's term vanishes when the student
is its teacher and its gradient reaches exactly the student params it should, schedules follow their formulas,
teachers of other storage/compute dtypes and of 8 devices agree with float32 on one device within stated bounds,
and bad teachers or configs are refused with the cause named.
"""

from __future__ import annotations

import functools
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks.update_step import random_batch as bench_batch
from mtdistill_jax import distill
from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.checkpoint.tdmpc2_torch import CheckpointMismatchError
from mtdistill_jax.configs import distill as distill_config
from mtdistill_jax.errors import UserError
from mtdistill_jax.nn.world_model import action_masks, init_params, make_world_model, world_model_params
from mtdistill_jax.parallel import make_mesh
from mtdistill_jax.tdmpc2.losses import PI_KEY, make_losses, sample_draws
from mtdistill_jax.tdmpc2.train import init_training_state, make_update_fn, renorm_used_embeddings
from mtdistill_jax.types import Batch

B = 16  # divisible by the 8 virtual devices


def smoke(**distill_fields) -> ml_collections.ConfigDict:
    c = distill_config.get_smoke_config()
    c.train.batch_size = B
    for k, v in distill_fields.items():
        c.distill[k] = v
    return c


def random_batch(seed: int, H: int = 3, batch: int = B) -> Batch:
    """A batch of MT30 shapes with each task's padding zeroed (the benchmarks' generator)."""
    return jax.tree_util.tree_map(jnp.asarray, bench_batch(np.random.default_rng(seed), batch, H))


def trained_like(params, seed: int):
    """Random but non-trivial params: the official init zeroes the reward/Q output layers (every output 0)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)])


@functools.cache
def models():
    """(student params, teacher params): two different 1M world models on MT30."""
    model = make_world_model(smoke().model)
    return (trained_like(init_params(model, jax.random.key(0)), 1),
            trained_like(init_params(model, jax.random.key(2)), 3))


def student_state(config, teacher_config):
    return distill.init_distill_state(config, teacher_config, params=models()[0])


# ------------------------------------------------------------------------------------------------ the step
def test_zero_d_coef_is_the_plain_update():
    """d_coef = 0: the fused step gives the plain update's state and metrics, to float32 round-off. Not bit for
    bit: the two are different XLA programs (the fused one adds 0 x the term's gradient), and XLA:CPU's loop
    fusions may sum a bias gradient in another order (measured: 2 of 101 reward-bias entries 1 ulp apart with
    YNNPACK fusions off, bit-identical with them on)."""
    config = smoke(d_coef=0.0)
    params, teacher = models()
    batch, key = random_batch(0), jax.random.key(5)
    draws = sample_draws(jax.random.key(6), config, B)
    plain = jax.jit(make_update_fn(make_world_model(config.model), config))
    fused = jax.jit(distill.make_distill_update(config, config.model))
    s0, m0 = jax.device_get(plain(init_training_state(config, params=params), batch, key, draws))
    s1, m1 = jax.device_get(fused(student_state(config, config.model), batch, key, draws, teacher))
    assert float(m1["distill/reward_mse"]) > 0  # the term was computed, with weight 0
    assert float(m1.pop("train/wm_objective")) == float(m1["train/total_loss"])
    chex.assert_trees_all_close(s1, s0, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close({k: v for k, v in m1.items() if k in m0}, m0, rtol=1e-6, atol=1e-8)


def test_teacher_params_are_unchanged_not_donated_and_traced_once():
    config = smoke()
    _, teacher = models()
    stored = transforms.transform(jax.device_get(teacher), "float16")  # the paper student's storage dtype
    on_device = jax.device_put(stored)
    step = distill.make_distill_step(config, config.model)
    state = student_state(config, config.model)
    for i in range(3):
        state, metrics = step(state, on_device, random_batch(i), jax.random.key(i))
    assert int(state.step) == 3 and np.isfinite(float(metrics["distill/reward_mse"]))
    assert step._cache_size() == 1  # one trace, one executable for every call
    chex.assert_trees_all_equal(jax.device_get(on_device), stored)  # still alive (not donated), bit-identical
    assert all(x.dtype == np.float16 for x in jax.tree_util.tree_leaves(on_device))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's YNNPACK path")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bf16_teacher_compiles_with_the_bf16_dot_path(dtype):
    """On CPU a step whose teacher computes in bf16 hands the dots to YNNPACK's single-dot path (the CPU's bf16
    units: xla_cpu.bf16_dot_options), on one device and on a mesh; a float32 teacher's step keeps XLA's dots."""
    from mtdistill_jax import xla_cpu

    config = smoke(teacher_compute_dtype=dtype)
    expected = xla_cpu.bf16_dot_options(dtype) is not None
    assert expected == (dtype == "bfloat16" and os.environ.get(xla_cpu.TUNING_ENV, "1") != "0")
    args = (student_state(config, config.model), models()[1], random_batch(0), jax.random.key(0))
    for mesh in (None, make_mesh(1)):
        step = distill.make_distill_step(config, config.model, mesh, donate=False)
        hlo = step.lower(*args).compile().as_text()
        assert ("__ynn_fusion" in hlo) == expected, mesh


def assert_params_after_adam_close(got, want, lr: float):
    """Params after one Adam step from the same start, gradients equal up to float32 round-off: 3e-5 absolute,
    except entries whose gradient is within round-off of zero, where Adam's normalised step (up to lr in
    either direction) follows the round-off: at most 0.1% of the entries, each within 2 lr."""
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(p)]) for p in (got, want))
    off = np.abs(a - b) > 3e-5
    assert off.mean() <= 1e-3 and np.all(np.abs(a - b) <= 2 * lr + 1e-7), (off.sum(), np.abs(a - b).max())


def test_eight_devices_give_the_single_device_step():
    """Batch split over 8 virtual CPU devices, teacher and student replicated. The only difference is the order
    of the batch sums (gradient all-reduce): losses and grad norms agree to 1e-5 relative; parameters after
    the Adam step to 3e-5 absolute except where a gradient entry is within round-off of zero (its Adam
    direction is then arbitrary): at most 0.1% of the entries, each within 2 lr."""
    config = smoke(q_weight=1.0, policy_weight=1.0, latent_weight=1.0)
    _, teacher = models()
    mesh = make_mesh(8)
    batch, key = random_batch(7), jax.random.key(8)
    one = distill.make_distill_step(config, config.model, donate=False)
    eight = distill.make_distill_step(config, config.model, mesh, donate=False)
    s1, m1 = jax.device_get(one(student_state(config, config.model), teacher, batch, key))
    s8, m8 = jax.device_get(eight(student_state(config, config.model), teacher, batch, key))
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_params_after_adam_close(s8.params, s1.params, config.train.lr)


def test_sharded_teacher_gives_the_replicated_result():
    """``teacher_sharding='sharded'``: each of the 8 devices holds 1/8 of the teacher's large kernels (split along
    the output axis) and XLA gathers them where used; the step's outputs equal the replicated teacher's up to
    float32 round-off (the same arithmetic, possibly fused differently: rtol 1e-5 on losses and gradient norms,
    params as :func:`assert_params_after_adam_close`)."""
    config = smoke(q_weight=1.0, policy_weight=1.0)
    _, teacher = models()
    mesh = make_mesh(8)
    batch, key = random_batch(9), jax.random.key(10)
    out = {}
    for mode in ("replicated", "sharded"):
        config.distill.teacher_sharding = mode
        placed = distill.place_teacher(config, teacher, mesh)
        step = distill.make_distill_step(config, config.model, mesh, donate=False, teacher_params=teacher)
        out[mode] = jax.device_get(step(student_state(config, config.model), placed, batch, key))
        kernel = placed["reward_head"]["layer0"]["kernel"]  # [latent + task_dim + action, mlp] = [230, 384]
        shard = kernel.addressable_shards[0].data.shape
        assert shard == ((230, 384 // 8) if mode == "sharded" else (230, 384)), (mode, shard)
        small = placed["encoder"]["layer0"]["kernel"]  # 120 x 256 < 2^16 entries: replicated either way
        assert small.addressable_shards[0].data.shape == (120, 256)
    (s_r, m_r), (s_s, m_s) = out["replicated"], out["sharded"]
    for k in m_r:
        np.testing.assert_allclose(m_s[k], m_r[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert_params_after_adam_close(s_s.params, s_r.params, config.train.lr)


def test_all_terms_together_and_the_projection_trains():
    config = smoke(steps="horizon", q_weight=0.5, policy_weight=0.2, latent_weight=1.0, reward_loss="kl",
                   temperature=2.0)
    _, teacher = models()
    step = distill.make_distill_step(config, config.model, donate=False)
    state = student_state(config, config.model)
    assert set(state.params[distill.DISTILL_KEY]) == {"latent_proj"}
    new, metrics = step(state, teacher, random_batch(3), jax.random.key(3))
    for k in ("distill/reward_kl", "distill/q_mse", "distill/policy_kl", "distill/latent_mse", "distill/loss",
              "train/wm_objective", "train/pi_objective"):
        assert np.isfinite(float(metrics[k])) and float(metrics[k]) != 0, k
    moved = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y))), new.params[distill.DISTILL_KEY],
                                   state.params[distill.DISTILL_KEY])
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # the world-model optimiser steps the projection
    exported = world_model_params(new.params, config.model)  # what an agent export holds
    assert distill.DISTILL_KEY not in exported and set(exported) == set(models()[0])


# ------------------------------------------------------------------------------------------ the terms
OPTIONS = {
    "reward_mse_first": dict(),
    "reward_mse_horizon": dict(steps="horizon"),
    "reward_kl": dict(reward_loss="kl", temperature=2.0),
    "q": dict(reward_weight=0.0, q_weight=1.0),
    "latent": dict(reward_weight=0.0, latent_weight=1.0),
    "latent_horizon": dict(reward_weight=0.0, latent_weight=1.0, steps="horizon"),
}
METRIC = {"reward_mse_first": "reward_mse", "reward_mse_horizon": "reward_mse", "reward_kl": "reward_kl",
          "q": "q_mse", "latent": "latent_mse", "latent_horizon": "latent_mse"}
# top-level student params each world-model term's gradient must reach (all others: exactly zero)
REACHES = {"reward_mse_first": {"task_emb", "encoder", "reward_head"},
           "reward_mse_horizon": {"task_emb", "encoder", "dynamics", "reward_head"},
           "reward_kl": {"task_emb", "encoder", "reward_head"},
           "q": {"task_emb", "encoder", "Qs"},
           "latent": {"task_emb", "encoder", distill.DISTILL_KEY},
           "latent_horizon": {"task_emb", "encoder", "dynamics", distill.DISTILL_KEY}}


def wm_term(config, student_params, teacher_params, batch, key=None):
    """(value, metrics, grads w.r.t. every student param) of the world-model distillation term alone."""
    model = make_world_model(config.model)
    losses = make_losses(model, config)
    dl = distill.make_distill_losses(model, model, config)
    extra = distill.losses.init_distill_params(config.model, config.model, config)
    params = {**student_params, **({distill.DISTILL_KEY: extra} if extra else {})}
    params = renorm_used_embeddings(params, batch.task)
    tout = dl.teacher_forward(teacher_params, batch)
    key = jax.random.key(0) if key is None else key

    def f(p):
        return dl.wm_loss(losses.rollout(p, batch, key), batch, tout, jnp.int32(0), None, p)

    (value, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return value, metrics, grads


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_term_vanishes_when_the_student_is_the_teacher(option):
    config = smoke(**OPTIONS[option])
    config.model.dropout = 0.0  # the student's Q in training mode would otherwise drop units the teacher keeps
    student, _ = models()
    value, metrics, _ = wm_term(config, student, student, random_batch(1))
    # The student's rollout and the teacher's forward run the same weights on the same inputs in differently
    # shaped (differently fused) programs, so their outputs may differ by float32 round-off: squared terms then
    # stay ~1e-12, the KL is linear in a logit difference of a few ulps of logits ~10 (~1e-6 at most).
    tol = 1e-6 if option == "reward_kl" else 1e-9
    assert abs(float(metrics[f"distill/{METRIC[option]}"])) <= tol, metrics
    assert abs(float(value)) <= tol


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_term_gradient_reaches_only_its_params(option):
    config = smoke(**OPTIONS[option])
    student, teacher = models()
    value, metrics, grads = wm_term(config, student, teacher, random_batch(2))
    assert float(metrics[f"distill/{METRIC[option]}"]) > 1e-6
    np.testing.assert_allclose(float(value), config.distill.d_coef * float(metrics["distill/loss"]), rtol=1e-6)
    reached = {k for k, g in grads.items() if any(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(g))}
    assert reached == REACHES[option]


def policy_term(config, student_params, teacher_params, batch):
    model = make_world_model(config.model)
    losses = make_losses(model, config)
    dl = distill.make_distill_losses(model, model, config)
    tout = dl.teacher_forward(teacher_params, batch)
    draws = sample_draws(jax.random.key(4), config, batch.task.shape[0])
    ro = losses.rollout(student_params, batch, jax.random.key(0))

    def f(trainable):
        pi = losses.policy_rollout(trainable, student_params, ro.zs, batch.task, draws.pi_eps, draws.pi_heads,
                                   jax.random.key(1))
        return dl.pi_loss(ro, pi, batch, tout, jnp.int32(0), None)

    (value, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(
        {PI_KEY: student_params[PI_KEY], "task_emb": student_params["task_emb"]})
    return value, metrics, grads


@pytest.mark.parametrize("steps", ["first", "horizon"])
def test_policy_term(steps):
    config = smoke(reward_weight=0.0, policy_weight=1.0, steps=steps)
    student, teacher = models()
    batch = random_batch(3)
    value, metrics, _ = policy_term(config, student, student, batch)
    # linear in the round-off difference of two differently fused forwards (see the world-model terms)
    assert abs(float(metrics["distill/policy_kl"])) <= 1e-6 and abs(float(value)) <= 1e-6
    value, metrics, grads = policy_term(config, student, teacher, batch)
    assert float(metrics["distill/policy_kl"]) > 1e-6
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(grads[PI_KEY]))
    # masked action dims: mean 0 and log-std 0 in both policies, so they add nothing to the KL
    dl = distill.make_distill_losses(make_world_model(config.model), make_world_model(config.model), config)
    tout = dl.teacher_forward(teacher, batch)
    assert tout.pi_mean.shape[0] == (1 if steps == "first" else config.train.horizon + 1)
    off = np.broadcast_to(action_masks(config.model.task_set)[np.asarray(batch.task)] == 0, tout.pi_mean.shape)
    assert off.any()
    masked = np.concatenate([np.asarray(tout.pi_log_std)[off], np.asarray(tout.pi_mean)[off]])
    assert np.all(masked == 0)  # masked dims: log-std 0 and mean 0 in both policies, KL 0 there


def test_gaussian_kl_closed_form():
    from mtdistill_jax.distill.losses import _gaussian_kl

    mu_p, ls_p, mu_q, ls_q = 0.3, -0.5, -0.2, 0.1
    sp, sq = np.exp(ls_p), np.exp(ls_q)
    x = np.linspace(-8, 8, 200001)
    p = np.exp(-0.5 * ((x - mu_p) / sp) ** 2) / (sp * np.sqrt(2 * np.pi))
    q = np.exp(-0.5 * ((x - mu_q) / sq) ** 2) / (sq * np.sqrt(2 * np.pi))
    numeric = np.trapezoid(p * (np.log(p) - np.log(q)), x)
    np.testing.assert_allclose(float(_gaussian_kl(mu_p, ls_p, mu_q, ls_q)), numeric, rtol=1e-6)


def test_teacher_storage_and_compute_dtypes():
    """fp16/bf16/int8 storage is dequantised/cast inside the forward exactly as on the host; bfloat16 compute
    stays within bfloat16 round-off of float32 (8 mantissa bits through ~8 layers: decoded rewards within
    0.05 + 5%)."""
    config = smoke()
    _, teacher = models()
    model = make_world_model(config.model)
    batch = random_batch(4)
    fwd = jax.jit(distill.make_teacher_forward(model, config))
    host = jax.device_get(teacher)
    for dtype in ("float16", "bfloat16", "int8"):
        stored = transforms.transform(host, dtype)
        want = fwd(transforms.to_compute(stored, "float32"), batch)
        chex.assert_trees_all_equal(fwd(stored, batch), want)
    want = fwd(teacher, batch)
    config.distill.teacher_compute_dtype = "bfloat16"
    got = jax.jit(distill.make_teacher_forward(model, config))(teacher, batch)
    mc = config.model
    from mtdistill_jax import math as tdmath

    r_want = np.asarray(tdmath.two_hot_inv(want.reward_logits, mc.num_bins, mc.vmin, mc.vmax))
    r_got = np.asarray(tdmath.two_hot_inv(got.reward_logits, mc.num_bins, mc.vmin, mc.vmax))
    assert got.reward_logits.dtype == jnp.float32
    np.testing.assert_allclose(r_got, r_want, rtol=0.05, atol=0.05)
    assert np.max(np.abs(r_got - r_want)) > 0  # it did compute in bfloat16


# ------------------------------------------------------------------------------------------- schedules
def schedule_values(steps=(0, 100, 250, 499, 500, 750, 999, 1000, 2000), **fields):
    config = smoke(**fields)
    config.steps = 1000
    sched = distill.d_coef_schedule(config)
    return np.asarray([float(sched(s)) for s in steps]), np.asarray(steps, np.float64)


def test_schedules_follow_their_formulas():
    c = 0.45
    v, s = schedule_values(schedule="constant")
    np.testing.assert_allclose(v, c)
    v, s = schedule_values(schedule="decrease")  # td-mpc-opt: c * max(0, 1 - step / N)
    np.testing.assert_allclose(v, c * np.maximum(0, 1 - s / 1000), rtol=1e-6, atol=1e-7)
    v, s = schedule_values(schedule="increase")  # td-mpc-opt: c * min(1, step / N)
    np.testing.assert_allclose(v, c * np.minimum(1, s / 1000), rtol=1e-6, atol=1e-7)
    v, s = schedule_values(schedule="linear", d_coef_end=0.1, schedule_begin=100, schedule_steps=400)
    want = np.where(s < 100, c, c + (0.1 - c) * np.clip((s - 100) / 400, 0, 1))
    np.testing.assert_allclose(v, want, rtol=1e-6, atol=1e-7)
    v, s = schedule_values(schedule="cosine", cosine_alpha=0.2, schedule_begin=0)
    frac = np.clip(s / 1000, 0, 1)
    np.testing.assert_allclose(v, c * ((1 - 0.2) * 0.5 * (1 + np.cos(np.pi * frac)) + 0.2), rtol=1e-5, atol=1e-7)
    v, s = schedule_values(schedule="phases")  # td-mpc-opt four_phase: 0.5, 0.5, 0.75, 0 by quarters
    np.testing.assert_allclose(v, [0.5, 0.5, 0.5, 0.5, 0.75, 0.0, 0.0, 0.0, 0.0])  # steps 0..499, 500.., 750..
    v, _ = schedule_values(steps=(0, 299, 300, 999), schedule="phases", phases="0:1,0.3:0.2")
    np.testing.assert_allclose(v, [1.0, 1.0, 0.2, 0.2])


def test_schedule_is_applied_in_the_step():
    config = smoke(schedule="decrease", schedule_steps=4)
    _, teacher = models()
    step = distill.make_distill_step(config, config.model)
    state = student_state(config, config.model)
    seen = []
    for i in range(3):
        state, m = step(state, teacher, random_batch(i), jax.random.key(i))
        seen.append(float(m["distill/d_coef"]))
    np.testing.assert_allclose(seen, [0.45, 0.45 * 0.75, 0.45 * 0.5], rtol=1e-6)


# ------------------------------------------------------------------------------------- refusing bad input
def test_teacher_of_another_task_set_is_refused_naming_each_difference():
    config = smoke()
    teacher = distill_config.get_config(1, "mt80").model
    with pytest.raises(distill.IncompatibleTeacherError) as e:
        distill.make_distill_update(config, teacher)
    msg = str(e.value)
    for part in ("task set: student mt30, teacher mt80", "number of tasks: student 30, teacher 80",
                 "padded observation width"):
        assert part in msg, msg
    with pytest.raises(distill.IncompatibleTeacherError):
        distill.init_distill_state(config, teacher, jax.random.key(0))


def test_teacher_file_of_unknown_size_gets_the_importers_error(tmp_path):
    pytest.importorskip("torch")
    from mtdistill_jax.checkpoint.tdmpc2_torch import save_tdmpc2_checkpoint

    config = smoke()
    odd = config.model.copy_and_resolve_references()
    odd.mlp_dim = 96
    params = init_params(make_world_model(odd), jax.random.key(0))
    path = save_tdmpc2_checkpoint(tmp_path / "odd.pt", odd, jax.device_get(params), params["Qs"])
    with pytest.raises(CheckpointMismatchError, match="fit no official model size"):
        distill.load_teacher(path)
    with pytest.raises(FileNotFoundError):
        distill.load_teacher(tmp_path / "missing.pt")


@pytest.mark.parametrize("field,value,msg", [
    ("d_coef", -0.1, "distill.d_coef must be >= 0"),
    ("schedule", "exp", "distill.schedule must be one of"),
    ("steps", "all", "distill.steps must be one of"),
    ("reward_loss", "l1", "distill.reward_loss must be one of"),
    ("temperature", 0.0, "distill.temperature must be > 0"),
    ("teacher_compute_dtype", "float16", "distill.teacher_compute_dtype must be one of"),
    ("phases", "0.1:0.5", "distill.phases must be start fractions"),
    ("phases", "0:a", "distill.phases must be 'start:value"),
])
def test_bad_config_values_are_named(field, value, msg):
    config = smoke()
    config.distill[field] = value
    if field == "phases":
        config.distill.schedule = "phases"
    with pytest.raises(UserError, match=msg):
        distill_config.check_config(config)


def test_model_size_override_rebuilds_the_student_model():
    config = distill_config.get_config()
    config.model_size = 5
    config.model.dropout = 0.0  # an explicit model override survives the rebuild
    resolved = distill_config.resolve(config)
    assert resolved.model.model_size == 5 and resolved.model.mlp_dim == 512 and resolved.model.dropout == 0.0
    assert config.model.model_size == 1  # the input is not modified
    assert distill_config.resolve(resolved) is resolved
