"""Extension points of the update: extra world-model / policy terms, ``aux`` as a jit argument, ``state.step``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tdmpc2.test_train import make_batch

from mtdistill_jax.configs import get_smoke_config
from mtdistill_jax.nn import make_world_model
from mtdistill_jax.tdmpc2.losses import PI_KEY, make_losses, sample_draws
from mtdistill_jax.tdmpc2.train import (
    Learner,
    init_training_state,
    make_update_fn,
    renorm_used_embeddings,
    split_params,
)

C = 1e-3  # weight of the test terms: their gradient is of the order of the TD-MPC2 gradient, not dominant


@pytest.fixture(scope="module")
def setup():
    config = get_smoke_config()
    model = make_world_model(config.model)
    losses = make_losses(model, config)
    state = init_training_state(config, jax.random.key(0))
    # reward and Q heads end in zero-initialised layers (logits 0): perturb them so the test terms have gradients
    params = dict(state.params)
    for name in ("reward_head", "Qs"):
        leaves, treedef = jax.tree_util.tree_flatten(params[name])
        params[name] = jax.tree_util.tree_unflatten(
            treedef, [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    state = state.replace(params=params, target_q_params=params["Qs"], step=jnp.asarray(5, jnp.int32))
    batch = jax.tree_util.tree_map(jnp.asarray, make_batch(3))
    return config, model, losses, state, batch


def reward_l2(ro, batch, aux, step, key, params):
    value = C * jnp.sum(jnp.square(ro.reward_logits))
    return value, {"test/reward_l2": value}


def pi_mean_l2(ro, pi, batch, aux, step, key):
    value = C * jnp.sum(jnp.square(pi.mean))
    return value, {"test/pi_mean_l2": value}


def zero_wm(ro, batch, aux, step, key, params):
    return jnp.zeros(()), {}


def zero_pi(ro, pi, batch, aux, step, key):
    return jnp.zeros(()), {}


_UPDATES = {}


def run(setup, key, draws, aux=None, **extras):
    """The jitted update with ``extras`` (compiled once per set of extras: compiling is most of the time)."""
    config, model, losses, state, batch = setup
    name = tuple(sorted((k, f.__name__) for k, f in extras.items()))
    if name not in _UPDATES:
        _UPDATES[name] = jax.jit(make_update_fn(model, config, losses, return_intermediates=True, **extras))
    return _UPDATES[name](state, batch, key, draws, aux)


@pytest.fixture(scope="module")
def draws(setup):
    config, _, _, _, batch = setup
    return sample_draws(jax.random.key(9), config, batch.task.shape[0])


def test_zero_extra_terms_change_nothing(setup, draws):
    """Extra terms that return 0 leave every output (state, metrics, intermediates) bit-identical."""
    base = jax.device_get(run(setup, jax.random.key(1), draws))
    state, metrics, inter = jax.device_get(
        run(setup, jax.random.key(1), draws, extra_wm_loss=zero_wm, extra_pi_loss=zero_pi))
    # the objectives the optimisers saw are reported beside the official losses, and equal them here
    assert metrics.pop("train/wm_objective") == metrics["train/total_loss"]
    assert metrics.pop("train/pi_objective") == metrics["train/pi_loss"]
    chex.assert_trees_all_equal((state, metrics, inter), base)


def assert_grad_difference(with_term, without, term_grad):
    """``with_term - without == term_grad`` up to float32 round-off: each entry is a reduction over the batch
    and horizon whose round-off is a few ulps of the tensor's scale (not of the entry, which may cancel), so
    the bound is 1e-5 (~100 ulps) of the largest magnitude in the tensor."""
    def check(w, wo, g):
        w, wo, g = (np.asarray(x, np.float64) for x in (w, wo, g))
        bound = 1e-5 * max(np.max(np.abs(w)), np.max(np.abs(wo)), np.max(np.abs(g))) + 1e-12
        err = np.max(np.abs((w - wo) - g))
        assert err <= bound, (err, bound)

    jax.tree_util.tree_map(check, with_term, without, term_grad)
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(term_grad))))
    assert norm > 0


def test_extra_wm_term_adds_exactly_its_gradient(setup, draws):
    """The world-model gradient with c * ||reward_logits||^2 differs from the one without by jax.grad of that
    term alone on the same rollout (same params, batch and dropout key)."""
    config, model, losses, state, batch = setup
    key = jax.random.key(1)
    _, m0, i0 = run(setup, key, draws)
    _, m1, i1 = run(setup, key, draws, extra_wm_loss=reward_l2)
    params = renorm_used_embeddings(state.params, batch.task)
    wm_params, _ = split_params(params)
    k_wm = jax.random.split(key, 3)[1]
    term = jax.jit(jax.value_and_grad(
        lambda wm: reward_l2(losses.rollout({**params, **wm}, batch, k_wm), batch, None, None, None, None)[0]))
    value, grad = term(wm_params)
    assert_grad_difference(i1["wm_grads"], i0["wm_grads"], grad)
    assert float(jnp.max(jnp.abs(grad["reward_head"]["layer2"]["kernel"]))) > 0
    np.testing.assert_allclose(float(m1["test/reward_l2"]), float(value), rtol=1e-6)
    assert float(m1["train/total_loss"]) == float(m0["train/total_loss"])  # the TD-MPC2 terms are unchanged
    chex.assert_trees_all_equal(i1["rollout"], i0["rollout"])  # one forward, the same one


def test_extra_pi_term_adds_exactly_its_gradient(setup, draws):
    """Likewise for the policy: c * ||pi mean||^2 on the policy's own outputs of this step."""
    config, model, losses, state, batch = setup
    key = jax.random.key(2)
    new0, _, i0 = run(setup, key, draws)
    _, m1, i1 = run(setup, key, draws, extra_pi_loss=pi_mean_l2)
    # the policy step sees the params after the world-model step (identical in both runs)
    params = {**new0.params, PI_KEY: state.params[PI_KEY]}
    params = renorm_used_embeddings(params, batch.task)
    k_pi = jax.random.split(key, 3)[2]

    def term(pi_params):
        pi = losses.policy_rollout({PI_KEY: pi_params}, params, i0["zs"], batch.task, draws.pi_eps,
                                   draws.pi_heads, k_pi)
        return pi_mean_l2(None, pi, batch, None, None, None)[0]

    value, grad = jax.jit(jax.value_and_grad(term))(params[PI_KEY])
    assert_grad_difference(i1["pi_grads"], i0["pi_grads"], grad)
    np.testing.assert_allclose(float(m1["test/pi_mean_l2"]), float(value), rtol=1e-6)


