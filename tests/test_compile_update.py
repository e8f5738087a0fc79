"""benchmarks/compile_update.py: its 'flat' variant does the library optimisers' arithmetic; bad input is refused."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import compile_update
from mtdistill_jax.configs import get_config
from mtdistill_jax.tdmpc2.train import make_optimizers


def _tree(key):
    k = jax.random.split(key, 4)
    return {"encoder": {"w": jax.random.normal(k[0], (8, 5)), "b": jax.random.normal(k[1], (5,))},
            "dynamics": {"w": jax.random.normal(k[2], (5, 3))},
            "task_emb": {"embedding": jax.random.normal(k[3], (4, 2))}}


def test_flat_optimizers_step_like_the_library_ones():
    config = get_config(1, "mt30")
    config.train.grad_clip_norm = 0.5  # small, so clipping is active in the steps below
    params = _tree(jax.random.key(0))
    pairs = zip(make_optimizers(config), compile_update.flat_optimizers(config), ("world model", "policy"), strict=True)
    for tree_opt, flat_opt, name in pairs:
        p_tree = p_flat = params
        s_tree, s_flat = tree_opt.init(params), flat_opt.init(params)
        for i in range(3):
            grads = jax.tree_util.tree_map(lambda x, i=i: x * (i + 1.0), _tree(jax.random.key(i + 1)))
            u_tree, s_tree = tree_opt.update(grads, s_tree, p_tree)
            u_flat, s_flat = flat_opt.update(grads, s_flat, p_flat)
            p_tree, p_flat = optax.apply_updates(p_tree, u_tree), optax.apply_updates(p_flat, u_flat)
        for a, b in zip(jax.tree_util.tree_leaves(p_tree), jax.tree_util.tree_leaves(p_flat), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        if name == "world model":  # Adam steps ~lr per element: the encoder's scaled by enc_lr_scale
            moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), p_flat, params)
            ratio = moved["encoder"]["w"] / moved["dynamics"]["w"]
            assert ratio == pytest.approx(config.train.enc_lr_scale, rel=0.2), ratio


@pytest.mark.parametrize("argv, msg", [(["--variants=tree,bogus"], "unknown ['bogus']"),
                                       (["--repeats=0"], "must be >= 1")])
def test_bad_arguments_exit_with_a_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        compile_update.main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_compile_phases_reads_a_real_compile_trace(tmp_path):
    """The phases --phases prints are found in a jax.profiler trace of an XLA:CPU compile (names as jax emits them)."""
    x = jnp.arange(64.0)
    salt = float(time.time_ns() % 1_000_003)  # a constant no earlier run compiled: no persistent-cache hit
    lowered = jax.jit(lambda v: jnp.tanh(v * 3.0) + jnp.exp(-v) + salt).lower(x)
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    try:
        lowered.compile()
    finally:
        jax.profiler.stop_trace()
    phases = {phase: (sec, n) for phase, sec, n in compile_update.compile_phases(str(tmp_path))}
    assert list(phases) == [phase for phase, _ in compile_update.PHASES]
    if jax.default_backend() == "cpu":
        for phase in phases:
            sec, n = phases[phase]
            assert n >= 1 and sec > 0, (phase, phases)


def test_compile_phases_without_a_trace_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="no perfetto trace"):
        compile_update.compile_phases(str(tmp_path))


def test_ln_autodiff_variant_differentiates_the_same_normalisation():
    """The 'ln_autodiff' variant swaps layers.normalize_rows for autodiff of its forward: same values, same
    gradients within float32 round-off, so the variants differ in the program only."""
    from mtdistill_jax.nn import layers

    kx, kg = jax.random.split(jax.random.key(3))
    x = 2.0 + 3.0 * jax.random.normal(kx, (2, 9, 384))
    g = jax.random.normal(kg, x.shape)
    y, vjp = jax.vjp(lambda v: layers.normalize_rows(v, 1e-5), x)
    y_ad, vjp_ad = jax.vjp(lambda v: compile_update.normalize_rows_by_autodiff(v, 1e-5), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ad), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(vjp_ad(g)[0]), rtol=1e-4, atol=1e-5)
