"""MPPI planner: masks, warm start, policy trajectories, modes, a toy problem, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxpr_util import equations

from mtdistill_jax.configs import MT30, get_smoke_config
from mtdistill_jax.nn import WorldModel, init_params
from mtdistill_jax.tdmpc2.planner import Planner, PlannerState, make_planner


@pytest.fixture(scope="module")
def planner():
    return Planner(get_smoke_config())


@pytest.fixture(scope="module")
def params(planner):
    return init_params(planner.model, jax.random.key(0))


def obs_for(tasks, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(len(tasks), 24)).astype(np.float32)
    for i, t in enumerate(tasks):
        obs[i, MT30.obs_dims[t]:] = 0
    return obs


@pytest.mark.parametrize("mode", ["sample", "elite", "mean"])
def test_padded_action_dims_exactly_zero(planner, params, mode):
    tasks = np.arange(30)
    state = planner.init(30)
    action, state = planner.act(params, obs_for(tasks), tasks, state, np.ones(30, bool), jax.random.key(1), mode)
    action, mean = np.asarray(action), np.asarray(state.prev_mean)
    assert action.shape == (30, 6) and np.all(np.abs(action) <= 1)
    for i, t in enumerate(tasks):
        a = MT30.action_dims[t]
        assert np.all(action[i, a:] == 0.0) and np.all(mean[i, :, a:] == 0.0)
        if mode == "sample":
            assert np.all(action[i, :a] != 0.0)


def test_mean_mode_returns_mpc_mean(planner, params):
    tasks = np.array([0, 4, 6])
    action, state = planner.act(params, obs_for(tasks), tasks, planner.init(3), np.ones(3, bool),
                                jax.random.key(2), "mean")
    np.testing.assert_allclose(np.asarray(action), np.clip(np.asarray(state.prev_mean[:, 0]), -1, 1), atol=1e-7)
    with pytest.raises(TypeError):  # no eval_mode shorthand: the mode is explicit
        planner.act(params, obs_for(tasks), tasks, planner.init(3), np.ones(3, bool), jax.random.key(2),
                    eval_mode=True)


def test_elite_mode_is_sample_without_noise(planner, params):
    """``'elite'`` (official eval_mode=True) picks the same elite as ``'sample'`` (official act), minus the noise."""
    tasks = np.array([0, 4, 6])
    args = (params, obs_for(tasks), tasks, planner.init(3), np.ones(3, bool), jax.random.key(2))
    elite, _ = planner.act(*args, mode="elite")
    sample, _ = planner.act(*args, mode="sample")
    elite, sample = np.asarray(elite), np.asarray(sample)
    assert not np.array_equal(elite, sample)
    assert np.all(np.abs(elite - sample) < 4 * get_smoke_config().planner.max_std + 1e-6)


def test_policy_interface_matches_act(planner, params):
    """The actor policy ``(params, obs, task, first, state, key) -> (action, state)`` is ``Planner.act``."""
    from mtdistill_jax.acting import actor_step
    from mtdistill_jax.tdmpc2.planner import init_planner_state, make_prior_policy

    tasks = np.array([0, 13, 28])
    obs, first = obs_for(tasks), np.array([True, False, True])
    prev = planner.init(3).replace(prev_mean=jnp.full((3, 3, 6), 0.3))
    want, want_state = planner.act(params, obs, tasks, prev, first, jax.random.key(3), "elite")
    env_state = type("S", (), dict(obs=jnp.asarray(obs), task=jnp.asarray(tasks), first=jnp.asarray(first)))
    got, got_state = jax.jit(lambda p, s, k: actor_step(planner.policy("elite"), p, env_state, s, k))(
        params, prev, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_state.prev_mean), np.asarray(want_state.prev_mean), atol=1e-6)
    assert init_planner_state(get_smoke_config(), 3).prev_mean.shape == (3, 3, 6)
    # the policy prior: same interface, stateless; 'mean' is deterministic, 'sample' is not
    prior = make_prior_policy(planner.model, get_smoke_config(), "mean")
    a1, st = prior(params, jnp.asarray(obs), jnp.asarray(tasks), jnp.asarray(first), (), jax.random.key(0))
    a2, _ = prior(params, jnp.asarray(obs), jnp.asarray(tasks), jnp.asarray(first), (), jax.random.key(1))
    assert st == () and a1.shape == (3, 6) and np.all(np.abs(np.asarray(a1)) <= 1)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    sampled = make_prior_policy(planner.model, get_smoke_config(), "sample")
    s1, _ = sampled(params, jnp.asarray(obs), jnp.asarray(tasks), jnp.asarray(first), (), jax.random.key(0))
    assert not np.allclose(np.asarray(s1), np.asarray(a1))
    for i, t in enumerate(tasks):
        assert np.all(np.asarray(s1)[i, MT30.action_dims[t]:] == 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_prior_policy(planner.model, get_smoke_config(), "elite")


def test_per_env_independence_and_determinism(planner, params):
    tasks = np.array([0, 13, 28])
    obs = obs_for(tasks)
    st = planner.init(3)
    a1, _ = planner.act(params, obs, tasks, st, np.ones(3, bool), jax.random.key(3))
    a2, _ = planner.act(params, obs, tasks, st, np.ones(3, bool), jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    a3, _ = planner.act(params, obs, tasks, st, np.ones(3, bool), jax.random.key(4))
    assert not np.allclose(np.asarray(a1), np.asarray(a3))


def test_warm_start_shifts_previous_mean(planner):
    """With a model whose values do not depend on the action, every candidate scores the same, so the
    refitted mean is the average of the samples: centred on the warm start (shifted previous mean)."""
    cfg = get_smoke_config()
    cfg.planner.num_samples = 4096
    cfg.planner.num_elites = 4096
    cfg.planner.num_pi_trajs = 0
    cfg.planner.iterations = 1
    cfg.planner.max_std = 0.05
    model = planner.model
    plan = jax.jit(make_planner(model, cfg), static_argnames="mode")
    zero = init_params(model, jax.random.key(0))  # reward and Q heads are zero-initialised: value = 0
    prev = jnp.asarray(np.tile(np.array([[0.5], [-0.5], [0.25]], np.float32), (1, 6)))[None]  # [1, H=3, A=6]
    tasks = jnp.asarray([0])
    obs = jnp.asarray(obs_for([0]))
    _, mean = plan(zero, obs, tasks, prev, jnp.asarray([False]), jax.random.key(5), mode="mean")
    np.testing.assert_allclose(np.asarray(mean[0, 0]), -0.5 * np.ones(6), atol=0.01)  # = prev[1]
    np.testing.assert_allclose(np.asarray(mean[0, 1]), 0.25 * np.ones(6), atol=0.01)  # = prev[2]
    np.testing.assert_allclose(np.asarray(mean[0, 2]), np.zeros(6), atol=0.01)  # new last step
    _, mean_t0 = plan(zero, obs, tasks, prev, jnp.asarray([True]), jax.random.key(5), mode="mean")
    np.testing.assert_allclose(np.asarray(mean_t0[0]), np.zeros((3, 6)), atol=0.01)  # t0: no warm start


def _train_reward_towards_first_action_dim(model, params, steps=300):
    """Fit the reward head so that r(z, a) = 5 * a_0: the best action pushes a_0 to +1."""
    from mtdistill_jax import math as tm

    opt = optax.adam(3e-3)
    sub = params["reward_head"]
    state = opt.init(sub)
    tasks = jnp.zeros((256,), jnp.int32)

    def loss(sub, key):
        k1, k2 = jax.random.split(key)
        z = jax.nn.softmax(jax.random.normal(k1, (256, 16, 8)), -1).reshape(256, 128)
        a = jax.random.uniform(k2, (256, 6), minval=-1, maxval=1)
        logits = model.apply({"params": {**params, "reward_head": sub}}, z, a, tasks, method=WorldModel.reward)
        return jnp.mean(tm.soft_ce(logits, 5 * a[:, :1], 101, -10.0, 10.0))

    @jax.jit
    def step(sub, state, key):
        g = jax.grad(loss)(sub, key)
        u, state = opt.update(g, state)
        return optax.apply_updates(sub, u), state

    for i in range(steps):
        sub, state = step(sub, state, jax.random.key(i))
    return {**params, "reward_head": sub}


def test_planning_with_trained_reward_picks_better_action(planner, params):
    trained = _train_reward_towards_first_action_dim(planner.model, params)
    cfg = get_smoke_config()
    cfg.planner.num_samples = 256
    cfg.planner.num_elites = 32
    cfg.planner.iterations = 4
    pl = Planner(cfg, planner.model)
    obs = obs_for([0, 0])
    for mode in ("mean", "elite"):
        action, _ = pl.act(trained, obs, np.array([0, 0]), pl.init(2), np.ones(2, bool), jax.random.key(7), mode)
        assert np.all(np.asarray(action)[:, 0] > 0.7), (mode, action)
    # the untrained (zero-reward) model has no preference
    action, _ = pl.act(params, obs, np.array([0, 0]), pl.init(2), np.ones(2, bool), jax.random.key(7), "mean")
    assert np.all(np.abs(np.asarray(action)[:, 0]) < 0.7)


def test_policy_trajectories_are_candidates(planner, params):
    """With only policy trajectories kept as elites, the plan's first action comes from the policy prior."""
    cfg = get_smoke_config()
    cfg.planner.num_samples = 5
    cfg.planner.num_pi_trajs = 4
    cfg.planner.num_elites = 1
    cfg.planner.iterations = 1
    cfg.planner.max_std = 0.05
    cfg.planner.min_std = 0.05
    plan = jax.jit(make_planner(planner.model, cfg), static_argnames="mode")
    # a policy whose mean is +3 on every dim (tanh -> ~0.995) with tiny std, and a reward that likes a_0 > 0
    p = jax.tree_util.tree_map(jnp.array, params)
    p["pi_head"]["layer2"]["bias"] = jnp.concatenate([jnp.full((6,), 3.0), jnp.full((6,), -10.0)])
    p["pi_head"]["layer2"]["kernel"] = jnp.zeros_like(p["pi_head"]["layer2"]["kernel"])
    p = _train_reward_towards_first_action_dim(planner.model, p, steps=200)
    a, _ = plan(p, jnp.asarray(obs_for([0])), jnp.asarray([0]), jnp.zeros((1, 3, 6)), jnp.asarray([True]),
                jax.random.key(0), mode="elite")
    np.testing.assert_allclose(np.asarray(a[0]), np.tanh(3.0) * np.ones(6), atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(obs=np.zeros((2, 17), np.float32)), r"obs must be \[B, 24\]"),
    (dict(task=np.array([0, 30])), r"task ids must be in \[0, 30\)"),
    (dict(task=np.array([0, 1, 2])), r"task must be \[B\]"),
    (dict(state=PlannerState(prev_mean=jnp.zeros((2, 3, 4)))),
     r"prev_mean has shape \(2, 3, 4\), expected \(2, 3, 6\)"),
    (dict(mode="greedy"), "mode must be one of"),
])
def test_bad_input_raises_clear_errors(planner, params, kwargs, match):
    args = dict(obs=obs_for([0, 1]), task=np.array([0, 1]), state=planner.init(2), mode="sample")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        planner.act(params, args["obs"], args["task"], args["state"], np.ones(2, bool), jax.random.key(0),
                    args["mode"])


