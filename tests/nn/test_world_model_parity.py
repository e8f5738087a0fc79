"""Every recorded forward of the official world model, from both checkpoint key formats.

Tolerance: atol = rtol = TOL on all fields: float32 round-off (the reference README's figure for the shared
1M model: observed max abs error ~1e-6 on latents and logits, ~4e-5 on scaled entropies of magnitude ~150, under
TOL = 1e-5). Round-off of a float32 dot product grows as sqrt(fan-in) and accumulates over the layers of a path
like a random walk, so TOL scales with sqrt(widest fan-in x deepest path) relative to that 1M model (384 x 5):
a 317M reference (fan-in 4096, 5 encoder + 3 head layers) gets 4.1e-5; a real difference (LayerNorm eps 1e-6
instead of 1e-5, a transposed weight) moves outputs by 1e-4 or more.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from refdata import load_case, reference_dir, world_model_cases

from mtdistill_jax import math as tm
from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint
from mtdistill_jax.nn import WorldModel, count_params, make_world_model, q_reduce, q_value

CASES = world_model_cases()
if not CASES:
    pytest.skip(f"no world-model reference files in {reference_dir()}", allow_module_level=True)


@pytest.fixture(scope="module", params=[(n, f) for n in CASES for f in ("", "_release")],
                ids=lambda p: f"{p[0]}{p[1] or '_current'}")
def case(request):
    name, suffix = request.param
    cfg, io = load_case(name)
    imp = load_tdmpc2_checkpoint(reference_dir() / f"wm_{name}{suffix}.pt")
    return cfg, io, imp, make_world_model(imp.config)


def tolerance(c) -> float:
    """atol = rtol for a model config (see the module docstring)."""
    fan_in = max(c.enc_dim, c.mlp_dim, c.latent_dim + c.task_dim + 6)
    depth = c.num_enc_layers + 3
    return 1e-5 * max(1.0, np.sqrt(fan_in * depth / (384 * 5)))


def close(a, b, c):
    tol = tolerance(c)
    np.testing.assert_allclose(np.asarray(a), b, atol=tol, rtol=tol)


def test_config_and_param_count(case):
    cfg, _, imp, model = case
    c = imp.config
    assert c.task_set == cfg["task_set"] and c.model_size == cfg["model_size"]
    for k in ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "task_dim", "num_q", "num_bins", "simnorm_dim"):
        assert c[k] == cfg["config"][k], k
    assert count_params(imp.params) == cfg["total_params"]
    assert imp.target_q_params is not None


def test_task_embedding_renorm(case):
    _, io, imp, model = case
    np.testing.assert_array_equal(imp.params["task_emb"]["embedding"], io["task_emb_raw"])
    emb = model.apply({"params": imp.params}, jnp.arange(io["task_emb_raw"].shape[0]), method=WorldModel.embedding)
    np.testing.assert_allclose(np.asarray(emb), io["task_emb_renormed"], atol=1e-7)


@pytest.mark.parametrize("seq", ["", "_seq"])
def test_forward(case, seq):
    _, io, imp, model = case
    P = {"params": imp.params}
    c = imp.config
    task = jnp.asarray(io["task"])
    obs, act, z = io["obs" + seq], io["action" + seq], io["z" + seq]
    close(model.apply(P, obs, task, method=WorldModel.encode), z, c)
    close(model.apply(P, z, act, task, method=WorldModel.next), io["next_z" + seq], c)
    r_logits = model.apply(P, z, act, task, method=WorldModel.reward)
    close(r_logits, io["reward_logits" + seq], c)
    close(tm.two_hot_inv(r_logits, c.num_bins, c.vmin, c.vmax), io["reward" + seq], c)
    q_logits = model.apply(P, z, act, task, method=WorldModel.Q)
    close(q_logits, io["q_all_logits" + seq], c)
    close(tm.two_hot_inv(q_logits, c.num_bins, c.vmin, c.vmax), io["q_all" + seq], c)


def test_q_reductions_and_target(case):
    _, io, imp, model = case
    c = imp.config
    task = jnp.asarray(io["task"])
    q_logits = model.apply({"params": imp.params}, io["z"], io["action"], task, method=WorldModel.Q)
    close(q_value(q_logits, None, c, "min", heads=jnp.asarray(io["q_min_official_heads"])), io["q_min_official"], c)
    close(q_value(q_logits, None, c, "avg", heads=jnp.asarray(io["q_avg_official_heads"])), io["q_avg_official"], c)
    close(q_value(q_logits, None, c, "min", heads=jnp.asarray([0, 1])), io["q_min_h01"], c)
    close(q_value(q_logits, None, c, "avg", heads=jnp.asarray([0, 1])), io["q_avg_h01"], c)
    t_logits = model.apply({"params": {**imp.params, "Qs": imp.target_q_params}}, io["z"], io["action"], task,
                           method=WorldModel.Q)
    close(t_logits, io["target_q_all_logits"], c)
    close(tm.two_hot_inv(t_logits, c.num_bins, c.vmin, c.vmax), io["target_q_all"], c)
    close(q_value(t_logits, None, c, "min", heads=jnp.asarray([0, 1])), io["target_q_min_h01"], c)
    close(q_value(t_logits, None, c, "avg", heads=jnp.asarray([0, 1])), io["target_q_avg_h01"], c)
    # Q(..., heads=...) computes only the chosen heads: the same values as those rows of every head's logits
    for heads in ([0, 1], list(io["q_min_official_heads"]), [c.num_q - 1, 0]):
        h = jnp.asarray(heads)
        some = model.apply({"params": imp.params}, io["z"], io["action"], task, True, h, method=WorldModel.Q)
        assert some.shape == (2,) + q_logits.shape[1:]
        np.testing.assert_allclose(np.asarray(some), np.asarray(q_logits)[np.asarray(heads)], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(q_reduce(some, c, "min")),
                                   np.asarray(q_value(q_logits, None, c, "min", heads=h)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seq", ["", "_seq"])
def test_policy_with_recorded_noise(case, seq):
    _, io, imp, model = case
    c = imp.config
    task = jnp.asarray(io["task"])
    action, info = model.apply({"params": imp.params}, io["z" + seq], task, io["pi_eps_raw" + seq],
                               method=WorldModel.pi)
    close(action, io["pi_action" + seq], c)
    close(info["mean"], io["pi_mean" + seq], c)
    close(info["log_std"], io["pi_log_std" + seq], c)
    close(info["log_prob_presquash"], io["pi_log_prob_presquash" + seq], c)
    close(info["entropy"], io["pi_entropy" + seq], c)
    close(info["scaled_entropy"], io["pi_scaled_entropy" + seq], c)
    dims = io["pi_action_dims" + seq]
    close(info["action_dims"].reshape(-1, dims.shape[-1])[-dims.shape[0]:], dims, c)
    # padded action dims are exactly zero
    pad = np.arange(6)[None] >= io["task_action_dim"][:, None]
    assert np.all(np.asarray(action)[..., pad] == 0)
