"""Checkpoint transforms: fp16/bf16 casts, int8 weight-only quantisation, and their effect on the forward pass.

Forward bounds (:func:`expected_rms`, :func:`forward_errors`). A transformed checkpoint, computed in float32, is
compared with the float32 one on a batch of 16. Every bound comes from the format's step size and the network's
depth; no constant is fitted to a model.

1. Per tensor. float16 / bfloat16 round each value w to nearest, moving it by at most u|w| with the unit roundoff
   u = eps/2 (float16 2^-11, bfloat16 2^-8; half the smallest subnormal below the normal range). int8 moves a
   kernel entry of output channel c by at most s_c/2, with step s_c = max|w_c| / 127. It leaves biases, LayerNorm
   and embeddings in float32. These limits are computed from the float32 weights and the format, never from the
   transform under test.
2. Per layer. Treat rounding errors as uniform in their cell and independent of each other and of the input
   (the quantisation-noise model), so each has variance <= (limit)^2 / 3. Take an affine y = W x + b whose weights
   are iid within an output channel. Then |y|^2 ~ sum W^2 x^2 (incoherent sum), and y's rms relative error is at
   most eps_l / sqrt(3), where eps_l = ||limits||_F / ||[W; b]||_F. The same holds for the LayerNorm affine
   (scale, bias) and the task embedding. For ensembles, use the largest member's eps_l.
3. Through the network. LayerNorm divides out the scale, Mish's rms slope on unit-Gaussian input is 1.03, and
   SimNorm's softmax shrinks errors, so a relative error passes each layer with gain ~1. Errors of different
   tensors are independent and add in quadrature. An output's expected rms relative error is therefore
   E = sqrt(sum over its path of eps_l^2 / 3). The path is the task embedding, every encoder layer (2 to 5 by
   size) and the head's 3 layers. Each hidden layer counts twice (kernel+bias, LayerNorm) and a plain output
   layer once. Example: float16 z of the 1M model has 5 groups, so E = 2^-11 sqrt(5/3).
4. K = 2 covers what steps 2-3 leave out: gains above 1 that compound with depth (Mish slope up to 1.09;
   1.03^6 = 1.19 over the 6 Mish layers of the 317M model's longest paths) and weights that are not exactly iid.
   K is not a tail factor; that is step 5.
5. T(n) = sqrt(chi2_n(1 - 1e-4) / n), the scatter of a realised rms over n values about its expectation:
   1.06 for z's 2048 values, 1.70 for 16 rewards. n is the effective number of values, (sum w)^2 / sum w^2 over
   their error weights w. The bound is K x T(n) x E.
6. Criteria (each reason is also at its line in :func:`forward_errors`).
   - Network outputs (z, next_z, reward logits, Q logits of all heads, policy-head raw [mean, log-std]):
     relative L2 error over the batch, |out - out_fp32| / |out_fp32|. A relative error is independent of the
     output's scale.
   - Decoded outputs (reward and Q through two-hot, the squashed policy action): their values can be near 0 by
     accident (a projection of near-uniform logits on the bin axis), which makes a plain relative error a ratio
     of two small random numbers. So the error is measured in units of the decoding's first-order sensitivity
     to a generic error of the network output it decodes, and bounded with that output's E. The policy's raw
     log-std has gain up to (log_std_max - log_std_min) / 2 = 6.
   Random models are built with the reference recipe: official init, then + N(0, 0.02^2) on every learnable
   leaf. Freshly initialised reward/Q last layers are zero, so without the noise their outputs would be 0.

Why quadrature and not the worst-case sum K=1 x sum(eps_l)? That sum also holds (measured <= 0.46 of it). But it
sits 3-10x above the errors: bfloat16 rounding delivered when float16 was asked for (8x coarser) reached only
1.04-1.28x of it on z of random 1M models. The bounds here reject that fault at >= 2.3x.

Measured error / bound, worst output per model and format (batch of 16, float32 compute, CPU). Command:
``.venv/bin/python -m pytest -q -s tests/checkpoint/test_transforms.py -k forward``

| model | float16 | bfloat16 | int8 |
|---|---|---|---|
| reference mt30_size1_seed0 | 0.30 reward_logits | 0.29 reward_logits | 0.41 reward_logits |
| random mt30 size 1 | 0.32 q_logits | 0.34 reward_logits | 0.45 q_logits |
| random mt80 size 1 | 0.32 q_logits | 0.32 reward_logits | 0.43 q_logits |
| random mt30 size 5 | 0.35 q_logits | 0.35 q_logits | 0.44 q_logits |
| random mt30 size 19 | 0.35 q_logits | 0.34 q_logits | 0.47 q_logits |
| random mt30 size 48 | 0.32 q_logits | 0.34 q_logits | 0.44 q_logits |
| random mt30 size 317 | 0.35 q_logits | 0.35 q_logits | 0.46 q_logits |

Over seeds 0-19 of random mt30 and mt80 1M models and seeds 0-5 of mt30 5M models, the worst ratios were 0.37
(float16), 0.40 (bfloat16) and 0.56 (int8, a decoded reward). Command, per task set/size:
``PYTHONPATH=.:tests:tests/checkpoint .venv/bin/python -c "import test_transforms as t;
[t._check_formats(t._random_setup('mt80', 1, s)) for s in range(20)]"``

Wrong transforms (``test_wrong_transforms_fail_the_check``), worst error / bound. Each must exceed 1:

| fault | reference | random mt30 size 1 | min over the seed sweep |
|---|---|---|---|
| int8 scale missing (kernel = q) | 5.7e5 | 1.4e6 | 2.3e5 |
| int8 scales rolled by one output channel | 10.5 | 11.1 | 9.7 |
| int8 scale along the input axis (square kernels) | 5.1 | 5.0 | 4.4 |
| int8 Q heads all with member 0's scales | 5.7 | 6.9 | 5.4 |
| float16 asked, bfloat16 rounding given | 2.33 | 2.70 | 2.36 |
| float16 with one square kernel transposed | 432 | 447 | 403 |
"""