def test_aux_is_a_jit_argument_and_step_is_passed(setup):
    """One trace serves different ``aux`` values (a traced argument, not a constant), which change the result;
    the extra terms see ``state.step`` and a key of their own."""
    config, model, losses, state, batch = setup
    seen = {}

    def wm_term(ro, batch, aux, step, key, params):
        seen["wm_key"] = key
        value = aux["c"] * jnp.sum(jnp.square(ro.reward_logits))
        return value, {"test/wm_step": step, "test/c": aux["c"]}

    def pi_term(ro, pi, batch, aux, step, key):
        seen["pi_key"] = key
        return aux["c"] * jnp.sum(jnp.square(pi.mean)), {"test/pi_step": step}

    update = jax.jit(chex.assert_max_traces(
        make_update_fn(model, config, losses, extra_wm_loss=wm_term, extra_pi_loss=pi_term), n=1))
    outs = [jax.device_get(update(state, batch, jax.random.key(1), None, {"c": jnp.float32(c)}))
            for c in (1e-3, 3e-1)]
    (s1, m1), (s2, m2) = outs
    assert float(m1["test/c"]) == pytest.approx(1e-3) and float(m2["test/c"]) == pytest.approx(3e-1)
    assert not np.array_equal(s1.params["reward_head"]["layer2"]["kernel"],
                              s2.params["reward_head"]["layer2"]["kernel"])
    assert not np.array_equal(s1.params[PI_KEY]["layer2"]["kernel"], s2.params[PI_KEY]["layer2"]["kernel"])
    assert int(m1["test/wm_step"]) == int(m1["test/pi_step"]) == int(state.step) == 5
    assert int(s1.step) == 6
    assert jax.dtypes.issubdtype(seen["wm_key"].dtype, jax.dtypes.prng_key)
    assert jax.dtypes.issubdtype(seen["pi_key"].dtype, jax.dtypes.prng_key)


def test_learner_takes_any_update_fn_and_aux(setup):
    """``Learner(update_fn=...)`` validates and compiles a step with extra terms; ``aux`` reaches them."""
    config, model, losses, state, batch = setup

    def wm_term(ro, batch, aux, step, key, params):
        return aux * jnp.sum(jnp.square(ro.reward_logits)), {"test/aux": aux}

    learner = Learner(config, donate=False,
                      update_fn=make_update_fn(model, config, losses, extra_wm_loss=wm_term))
    _, m = learner.update(state, make_batch(3), jax.random.key(1), aux=jnp.float32(0.5))
    assert float(m["test/aux"]) == 0.5
    with pytest.raises(ValueError, match="batch.obs has shape"):
        learner.update(state, make_batch(3).replace(obs=np.zeros((4, 8, 17), np.float32)), jax.random.key(1),
                       aux=jnp.float32(0.5))
