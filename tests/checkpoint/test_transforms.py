"""Checkpoint transforms: fp16/bf16 casts, int8 weight-only quantisation, and their effect on the forward pass.

Forward tolerances on the reference batch (``wm_*_io.npz``, the official 1M MT30 model with N(0, 0.02^2)
weights), as relative L2 error ``|out - out_fp32| / |out_fp32|`` per output, float32 compute:

| output | float16 | bfloat16 | int8 |
|---|---|---|---|
| z | 3.6e-4 | 2.7e-3 | 7.0e-3 |
| next_z | 5.0e-4 | 4.1e-3 | 1.19e-2 |
| reward | 9.0e-4 | 3.3e-3 | 1.49e-2 |
| Q (all heads) | 4.9e-4 | 5.2e-3 | 1.44e-2 |
| pi action | 7.3e-4 | 7.0e-3 | 1.76e-2 |

The bounds below are 2x these figures (float16 1e-3 is the fp16 mantissa, bfloat16 1e-2, int8 2e-2).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from refdata import load_case, reference_dir, world_model_cases

from mtdistill_jax import math as tm
from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint
from mtdistill_jax.nn import WorldModel, make_world_model

CASES = world_model_cases()
BOUNDS = {"float16": 1e-3, "bfloat16": 1e-2, "int8": 2e-2}


def _tree():
    rng = np.random.default_rng(0)
    return {"enc": {"layer0": {"kernel": rng.normal(0, 0.1, (5, 4)).astype(np.float32),
                               "bias": rng.normal(0, 0.1, 4).astype(np.float32),
                               "ln_scale": np.ones(4, np.float32)}},
            "Qs": {"layer0": {"kernel": rng.normal(0, 0.1, (3, 5, 4)).astype(np.float32)}},
            "task_emb": {"embedding": rng.normal(0, 1, (2, 4)).astype(np.float32)}}


def test_casts_change_every_float_leaf():
    for dtype in ("bfloat16", "float16", "float32"):
        out = transforms.cast_params(_tree(), dtype)
        assert {np.asarray(x).dtype.name for x in _leaves(out)} == {dtype}


def _leaves(tree):
    out = []
    transforms._walk(tree, lambda p, x: out.append(x))
    return out


def test_float16_refuses_out_of_range_values_naming_the_tensor():
    tree = _tree()
    tree["Qs"]["layer0"]["kernel"][1, 2, 3] = 7e4
    with pytest.raises(ValueError, match=r"Qs/layer0/kernel.*float16 range"):
        transforms.cast_params(tree, "float16")
    transforms.cast_params(tree, "bfloat16")  # bfloat16 has float32's range
    with pytest.raises(ValueError, match="unknown dtype"):
        transforms.transform(tree, "float8")


def test_int8_layout_and_error_bound():
    tree = _tree()
    q = transforms.quantize_int8(tree)
    assert transforms.is_quantized(q) and not transforms.is_quantized(tree)
    for path, shape in ((("enc", "layer0"), (5, 4)), (("Qs", "layer0"), (3, 5, 4))):
        layer = q[path[0]][path[1]]
        assert "kernel" not in layer
        assert layer["kernel_int8"].dtype == np.int8 and layer["kernel_int8"].shape == shape
        scale = layer["kernel_scale"]
        assert scale.dtype == np.float32 and scale.shape == shape[:-2] + shape[-1:]  # one per output channel
        w = tree[path[0]][path[1]]["kernel"]
        np.testing.assert_allclose(scale, np.abs(w).max(axis=-2) / 127, rtol=1e-6)
        assert np.abs(layer["kernel_int8"]).max() == 127
        deq = transforms.dequantize(q)[path[0]][path[1]]["kernel"]
        assert np.all(np.abs(deq - w) <= np.expand_dims(scale, -2) / 2 + 1e-8)
    # biases, LayerNorm and embeddings keep their dtype and values
    np.testing.assert_array_equal(q["enc"]["layer0"]["bias"], tree["enc"]["layer0"]["bias"])
    np.testing.assert_array_equal(q["enc"]["layer0"]["ln_scale"], tree["enc"]["layer0"]["ln_scale"])
    np.testing.assert_array_equal(q["task_emb"]["embedding"], tree["task_emb"]["embedding"])
    # int8 -> float16 goes through the dequantised weights
    f16 = transforms.transform(q, "float16")
    assert not transforms.is_quantized(f16) and f16["enc"]["layer0"]["kernel"].dtype == np.float16


def test_sizes_match_targets():
    if not CASES:
        pytest.skip(f"no world-model reference files in {reference_dir()}")
    params = load_tdmpc2_checkpoint(reference_dir() / f"wm_{CASES[0]}.pt").params
    fp32 = transforms.tree_nbytes(params)
    assert transforms.tree_nbytes(transforms.transform(params, "float16")) == fp32 // 2
    assert transforms.tree_nbytes(transforms.transform(params, "bfloat16")) == fp32 // 2
    ratio = transforms.tree_nbytes(transforms.transform(params, "int8")) / fp32
    assert ratio <= 0.30, ratio  # measured 0.257 on the 1M model
    d = transforms.describe(transforms.transform(params, "int8"))
    assert d["params"] == transforms.describe(params)["params"]  # scales are not counted as parameters


def _outputs(model, params, c, io):
    P = {"params": params}
    task = jnp.asarray(io["task"])
    z = model.apply(P, io["obs"], task, method=WorldModel.encode)
    out = {"z": z, "next_z": model.apply(P, z, io["action"], task, method=WorldModel.next)}
    out["reward"] = tm.two_hot_inv(model.apply(P, z, io["action"], task, method=WorldModel.reward),
                                   c.num_bins, c.vmin, c.vmax)
    out["q"] = tm.two_hot_inv(model.apply(P, z, io["action"], task, method=WorldModel.Q), c.num_bins, c.vmin, c.vmax)
    pi = model.apply(P, z, task, jnp.asarray(io["pi_eps_raw"]), method=WorldModel.pi)
    out["pi_action"] = pi[0] if isinstance(pi, tuple) else pi
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("name", CASES)
def test_forward_within_tolerance_of_fp32(name, dtype):
    _, io = load_case(name)
    ck = load_tdmpc2_checkpoint(reference_dir() / f"wm_{name}.pt")
    model = make_world_model(ck.config)
    ref = _outputs(model, ck.params, ck.config, io)
    # the official fp32 outputs are what our fp32 forward reproduces (tested in tests/nn)
    np.testing.assert_allclose(ref["z"], io["z"], atol=1e-5)
    out = _outputs(model, transforms.to_compute(transforms.transform(ck.params, dtype)), ck.config, io)
    for k in ref:
        rel = np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])
        assert rel <= BOUNDS[dtype], (k, rel)
        assert rel > 0, k  # the transform really changed the weights
