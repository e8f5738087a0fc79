"""Importer of official TD-MPC2 checkpoints: formats, dtypes, inference of size/task set, clear errors."""

import numpy as np
import pytest
from refdata import reference_dir

from mtdistill_jax.checkpoint.tdmpc2_torch import (
    CheckpointMismatchError,
    load_tdmpc2_checkpoint,
    state_dict_to_params,
)
from mtdistill_jax.checkpoint.torch_pickle import load_pt
from mtdistill_jax.nn import count_params

REF = reference_dir()


def _need(name):
    p = REF / name
    if not p.is_file():
        pytest.skip(f"no {p}")
    return p


def test_current_and_release_formats_give_identical_params():
    a = load_tdmpc2_checkpoint(_need("wm_mt30_size1_seed0.pt"))
    b = load_tdmpc2_checkpoint(_need("wm_mt30_size1_seed0_release.pt"))
    assert (a.key_format, b.key_format) == ("current", "release")
    flat_a = {str(k): v for k, v in _flatten(a.params)}
    flat_b = {str(k): v for k, v in _flatten(b.params)}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k])
    for (_, x), (_, y) in zip(_flatten(a.target_q_params), _flatten(b.target_q_params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_paper_student_fp16_release_format():
    imp = load_tdmpc2_checkpoint(_need("paper_student_fp16.pt"))
    assert imp.key_format == "release" and imp.source_dtype == "float16"
    assert imp.config.task_set == "mt30" and imp.config.model_size == 1 and imp.config.task_dim == 96
    assert count_params(imp.params) == 1_426_427
    assert count_params(imp.params) + count_params(imp.target_q_params) == 1_980_357
    assert all(x.dtype == np.float32 for _, x in _flatten(imp.params))
    raw = load_pt(REF / "paper_student_fp16.pt")["model"]
    # exact: fp16 -> fp32 is lossless, and kernels are the transposed torch weights
    np.testing.assert_array_equal(imp.params["encoder"]["layer0"]["kernel"],
                                  raw["_encoder.state.0.weight"].astype(np.float32).T)
    kept = load_tdmpc2_checkpoint(REF / "paper_student_fp16.pt", dtype=None)
    assert kept.params["encoder"]["layer0"]["kernel"].dtype == np.float16


def test_explicit_size_must_fit():
    p = _need("wm_mt30_size1_seed0.pt")
    imp = load_tdmpc2_checkpoint(p, model_size=1, task_set="mt30")
    assert imp.config.model_size == 1
    with pytest.raises(CheckpointMismatchError, match=r"_encoder\.state\.0\.weight.*expected \[256, 88\]"):
        load_tdmpc2_checkpoint(p, model_size=5, task_set="mt30")
    with pytest.raises(ValueError, match="both"):
        load_tdmpc2_checkpoint(p, model_size=1)


@pytest.fixture(scope="module")
def state_dict():
    return dict(load_pt(_need("wm_mt30_size1_seed0_release.pt"))["model"])


def test_missing_key_is_named(state_dict):
    sd = dict(state_dict)
    del sd["_reward.1.ln.weight"]
    msg = r"missing key '_reward\.1\.ln\.weight' \(expected shape \[384\]\)"
    with pytest.raises(CheckpointMismatchError, match=msg):
        state_dict_to_params(sd)


def test_wrong_shape_is_named(state_dict):
    sd = dict(state_dict)
    sd["_pi.2.weight"] = np.zeros((10, 384), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"'_pi\.2\.weight' has shape \[10, 384\], expected \[12, 384\]"):
        state_dict_to_params(sd)


def test_shapes_that_fit_no_size(state_dict):
    sd = dict(state_dict)
    sd["_dynamics.0.weight"] = np.zeros((100, 230), np.float32)
    with pytest.raises(CheckpointMismatchError, match="fit no official model size"):
        state_dict_to_params(sd)
    sd = dict(state_dict)
    sd["_task_emb.weight"] = np.zeros((7, 96), np.float32)
    with pytest.raises(CheckpointMismatchError, match="7 rows"):
        state_dict_to_params(sd)
    with pytest.raises(CheckpointMismatchError, match="no Q-ensemble keys"):
        state_dict_to_params({k: v for k, v in state_dict.items() if "Qs" not in k})


def test_missing_target_is_reported(state_dict):
    sd = {k: v for k, v in state_dict.items() if not k.startswith("_target_Qs")}
    imp = state_dict_to_params(sd)
    assert imp.target_q_params is None and imp.notes


def _flatten(tree, prefix=()):
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), np.asarray(v)