import jax
import ml_dtypes
import numpy as np
import pytest
from refdata import load_case, reference_dir, world_model_cases

from mtdistill_jax import math as tm
from mtdistill_jax.checkpoint import transforms
from mtdistill_jax.checkpoint.tdmpc2_torch import load_tdmpc2_checkpoint
from mtdistill_jax.configs.model_sizes import get_model_config
from mtdistill_jax.configs.tasks import get_task_set
from mtdistill_jax.nn import WorldModel, action_masks, init_params, make_world_model

CASES = world_model_cases()


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
    transforms.walk(tree, lambda p, x: out.append(x))
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




# ---------------------------------------------------------------------------------------------------------------
# Forward pass of a transformed checkpoint against float32: bounds from the format's step size and the depth.
# ---------------------------------------------------------------------------------------------------------------

FORMATS = ("float16", "bfloat16", "int8")
K = 2.0  # bound = K x T(n) x expected rms relative error; why 2, see step 4 of the module docstring
TAIL_Z = 3.72  # one-sided 1e-4 standard-normal quantile for T(n), the fluctuation of an rms over n values (step 5)
NOISE_STD = 0.02  # the reference recipe: official init, then + N(0, 0.02^2) on every learnable leaf
BATCH = 16  # the reference io batch size
# network outputs (relative L2 error) and the module after the task embedding + encoder that each passes through
NETWORK_OUTPUTS = {"z": None, "next_z": "dynamics", "reward_logits": "reward_head", "q_logits": "Qs",
                   "pi_raw": "pi_head"}
# decoded outputs (error in units of their first-order sensitivity) and the network output each decodes
DECODED_OUTPUTS = {"reward": "reward_logits", "q": "q_logits", "pi_action": "pi_raw"}


def _max_rounding(fmt: str, name: str, x: np.ndarray):
    """Largest change ``fmt`` can make to each element of the float32 tensor ``name`` (None: stored exactly).

    float16 / bfloat16 round to nearest: at most half a step, u|x| with the unit roundoff u = eps/2, and half the
    smallest subnormal below the normal range. int8 stores Linear kernels only, one step s_c = max|w_c| / 127 per
    output channel c (the last axis), so rounding moves w by at most s_c / 2. Computed from the float32 weights and
    the format alone, never from the transform under test.
    """
    if fmt == "int8":
        if name != "kernel":
            return None  # biases, LayerNorm parameters and embeddings stay float32
        return np.broadcast_to(np.abs(x).max(axis=-2, keepdims=True) / (2 * 127.0), x.shape)
    fi = ml_dtypes.finfo(transforms.BFLOAT16 if fmt == "bfloat16" else np.float16)
    return np.maximum(np.abs(x) * np.float32(float(fi.eps) / 2), np.float32(float(fi.smallest_subnormal) / 2))