def _bf16_config(**planner):
    cfg = get_smoke_config()
    cfg.planner.compute_dtype = "bfloat16"
    for k, v in planner.items():
        cfg.planner[k] = v
    return cfg


def _dtypes(eqn):
    """(lhs dtype, rhs dtype) of a dot_general equation."""
    return tuple(str(v.aval.dtype) for v in eqn.invars)


def test_bfloat16_planning_runs_the_model_in_bf16_and_returns_float32(planner, params):
    pl = Planner(_bf16_config(), planner.model)
    tasks = np.arange(30)
    args = (params, jnp.asarray(obs_for(tasks)), jnp.asarray(tasks), pl.init(30).prev_mean, jnp.ones(30, bool),
            jax.random.key(1))
    jaxpr = jax.make_jaxpr(lambda *a: make_planner(pl.model, pl.config)(*a, mode="sample"))(*args)
    dots = [(_dtypes(e), e.invars[1].aval.shape) for e in equations(jaxpr.jaxpr, "dot_general")]
    model_dots = [d for d, _ in dots if d != ("float32", "float32")]
    assert model_dots and all(d == ("bfloat16", "bfloat16") for d in model_dots), set(dots)
    # float32 dots: only matrix-vector products (the LayerNorms' row means, run in float32 on the float32
    # products of the bf16 matmuls, and the centred kernels' means), never a layer
    vectors = [shape for d, shape in dots if d == ("float32", "float32")]
    assert all(shape[-1] == 1 for shape in vectors), set(vectors)
    assert vectors or jax.default_backend() != "cpu"  # row means as products on CPU only
    action, state = pl.act(params, obs_for(tasks), tasks, pl.init(30), np.ones(30, bool), jax.random.key(1), "sample")
    assert action.dtype == jnp.float32 and state.prev_mean.dtype == jnp.float32
    action, mean = np.asarray(action), np.asarray(state.prev_mean)
    for i, t in enumerate(tasks):
        assert np.all(action[i, MT30.action_dims[t]:] == 0.0) and np.all(mean[i, :, MT30.action_dims[t]:] == 0.0)


