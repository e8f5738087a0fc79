"""The 2 drawn Q heads: TD target, policy Q and planner value equal the drawn heads' min / mean, in either order;
with 2 heads of 2 no Q parameter is gathered (``heads_to_evaluate``), with more the drawn heads' parameters are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_util import equations

from mtdistill_jax.configs import MT30, get_smoke_config
from mtdistill_jax.nn import WorldModel, heads_to_evaluate, init_params, make_world_model, q_reduce
from mtdistill_jax.tdmpc2.losses import make_losses
from mtdistill_jax.tdmpc2.planner import make_value_estimator
from mtdistill_jax.tdmpc2.train import Learner
from mtdistill_jax.types import Batch

B, H = 8, 3


def _config(num_q: int):
    config = get_smoke_config()
    config.model.num_q = num_q
    config.model.dropout = 0.0  # the policy's Q runs in train mode: no masks, so values compare exactly
    return config


def _setup(num_q: int):
    config = _config(num_q)
    model = make_world_model(config.model)
    params = init_params(model, jax.random.key(0))
    # the Q output layers are zero-initialised (every head 0): perturb them so that the heads differ
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params["Qs"] = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params["Qs"])
    rng = np.random.default_rng(0)
    task = jnp.asarray(np.arange(B) * 7 % 30, jnp.int32)
    z = model.apply({"params": params}, jnp.asarray(rng.normal(size=(H, B, 24)), jnp.float32), task,
                    method=WorldModel.encode)
    eps = jnp.asarray(rng.normal(size=(H, B, 6)), jnp.float32)
    return config, model, params, task, z, eps


@pytest.fixture(scope="module", params=[2, 5], ids=lambda n: f"num_q{n}")
def setup(request):
    return _setup(request.param)


def _orders(num_q):
    return [[0, 1], [1, 0]] + ([[num_q - 1, 2], [3, 0]] if num_q > 2 else [])


def test_heads_to_evaluate_skips_the_draw_only_for_two_heads():
    heads = jnp.asarray([1, 0])
    assert heads_to_evaluate(heads, 2) is None
    assert heads_to_evaluate(heads, 5) is heads


def test_td_target_and_policy_q_are_the_drawn_heads_min_and_mean(setup):
    config, model, params, task, z, eps = setup
    losses = make_losses(model, config)
    reward = jnp.ones((H, B, 1))
    action, _ = model.apply({"params": params}, z, task, eps, method=WorldModel.pi)
    every = model.apply({"params": params}, z, action, task, True, method=WorldModel.Q)  # [num_q, H, B, K]
    values = {}
    for heads in _orders(config.model.num_q):
        h = jnp.asarray(heads, jnp.int32)
        _, aux = jax.jit(losses.td_target)(params, params["Qs"], z, reward, task, eps, h)
        pi = jax.jit(losses.policy_rollout)({}, params, z, task, eps, h, jax.random.key(2))
        np.testing.assert_allclose(aux["td_q"], q_reduce(every[h], config.model, "min"), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pi.q, q_reduce(every[h], config.model, "avg"), rtol=1e-5, atol=1e-5)
        values[tuple(heads)] = (np.asarray(aux["td_q"]), np.asarray(pi.q))
    # the order of two drawn heads changes nothing (bit for bit where they are all the heads)
    for a, b in zip(values[(0, 1)], values[(1, 0)], strict=True):
        np.testing.assert_array_equal(a, b)
    if config.model.num_q > 2:  # other heads give other values
        assert not np.allclose(values[(0, 1)][0], values[(config.model.num_q - 1, 2)][0])


def test_planner_value_is_the_drawn_heads_mean(setup):
    config, model, params, task, z, eps = setup
    value = jax.jit(make_value_estimator(model, config))
    rng = np.random.default_rng(1)
    mask = jnp.asarray(np.asarray(MT30.action_dims)[np.asarray(task)][:, None] > np.arange(6), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, (config.planner.horizon, B, 6)), jnp.float32) * mask
    gamma = jnp.full((B, 1), 0.99)
    got = {tuple(h): np.asarray(value(params, z[0], actions, task, gamma, eps[0], jnp.asarray(h, jnp.int32)))
           for h in _orders(config.model.num_q)}
    np.testing.assert_array_equal(got[(0, 1)], got[(1, 0)])
    if config.model.num_q > 2:
        assert not np.allclose(got[(0, 1)], got[(config.model.num_q - 1, 2)])


def _gathered_shapes(num_q: int) -> set:
    """Operand shapes of the gathers in the update's jaxpr (smoke batch; traced, not compiled)."""
    learner = Learner(_config(num_q), donate=False)
    state = learner.init(jax.random.key(0))
    batch = Batch(obs=jnp.zeros((H + 1, B, 24)), action=jnp.zeros((H, B, 6)), reward=jnp.zeros((H, B, 1)),
                  task=jnp.zeros(B, jnp.int32))
    jaxpr = jax.make_jaxpr(learner._update)(state, batch, jax.random.key(0))
    return {tuple(e.invars[0].aval.shape) for e in equations(jaxpr, "gather")}


@pytest.mark.parametrize("num_q", [2, 5])
def test_the_update_gathers_q_parameters_only_when_it_must(num_q):
    m = _config(num_q).model
    q_kernel = (num_q, m.mlp_dim, m.mlp_dim)  # the Q ensemble's hidden layer
    assert (q_kernel in _gathered_shapes(num_q)) == (num_q > 2)
