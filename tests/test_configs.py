"""Configs: official widths, task sets, discounts, parameter counts via jax.eval_shape."""

import pytest

from mtdistill_jax.configs import (
    MT30,
    MT80,
    OFFICIAL_PARAM_COUNTS,
    get_config,
    get_model_config,
    get_smoke_config,
    get_task_set,
)
from mtdistill_jax.configs.tasks import discount_for_episode_length
from mtdistill_jax.nn import abstract_params, count_params, make_world_model


@pytest.mark.parametrize("task_set", ["mt30", "mt80"])
@pytest.mark.parametrize("size", [1, 5, 19, 48, 317])
def test_param_counts_equal_official(task_set, size):
    params = abstract_params(make_world_model(get_model_config(size, task_set)))
    assert count_params(params) == OFFICIAL_PARAM_COUNTS[task_set][size]


def test_official_widths():
    c = get_model_config(1, "mt30")
    assert (c.enc_dim, c.mlp_dim, c.latent_dim, c.num_enc_layers, c.num_q, c.task_dim) == (256, 384, 128, 2, 2, 96)
    assert get_model_config(19, "mt30").latent_dim == 512
    assert get_model_config(19, "mt80").latent_dim == 768
    assert [get_model_config(s, "mt30").task_dim for s in (1, 5, 19, 48, 317)] == [96, 64, 64, 64, 96]
    assert all(get_model_config(s, "mt80").task_dim == 96 for s in (1, 5, 19, 48, 317))
    assert get_model_config(317).num_q == 8 and get_model_config(5).num_q == 5
    assert (c.simnorm_dim, c.num_bins, c.vmin, c.vmax, c.dropout, c.log_std_min, c.log_std_max) == (
        8, 101, -10.0, 10.0, 0.01, -10.0, 2.0)


def test_task_sets():
    assert MT30.num_tasks == 30 and MT80.num_tasks == 80
    assert (MT30.obs_pad, MT30.action_pad, MT80.obs_pad, MT80.action_pad) == (24, 6, 39, 6)
    assert MT30.tasks[0] == "walker-stand" and MT30.tasks[29] == "pendulum-spin"
    assert MT80.tasks[:30] == MT30.tasks and MT80.tasks[30] == "mw-assembly"
    assert MT30.task_id("cup-spin") == 28
    assert set(MT30.discounts) == {0.99}
    assert set(MT80.discounts[30:]) == {0.95}
    with pytest.raises(KeyError, match="valid: walker-stand"):
        MT30.task_id("walker-fly")
    with pytest.raises(KeyError, match="mt30, mt80"):
        get_task_set("mt10")


def test_discount_formula_clipped():
    assert discount_for_episode_length(500) == pytest.approx(0.99)
    assert discount_for_episode_length(100) == pytest.approx(0.95)
    assert discount_for_episode_length(10) == 0.95
    assert discount_for_episode_length(100_000) == 0.995
    with pytest.raises(ValueError):
        discount_for_episode_length(0)


def test_training_and_planner_defaults():
    c = get_config()
    t, p = c.train, c.planner
    assert (t.horizon, t.rho, t.consistency_coef, t.reward_coef, t.value_coef, t.entropy_coef) == (
        3, 0.5, 20.0, 0.1, 0.1, 1e-4)
    assert (t.lr, t.enc_lr_scale, t.grad_clip_norm, t.batch_size, t.tau) == (3e-4, 0.3, 20.0, 256, 0.01)
    assert (p.iterations, p.num_samples, p.num_pi_trajs, p.num_elites, p.temperature) == (6, 512, 24, 64, 0.5)
    assert (p.min_std, p.max_std, p.horizon) == (0.05, 2.0, 3)


def test_configs_are_locked_and_independent():
    c = get_config()
    with pytest.raises(AttributeError):
        c.train.learning_rate = 1.0  # misspelled field
    c.train.lr = 1.0
    assert get_config().train.lr == 3e-4  # no shared mutable default
    assert get_smoke_config().train.batch_size == 8
    with pytest.raises(ValueError, match="valid"):
        get_model_config(2)


def test_online_config_official_defaults_and_checks():
    from mtdistill_jax.configs import online
    from mtdistill_jax.errors import UserError
    from mtdistill_jax.tdmpc2.online import default_seed_steps, replay_capacity

    c = online.get_config()
    online.check_config(c)
    # official online trainer: 10M env steps, 5M model, buffer min(steps, 1M), 1 update per env step
    assert (c.steps, c.model.model_size, c.train.batch_size, c.online.utd) == (10_000_000, 5, 256, 1.0)
    assert replay_capacity(c) == 1_000_000 and default_seed_steps(500) == 2500
    assert online.task_list(c) == ["cartpole-balance"] and online.num_envs(c) == 1
    c.tasks, c.online.envs_per_task = "walker-walk, cup-spin", 2
    assert online.task_list(c) == ["walker-walk", "cup-spin"] and online.num_envs(c) == 4
    online.check_config(c)
    for field, value, match in [("tasks", "walker-wlk", "walker-wlk not in mt30"),
                                ("tasks", "cup-spin,cup-spin", "names a task twice"),
                                ("steps", 10, r"steps=10 is not a multiple of the 4 envs"),
                                ("online.seed_steps", -2, "online.seed_steps must be an int >= 0"),
                                ("online.utd", 0.0, "online.utd must be > 0"),
                                ("online.envs_per_task", 0, "online.envs_per_task must be an int >= 1")]:
        bad = online.get_config()
        bad.tasks, bad.online.envs_per_task = "walker-walk,cup-spin", 2
        node, name = (bad.online, field.split(".")[1]) if "." in field else (bad, field)
        node[name] = value
        with pytest.raises(UserError, match=match):
            online.check_config(bad)
    assert online.resolve(_with_size(online.get_config(), 1)).model.model_size == 1


def _with_size(config, size):
    config.model_size = size
    return config