def test_bfloat16_planning_still_finds_the_better_action(planner, params):
    trained = _train_reward_towards_first_action_dim(planner.model, params)
    pl = Planner(_bf16_config(num_samples=256, num_elites=32, iterations=4), planner.model)
    for mode in ("mean", "elite"):
        action, _ = pl.act(trained, obs_for([0, 0]), np.array([0, 0]), pl.init(2), np.ones(2, bool),
                           jax.random.key(7), mode)
        assert np.all(np.asarray(action)[:, 0] > 0.7), (mode, action)


def test_bfloat16_values_are_the_float32_values_to_bf16_precision(planner, params):
    from mtdistill_jax.checkpoint import transforms
    from mtdistill_jax.tdmpc2.planner import make_value_estimator

    trained = _train_reward_towards_first_action_dim(planner.model, params)
    cfg = get_smoke_config()
    value = jax.jit(make_value_estimator(planner.model, cfg))
    rng = np.random.default_rng(3)
    n, H = 64, cfg.planner.horizon
    obs, task = jnp.asarray(obs_for([0] * n)), jnp.zeros(n, jnp.int32)
    mask = jnp.asarray(MT30.action_dims[0] > np.arange(6), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, (H, n, 6)).astype(np.float32)) * mask
    gamma, heads = jnp.full((n, 1), 0.99), jnp.arange(2)
    eps = jnp.asarray(rng.normal(size=(n, 6)).astype(np.float32))

    def values(p, dtype):
        z = planner.model.apply({"params": p}, obs.astype(dtype), task, method=WorldModel.encode)
        return np.asarray(value(p, z, actions, task, gamma, eps, heads))[:, 0]

    v32 = values(trained, jnp.float32)
    v16 = values(transforms.to_compute(trained, "bfloat16", xp=jnp), jnp.bfloat16)
    assert v16.dtype == np.float32
    spread = v32.max() - v32.min()
    assert spread > 0.1  # the trained reward separates the action samples
    err = np.abs(v16 - v32)
    assert err.max() < 0.05 * spread, (err.max(), spread)
    assert np.corrcoef(v16, v32)[0, 1] > 0.99


