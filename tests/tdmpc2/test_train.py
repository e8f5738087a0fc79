"""Update step: loss falls, Polyak targets, policy loss isolation, single trace, input validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_util import equations

from mtdistill_jax.configs import get_smoke_config
from mtdistill_jax.nn import WorldModel, renorm_rows
from mtdistill_jax.tdmpc2.losses import make_losses, running_scale_update
from mtdistill_jax.tdmpc2.train import Learner, make_update_fn, renorm_used_embeddings, split_params
from mtdistill_jax.types import Batch


def make_batch(seed=0, B=8, H=3):
    rng = np.random.default_rng(seed)
    task = (np.arange(B) * 7 + seed) % 30
    obs = rng.normal(size=(H + 1, B, 24)).astype(np.float32)
    action = rng.uniform(-1, 1, (H, B, 6)).astype(np.float32)
    from mtdistill_jax.configs import MT30

    for b, t in enumerate(task):
        obs[:, b, MT30.obs_dims[t]:] = 0
        action[:, b, MT30.action_dims[t]:] = 0
    reward = rng.uniform(0, 2, (H, B, 1)).astype(np.float32)
    return Batch(obs=obs, action=action, reward=reward, task=task.astype(np.int32))


@pytest.fixture(scope="module")
def learner():
    return Learner(get_smoke_config(), donate=False)


@pytest.fixture(scope="module")
def state0(learner):
    return learner.init(jax.random.key(0))


def test_loss_falls_on_fixed_batch(learner, state0):
    batch, state = make_batch(), state0
    losses = []
    for i in range(40):
        state, m = learner.update(state, batch, jax.random.key(i))
        losses.append(float(m["train/total_loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 40


def test_targets_move_by_tau(learner, state0):
    state, _ = learner.update(state0, make_batch(1), jax.random.key(1))
    tau = learner.config.train.tau
    expected = jax.tree_util.tree_map(lambda t, o: t + tau * (o - t), state0.target_q_params, state.params["Qs"])
    chex.assert_trees_all_close(state.target_q_params, expected, atol=1e-7, rtol=0)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.target_q_params,
                                   state0.target_q_params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_policy_loss_leaves_world_model_untouched(learner, state0):
    model, config = learner.model, learner.config
    losses = make_losses(model, config)
    params = state0.params
    zs = jax.random.uniform(jax.random.key(3), (4, 8, 128))
    task = jnp.arange(8)
    eps = jax.random.normal(jax.random.key(4), (4, 8, 6))
    grads = jax.jit(jax.grad(lambda p: losses.policy_loss(losses.policy_rollout(
        {"pi_head": p["pi_head"]}, p, zs, task, eps, jnp.asarray([1, 0]), jax.random.key(5)), jnp.ones(()))[0]))(params)
    for k, g in grads.items():
        norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g))))
        if k == "pi_head":
            assert norm > 0
        else:
            assert norm == 0.0, k  # Q heads, task embedding, encoder, ... get no policy gradient
    # The two optimisers partition the params: the world-model one never sees pi_head, the policy one only it.
    wm_params, pi_params = split_params(params)
    assert "pi_head" not in wm_params and set(wm_params) | {"pi_head"} == set(params)
    chex.assert_trees_all_equal_structs(pi_params, params["pi_head"])


def test_single_trace(learner, state0):
    update = chex.assert_max_traces(make_update_fn(learner.model, learner.config), n=1)
    fn = jax.jit(update)
    state = state0
    for i in range(3):
        state, m = fn(state, make_batch(i), jax.random.key(i))
    jax.block_until_ready(m)


def test_running_scale_matches_official_formula():
    q0 = jnp.linspace(0.0, 100.0, 101)[:, None]
    new = running_scale_update(jnp.ones(()), q0, 0.01)
    np.testing.assert_allclose(float(new), 1 + 0.01 * (90.0 - 1), rtol=1e-6)  # P95 - P5 = 90
    small = running_scale_update(jnp.ones(()), jnp.zeros((8, 1)), 0.01)  # clamped at 1
    assert float(small) == 1.0


def test_embedding_renorm_only_for_used_tasks():
    table = jnp.ones((30, 96)) * 0.5  # norm ~4.9
    params = {"task_emb": {"embedding": table}}
    out = renorm_used_embeddings(params, jnp.asarray([0, 3]))["task_emb"]["embedding"]
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(renorm_rows(table[:1])[0]), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.linalg.norm(out[3])), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(table[1]))


@pytest.mark.parametrize("field,value,match", [
    ("obs", np.zeros((4, 8, 17), np.float32), r"batch\.obs has shape \(4, 8, 17\), expected \(4, 8, 24\)"),
    ("action", np.zeros((3, 8, 4), np.float32), r"batch\.action has shape .* expected \(3, 8, 6\)"),
    ("reward", np.zeros((3, 8), np.float32), r"batch\.reward has shape"),
    ("task", np.full((8,), 30, np.int32), r"ids outside \[0, 30\)"),
    ("task", np.zeros((8,), np.float32), "integer"),
])
def test_bad_batches_raise_clear_errors(learner, state0, field, value, match):
    batch = make_batch().replace(**{field: value})
    with pytest.raises(ValueError, match=match):
        learner.update(state0, batch, jax.random.key(0))


def test_default_draws_are_sample_draws(learner, state0):
    """The draws seam: passing ``sample_draws`` of the update's own draw key reproduces the default path."""
    from mtdistill_jax.tdmpc2.losses import sample_draws

    batch, key = make_batch(2), jax.random.key(7)
    draws = sample_draws(jax.random.split(key, 3)[0], learner.config, 8)
    assert draws.td_eps.shape == (3, 8, 6) and draws.pi_eps.shape == (4, 8, 6) and draws.pi_heads.shape == (2,)
    s1, m1 = learner.update(state0, batch, key)
    s2, m2 = learner.update(state0, batch, key, draws)
    chex.assert_trees_all_close(m1, m2, atol=1e-7, rtol=1e-6)  # two compilations: last-bit differences only
    chex.assert_trees_all_close(s1.params, s2.params, atol=1e-7, rtol=1e-6)