def _rel_step(group: dict, names, fmt: str) -> float:
    """eps = ||max rounding||_F / ||tensors||_F over ``names`` of one layer, per ensemble member; the largest."""
    num = den = 0.0
    for n in names:
        x = np.asarray(group[n], np.float32)
        axes = tuple(range(x.ndim - (2 if n in ("kernel", "embedding") else 1), x.ndim))  # leading axes: members
        den = den + np.sum(np.square(x), axis=axes, dtype=np.float64)
        d = _max_rounding(fmt, n, x)
        if d is not None:
            num = num + np.sum(np.square(d), axis=axes, dtype=np.float64)
    return float(np.max(np.sqrt(num / den)))


def _layer_terms(module: dict, fmt: str) -> list[float]:
    """eps of each rounded group along a module, input to output: affine (kernel, bias), then LayerNorm affine."""
    terms = []
    for name in sorted(module, key=lambda s: int(s.removeprefix("layer"))):
        layer = module[name]
        terms.append(_rel_step(layer, ("kernel", "bias"), fmt))
        if "ln_scale" in layer:
            terms.append(_rel_step(layer, ("ln_scale", "ln_bias"), fmt))
    return terms


def expected_rms(params, fmt: str) -> dict[str, float]:
    """Expected rms relative error of each network output: sqrt(sum of eps^2 / 3) along its path (docstring)."""
    trunk = [_rel_step(params["task_emb"], ("embedding",), fmt)] + _layer_terms(params["encoder"], fmt)
    out = {}
    for k, head in NETWORK_OUTPUTS.items():
        terms = trunk + (_layer_terms(params[head], fmt) if head else [])
        out[k] = float(np.sqrt(np.sum(np.square(terms)) / 3))
    return out


def tail_factor(weights) -> float:
    """T(n) = sqrt(chi2_n(1 - 1e-4) / n) (Wilson-Hilferty) for n_eff = (sum w)^2 / sum w^2 values of weight w.

    The realised rms of n independent zero-mean errors is sqrt(chi2_n / n) times its expectation: 1.06 for 2048
    values (z), 1.19 for 192 (pi raw), 1.70 for 16 (reward). Weights are each value's expected error variance.
    """
    w = np.asarray(weights, np.float64).ravel()
    n = w.sum() ** 2 / np.sum(w * w)
    return float((1 - 2 / (9 * n) + TAIL_Z * np.sqrt(2 / (9 * n))) ** 1.5)


def _forward_fn(model: WorldModel):
    c = model.config

    def pi_raw(m, z, task):
        return m.pi_head(m._with_emb(z, task))  # [mean, raw log-std] before masking and squashing (not public API)

    def fwd(params, obs, action, task, eps):
        P = {"params": params}
        z = model.apply(P, obs, task, method=WorldModel.encode)
        rl = model.apply(P, z, action, task, method=WorldModel.reward)
        ql = model.apply(P, z, action, task, method=WorldModel.Q)
        return {"z": z, "next_z": model.apply(P, z, action, task, method=WorldModel.next),
                "reward_logits": rl, "reward": tm.two_hot_inv(rl, c.num_bins, c.vmin, c.vmax),
                "q_logits": ql, "q": tm.two_hot_inv(ql, c.num_bins, c.vmin, c.vmax),
                "pi_raw": model.apply(P, z, task, method=pi_raw),
                "pi_action": model.apply(P, z, task, eps, method=WorldModel.pi)[0]}

    return jax.jit(fwd)