def test_the_planner_centres_its_hidden_layers_with_the_same_values(planner, params, monkeypatch):
    """The value estimator runs its hidden layers with centred weights (nn.layers.centred_hidden_layers): on CPU
    in float32 one row mean of each hidden activation (the variance's) per layer use instead of two; the values
    are the uncentred layers' within float32 round-off."""
    from mtdistill_jax.nn import layers
    from mtdistill_jax.tdmpc2 import planner as planner_module
    from mtdistill_jax.tdmpc2.planner import make_value_estimator

    trained = _train_reward_towards_first_action_dim(planner.model, params)
    cfg, rng = get_smoke_config(), np.random.default_rng(4)
    n, H, h = 7, cfg.planner.horizon, cfg.model.mlp_dim
    z = planner.model.apply({"params": trained}, jnp.asarray(obs_for([3] * n)), jnp.full(n, 3, jnp.int32),
                            method=WorldModel.encode)
    args = (trained, z, jnp.asarray(rng.uniform(-1, 1, (H, n, 6)).astype(np.float32)), jnp.full(n, 3, jnp.int32),
            jnp.full((n, 1), 0.99), jnp.asarray(rng.normal(size=(n, 6)).astype(np.float32)), jnp.arange(2))

    def run():  # a fresh estimator and trace each time (traces are cached)
        fn = make_value_estimator(planner.model, cfg)
        jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)
        row_means = sum(1 for e in equations(jaxpr, "dot_general")
                        if e.invars[0].aval.shape[-2:] == (n, h) and e.invars[1].aval.shape[-1] == 1)
        return np.asarray(jax.jit(fn)(*args))[:, 0], row_means

    centred, centred_means = run()
    monkeypatch.setattr(planner_module, "centred_hidden_layers", lambda: layers.centred_hidden_layers(False))
    plain, plain_means = run()
    assert np.ptp(plain) > 0.1
    np.testing.assert_allclose(centred, plain, rtol=1e-5, atol=1e-5 * np.ptp(plain))
    uses = 4 * H + 2 + 2  # reward and next (2 hidden each) per step, then pi and the 2 Q heads (2 hidden each)
    if jax.default_backend() == "cpu":
        assert (centred_means, plain_means) == (uses, 2 * uses)