def test_policy_loss_q_has_dropout_in_train_mode(learner, state0):
    """Official train mode: the Q in the policy loss has dropout active (key-dependent iff dropout > 0)."""
    losses = make_losses(learner.model, learner.config)
    assert learner.config.model.dropout > 0
    zs = jax.random.uniform(jax.random.key(3), (4, 8, 128))
    eps = jax.random.normal(jax.random.key(4), (4, 8, 6))
    leaves, treedef = jax.tree_util.tree_flatten(state0.params["Qs"])  # the zero-initialised last layer gives Q = 0
    noisy = [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    params = {**state0.params, "Qs": jax.tree_util.tree_unflatten(treedef, noisy)}

    def loss(key, p=params):
        return float(losses.policy_loss(losses.policy_rollout({"pi_head": p["pi_head"]}, p, zs, jnp.arange(8), eps,
                                                              jnp.asarray([0, 1]), key), jnp.ones(()))[0])

    assert loss(jax.random.key(0)) != loss(jax.random.key(1))
    cfg = learner.config.copy_and_resolve_references()
    cfg.model.dropout = 0.0
    from mtdistill_jax.nn import make_world_model

    no_drop = make_losses(make_world_model(cfg.model), cfg)
    out = [float(no_drop.policy_loss(no_drop.policy_rollout({"pi_head": params["pi_head"]}, params, zs, jnp.arange(8),
                                                            eps, jnp.asarray([0, 1]), jax.random.key(k)),
                                     jnp.ones(()))[0]) for k in (0, 1)]
    assert out[0] == out[1]


def test_one_discount_definition(learner):
    """The per-task discounts come from configs (one definition) and are what the losses use."""
    from mtdistill_jax.configs import tasks

    np.testing.assert_array_equal(np.asarray(learner.losses.discounts), tasks.task_discounts(learner.config))
    np.testing.assert_allclose(tasks.task_discounts(learner.config), tasks.MT30.discounts, rtol=1e-7)


def test_the_latent_rollout_is_unrolled(learner, state0):
    """The rollout's H dynamics steps are unrolled (no loop: shorter 1M update on XLA:CPU), same values as a loop."""
    losses, batch = learner.losses, make_batch()
    jaxpr = jax.make_jaxpr(losses.rollout)(state0.params, batch, jax.random.key(0))
    scans = list(equations(jaxpr, "scan"))
    assert scans and all(e.params["unroll"] >= e.params["length"] for e in scans)  # lowered without a loop
    assert not list(equations(jaxpr, "while"))
    ro = jax.jit(losses.rollout)(state0.params, batch, jax.random.key(0))
    z = ro.z
    for t in range(batch.action.shape[0]):
        z = learner.model.apply({"params": state0.params}, z, batch.action[t], batch.task, method=WorldModel.next)
        np.testing.assert_allclose(ro.zs[t + 1], z, rtol=1e-5, atol=1e-6)


def _grads(scale):
    k = jax.random.split(jax.random.key(5), 3)
    return {"a": {"kernel": jax.random.normal(k[0], (6, 4)) * scale, "bias": jax.random.normal(k[1], (4,)) * scale},
            "b": {"kernel": jax.random.normal(k[2], (3, 5)) * scale}}


@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_clip_by_global_norm_scales_as_torch_clip_grad_norm(scale):
    """Gradients times min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad_norm_), norm the float64
    global norm; optax's clip (no 1e-6) agrees within float32 round-off; the state is optax's EmptyState."""
    import optax

    from mtdistill_jax.tdmpc2.train import clip_by_global_norm, global_norm

    grads, max_norm = _grads(scale), 2.0
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree_util.tree_leaves(grads)))
    assert float(global_norm(grads)) == pytest.approx(norm, rel=1e-6)
    assert (norm > max_norm) == (scale == 10.0)  # one case clips, one does not
    factor = min(1.0, max_norm / (norm + 1e-6))
    clip = clip_by_global_norm(max_norm)
    state = clip.init(grads)
    assert state == optax.EmptyState() and state == optax.clip_by_global_norm(max_norm).init(grads)
    out, _ = jax.jit(clip.update)(grads, state)
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    for g, o, r in zip(*(jax.tree_util.tree_leaves(t) for t in (grads, out, ref)), strict=True):
        np.testing.assert_allclose(np.asarray(o), np.asarray(g, np.float64) * factor, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-6)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_by_global_norm(0.0)