def _two_hot_sensitivity(logits, c):
    """Per-sample size of the decoded value's change when the logits move by their own rms in a generic direction.

    v = symexp(m), m = sum_i p_i b_i with p = softmax(l): dv = e^|m| sum_i p_i (b_i - m) dl_i, so a logit error
    with rms r per bin uncorrelated with g = p (b - m) changes v by e^|m| |g| r on average.
    """
    l = np.asarray(logits, np.float64)
    p = np.exp(l - l.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    b = np.linspace(c.vmin, c.vmax, c.num_bins)
    m = (p * b).sum(-1, keepdims=True)
    return np.exp(np.abs(m[..., 0])) * np.linalg.norm(p * (b - m), axis=-1) * np.sqrt(np.mean(l * l, -1))


def _pi_sensitivity(raw, eps, mask, c):
    """Same for the action tanh(mask (mean + eps exp(log_std))), log_std = lo + (hi - lo)/2 (tanh(r) + 1).

    d action / d mean = sech^2(x), d action / d r = sech^2(x) eps exp(log_std) (hi - lo)/2 sech^2(r): the raw
    log-std path has gain up to (hi - lo)/2 = 6.
    """
    raw = np.asarray(raw, np.float64)
    mean, r = np.split(raw, 2, axis=-1)
    log_std = c.log_std_min + 0.5 * (c.log_std_max - c.log_std_min) * (np.tanh(r) + 1)
    x = mask * (mean + eps * np.exp(log_std))
    d_r = eps * np.exp(log_std) * 0.5 * (c.log_std_max - c.log_std_min) / np.cosh(r) ** 2
    rms = np.sqrt(np.mean(raw * raw, -1, keepdims=True))
    return mask / np.cosh(x) ** 2 * np.sqrt(1 + d_r**2) * rms


def forward_errors(model, fwd, ref, io, params_fp32, transformed, fmt) -> dict[str, tuple[float, float]]:
    """``{output: (error, bound)}`` of ``transformed`` params (float32 compute) against float32 ``ref`` outputs.

    The one criterion every positive and negative test here uses. Network outputs: relative L2 error over the batch
    against K x their expected rms relative error. Decoded outputs (reward, Q, pi action): L2 error over the batch
    in units of the decoding's first-order sensitivity against K x the expected rms error of the network output
    they decode. Reason: a decoded value can be near 0 by accident (a projection of near-uniform logits on the
    bin axis), which makes its plain relative error a ratio of two small random numbers.
    """
    c = model.config
    out = {k: np.asarray(v, np.float64) for k, v in fwd(transformed, *io).items()}
    rms = expected_rms(params_fp32, fmt)
    mask = action_masks(c.task_set)[np.asarray(io[2])]
    scale = {"reward": _two_hot_sensitivity(ref["reward_logits"], c),
             "q": _two_hot_sensitivity(ref["q_logits"], c),
             "pi_action": _pi_sensitivity(ref["pi_raw"], np.asarray(io[3], np.float64), mask, c)}
    res = {}
    # network outputs: relative L2 error, independent of the output's scale; T's weights are the values^2 (the errors
    # follow the values, and a few dominant values mean fewer effective ones and a wider T)
    for k in NETWORK_OUTPUTS:
        res[k] = (float(np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])),
                  K * tail_factor(np.square(ref[k])) * rms[k])
    # decoded outputs: L2 error in units of the first-order sensitivity; the value itself can be near 0 by accident
    for k, src in DECODED_OUTPUTS.items():
        res[k] = (float(np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(scale[k])),
                  K * tail_factor(np.square(scale[k])) * rms[src])
    return res


def _violations(res):
    return {k: (e, b) for k, (e, b) in res.items() if not e <= b}


def _report(label, fmt, res):
    worst = max(res, key=lambda k: res[k][0] / res[k][1])
    print(f"{label} {fmt}: worst {worst} {res[worst][0] / res[worst][1]:.2f}; "
          + " ".join(f"{k} {e:.2e}/{b:.2e}" for k, (e, b) in res.items()))


def _reference_inputs(cfg, seed: int):
    """A batch like the reference io: distinct tasks, obs N(0,1) and actions U(-1,1) zero beyond each task's dims."""
    ts = get_task_set(cfg.task_set)
    rng = np.random.default_rng(seed)
    task = rng.choice(ts.num_tasks, BATCH, replace=False)
    obs = rng.standard_normal((BATCH, ts.obs_pad)).astype(np.float32)
    action = rng.uniform(-1, 1, (BATCH, ts.action_pad)).astype(np.float32)
    obs[np.arange(ts.obs_pad) >= np.asarray(ts.obs_dims)[task][:, None]] = 0
    action[np.arange(ts.action_pad) >= np.asarray(ts.action_dims)[task][:, None]] = 0
    eps = rng.standard_normal((BATCH, ts.action_pad)).astype(np.float32)
    return obs, action, task.astype(np.int32), eps


