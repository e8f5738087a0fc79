"""The fused online loop: seed phase, replay, update schedule and determinism on a tiny config (CPU)."""

import jax
import numpy as np
import pytest

from mtdistill_jax.configs.train import get_smoke_config
from mtdistill_jax.envs.multitask import MultiTaskEnv
from mtdistill_jax.errors import UserError
from mtdistill_jax.tdmpc2.online import OnlineLoop, default_seed_steps

T = 8  # agent steps per episode


@pytest.fixture(scope="module")
def loop():
    config = get_smoke_config()
    config.steps = 100
    env = MultiTaskEnv(["cartpole-balance"], 2, episode_length=T)
    # 3 env steps of seeding -> 2 agent steps, raised to one whole episode (T); then 3 pretraining updates and
    # utd 0.5 x 2 envs = 1 update per agent step
    return OnlineLoop(config, env, seed_steps=3, seed_updates=3, utd=0.5, capacity=4 * 2 * T)


@pytest.mark.slow
def test_online_chunk(loop):
    assert loop.seed_agent_steps == T and loop.replay.capacity == 8  # episodes: 64 transitions / T
    chunk = jax.jit(loop.train_chunk, static_argnums=1)
    init = loop.init(jax.random.key(0))
    carry, stats = chunk(init, T + 4)
    assert int(carry.agent_steps) == T + 4
    # random actions at agent steps 0..T (official: step <= seed_steps), 3 pretraining updates at step T,
    # then 1 per agent step (T+1 .. T+3)
    assert int(stats.num_updates) == int(carry.updates) == 3 + 3
    assert int(carry.learner.step) == 6
    assert stats.episodes.tolist() == [1, 1]  # each env ended one episode
    assert np.all(np.isfinite(jax.tree_util.tree_leaves(stats.metrics)[0]))
    assert float(stats.metrics["train/total_loss"]) != 0.0
    # the buffer holds the two finished episodes (seed phase: uniform actions on cartpole's one action dim)
    assert int(loop.replay.num_sampleable(carry.replay)) == 2
    act = np.asarray(carry.replay.data.action[:2, 1:])
    assert np.all(np.abs(act[..., 0]) <= 1) and np.all(act[..., 1:] == 0) and act[..., 0].std() > 0.1
    rew = np.asarray(carry.replay.data.reward[:2, 1:]).sum(1)
    np.testing.assert_allclose(rew, np.asarray(stats.episode_return_sum), rtol=1e-6)
    # the same key gives the same run; the learner moved
    again, _ = chunk(loop.init(jax.random.key(0)), T + 4)
    same = jax.tree_util.tree_map(lambda a, b: bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
                                  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else
                                  bool(np.array_equal(np.asarray(a), np.asarray(b))), carry, again)
    assert all(jax.tree_util.tree_leaves(same))
    assert loop._init._cache_size() == 1  # the fresh carry is one compiled program, made once
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(init.learner.params), jax.tree_util.tree_leaves(carry.learner.params), strict=True)]
    assert any(moved)


def test_chunk_traces_the_env_step_and_the_update_once():
    """The accumulators' shapes come from the same jitted traces the loop bodies use: one trace each of the env
    step and the update per chunk program (tracing them again took 9 of the chunk's 15 s)."""
    from mtdistill_jax.nn.world_model import make_world_model
    from mtdistill_jax.tdmpc2.train import make_update_fn

    config = get_smoke_config()
    update, calls = make_update_fn(make_world_model(config.model), config), []
    env = MultiTaskEnv(["cartpole-balance"], 2, episode_length=T)
    env_step = env.step
    env.step = lambda *a: calls.append("env") or env_step(*a)
    loop = OnlineLoop(config, env, update_fn=lambda *a: calls.append("update") or update(*a), capacity=2 * T)
    jax.jit(loop.train_chunk).trace(jax.eval_shape(loop.init, jax.random.key(0)), np.int32(1))
    assert sorted(calls) == ["env", "update"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's YNNPACK path")
def test_a_bf16_planner_compiles_the_loop_with_the_bf16_dot_path():
    """train_chunk_jit (what launch/train.py --mode=online runs) compiles a loop whose planner computes in bf16
    with the planner's compiler options (YNNPACK's single-dot path on CPU: the bf16 units)."""
    from mtdistill_jax.tdmpc2.planner import compiler_options

    config = get_smoke_config()
    config.planner.compute_dtype = "bfloat16"
    loop = OnlineLoop(config, MultiTaskEnv(["cartpole-balance"], 2, episode_length=T), capacity=2 * T)
    hlo = loop.train_chunk_jit.lower(jax.eval_shape(loop.init, jax.random.key(0)), np.int32(1)).compile().as_text()
    assert loop.compiler_options == compiler_options(config)
    assert ("__ynn_fusion" in hlo) == (compiler_options(config) is not None)


def test_defaults_and_bad_args():
    assert default_seed_steps(500) == 2500 and default_seed_steps(100) == 1000
    config = get_smoke_config()
    env = MultiTaskEnv(["cartpole-balance"], 1, episode_length=T)
    with pytest.raises(UserError, match="utd"):
        OnlineLoop(config, env, utd=0)