def test_optimiser_state_layout_is_optax_clip_then_adam():
    """make_optimizers' states have the layout of optax.clip_by_global_norm + Adam (checkpoints unchanged)."""
    import optax

    from mtdistill_jax.configs import get_config
    from mtdistill_jax.tdmpc2.train import encoder_labels, make_optimizers

    tc = get_config(1, "mt30").train
    params = {"encoder": _grads(1.0)["a"], "dynamics": _grads(1.0)["b"]}
    wm, pi = make_optimizers(get_config(1, "mt30"))
    wm_ref = optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), optax.multi_transform(
        {"encoder": optax.adam(1.0), "rest": optax.adam(1.0)}, encoder_labels))
    pi_ref = optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), optax.adam(1.0))
    for opt, ref in ((wm, wm_ref), (pi, pi_ref)):
        chex.assert_trees_all_equal_structs(opt.init(params), ref.init(params))


def test_a_global_norm_clip_and_adam_step_compile_to_three_kernels_per_leaf_shape_on_cpu():
    """The world-model optimiser's step (norm, clip, Adam, apply) over leaves of distinct shapes: on CPU each leaf
    shape costs Adam's three elementwise kernels (first moment, second moment, parameter) and no more: the
    norm's squares are matrix products, the clip a scalar factor fused into the moments (optax's clip
    materialised g / norm, and the squares and their reduce-windows, per leaf shape)."""
    import optax

    from benchmarks.common import fused_kernels
    from mtdistill_jax.configs import get_config
    from mtdistill_jax.tdmpc2.train import global_norm, make_optimizers

    if jax.default_backend() != "cpu":
        pytest.skip("the kernel count is XLA:CPU's")
    shapes = [(64, 32), (32, 16), (16, 8), (48,), (24,), (10,)]
    params = {"rest": {f"w{i}": jnp.full(s, 0.5) for i, s in enumerate(shapes)}}
    grads = jax.tree_util.tree_map(lambda p: p * 0.3, params)
    wm, _ = make_optimizers(get_config(1, "mt30"))

    def step(params, grads, state):
        updates, state = wm.update(grads, state, params)
        return optax.apply_updates(params, updates), state, global_norm(grads)

    hlo = jax.jit(step).lower(params, grads, wm.init(params)).compile().as_text()
    _, kernels = fused_kernels(hlo)
    assert kernels <= 3 * len(shapes) + 5, kernels  # + scalars: the norm, its factor, the count, two corrections