def _recipe_params(model, seed: int):
    """The reference recipe on a fresh model: official init (seeded), then + N(0, 0.02^2) on every learnable leaf."""
    p = jax.jit(lambda k: init_params(model, k))(jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def perturb(x):
        return np.asarray(x) + np.float32(NOISE_STD) * rng.standard_normal(x.shape, np.float32)

    return jax.tree_util.tree_map(perturb, p)


class _Setup:
    """Model, float32 params, inputs, the jitted forward and the float32 reference outputs of one model."""

    def __init__(self, model, params, io, label):
        self.model, self.params, self.io, self.label = model, params, io, label
        self.fwd = _forward_fn(model)
        self.ref = {k: np.asarray(v, np.float64) for k, v in self.fwd(params, *io).items()}

    def errors(self, transformed, fmt):
        return forward_errors(self.model, self.fwd, self.ref, self.io, self.params, transformed, fmt)


def _shared_setup(name):
    _, io = load_case(name)
    ck = load_tdmpc2_checkpoint(reference_dir() / f"wm_{name}.pt")
    inputs = (io["obs"], io["action"], io["task"].astype(np.int32), io["pi_eps_raw"])
    s = _Setup(make_world_model(ck.config), ck.params, inputs, name)
    # the official fp32 outputs are what our fp32 forward reproduces (tested in tests/nn)
    np.testing.assert_allclose(s.ref["z"], io["z"], atol=1e-5)
    return s


def _random_setup(task_set, size, seed=0):
    cfg = get_model_config(size, task_set)
    model = make_world_model(cfg)
    return _Setup(model, _recipe_params(model, seed), _reference_inputs(cfg, 1000 + seed),
                  f"random {task_set} size {size} seed {seed}")


def _check_formats(s, formats=FORMATS):
    failures = {}
    for fmt in formats:
        res = s.errors(transforms.to_compute(transforms.transform(s.params, fmt)), fmt)
        _report(s.label, fmt, res)
        failures.update({(fmt, k): v for k, v in _violations(res).items()})
        # every output changed: the transform really rounded the weights on every path
        failures.update({(fmt, k, "unchanged"): v for k, v in res.items() if not v[0] > 0})
    assert not failures, failures


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("name", CASES)
def test_forward_within_tolerance_of_fp32(name, dtype):
    _check_formats(_shared_setup(name), [dtype])


# every size, one model at a time (the 317M one is 1.3 GB in float32); 48 and 317 take ~5-15 s and ~50-70 s on 2 cores
RANDOM_MODELS = [("mt30", 1), ("mt80", 1), ("mt30", 5), ("mt30", 19), ("mt30", 48),
                 pytest.param("mt30", 317, marks=pytest.mark.slow)]  # 317M: ~1.3 GB of weights, ~50-70 s


@pytest.mark.parametrize("task_set,size", RANDOM_MODELS)
def test_forward_of_random_models_within_bounds(task_set, size):
    _check_formats(_random_setup(task_set, size))  # all formats on one build: the 317M model takes ~25 s to make


# --- wrong transforms: each must fail the same check --------------------------------------------------------------


def _int8_wrong(params, wrong_scale=None, input_axis_if_square=False):
    """int8 round trip with a wrong dequantisation: ``wrong_scale(path, scale)`` replaces each kernel's scales."""
    q = transforms.quantize_int8(params)

    def go(tree, path=()):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = go(v, path + (k,))
            elif k == "kernel_int8":
                scale = np.asarray(tree["kernel_scale"], np.float32)
                if wrong_scale is not None:
                    scale = wrong_scale(path, scale)
                if input_axis_if_square and v.shape[-1] == v.shape[-2]:
                    out["kernel"] = v.astype(np.float32) * scale[..., :, None]  # one scale per input row
                else:
                    out["kernel"] = v.astype(np.float32) * scale[..., None, :]
            elif k != "kernel_scale":
                out[k] = np.asarray(v)
        return out

    return go(q)


def _fp16_with_transposed_square_kernel(params):
    p = transforms.to_compute(transforms.transform(params, "float16"))
    k = p["dynamics"]["layer1"]["kernel"]
    assert k.shape[0] == k.shape[1]
    p["dynamics"]["layer1"]["kernel"] = np.ascontiguousarray(k.T)  # a torch [out, in] layout kept by mistake
    return p


WRONG_TRANSFORMS = {
    # (a) int8 scale missing: kernel = q
    "int8_scale_missing": ("int8", lambda p: _int8_wrong(p, lambda path, s: np.ones_like(s))),
    # (b) int8 scale on the wrong channel: rolled by one output channel ...
    "int8_scale_rolled": ("int8", lambda p: _int8_wrong(p, lambda path, s: np.roll(s, 1, axis=-1))),
    # ... applied along the input axis of the square kernels ...
    "int8_scale_on_input_axis": ("int8", lambda p: _int8_wrong(p, input_axis_if_square=True)),
    # ... or the first ensemble member's scales used for every Q head (and the right ones elsewhere)
    "int8_scale_of_member0": ("int8", lambda p: _int8_wrong(
        p, lambda path, s: np.broadcast_to(s[:1], s.shape) if path[0] == "Qs" else s)),
    # (c) float16 requested, bfloat16 rounding delivered (8x coarser): a dtype-name mix-up
    "float16_as_bfloat16": ("float16", lambda p: transforms.to_compute(transforms.cast_params(p, "bfloat16"))),
    # (c) float16 cast with one square kernel transposed
    "float16_transposed_kernel": ("float16", _fp16_with_transposed_square_kernel),
}


@pytest.fixture(scope="module", params=["shared", "random"])
def size1_setup(request):
    if request.param == "shared":
        if not CASES:
            pytest.skip(f"no world-model reference files in {reference_dir()}")
        return _shared_setup(CASES[0])
    return _random_setup("mt30", 1)


@pytest.mark.parametrize("wrong", list(WRONG_TRANSFORMS))
def test_wrong_transforms_fail_the_check(size1_setup, wrong):
    fmt, fn = WRONG_TRANSFORMS[wrong]
    res = size1_setup.errors(fn(size1_setup.params), fmt)
    _report(f"{size1_setup.label} WRONG {wrong}", fmt, res)
    assert _violations(res), res


def test_wrong_transform_harness_without_the_fault_passes(size1_setup):
    # control: the same dequantisation code with the right scales passes, so the failures above come from the faults
    res = size1_setup.errors(_int8_wrong(size1_setup.params), "int8")
    assert not _violations(res), res


def test_expected_rms_follows_the_format_step_and_depth():
    # float casts: every group moves by u relative (no value of the recipe is subnormal enough to matter), so
    # E = u sqrt(groups / 3); groups = embedding + 2 per hidden/SimNorm layer + 1 per plain output layer
    cfg = get_model_config(1, "mt30")
    params = _recipe_params(make_world_model(cfg), 0)
    for fmt, u in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        e = expected_rms(params, fmt)
        groups = {"z": 1 + 2 * 2, "next_z": 1 + 2 * 2 + 2 * 3, "reward_logits": 1 + 2 * 2 + 2 * 2 + 1}
        for k, n in groups.items():
            np.testing.assert_allclose(e[k], u * np.sqrt(n / 3), rtol=1e-3)
    # int8: one step per output channel, s_c = max|w_c| / 127, rounding by <= s_c / 2; only kernels are rounded
    eps = []
    for layer in params["encoder"].values():
        w, b = layer["kernel"].astype(np.float64), layer["bias"].astype(np.float64)
        eps.append(np.sqrt(w.shape[0] * np.sum((np.abs(w).max(0) / 254) ** 2) / (np.sum(w**2) + np.sum(b**2))))
    np.testing.assert_allclose(expected_rms(params, "int8")["z"], np.sqrt(np.sum(np.square(eps)) / 3), rtol=1e-5)
    assert tail_factor(np.ones(16)) == pytest.approx(1.70, abs=0.01)  # 16 equal values
    assert tail_factor(np.ones(2048)) == pytest.approx(1.06, abs=0.01)
