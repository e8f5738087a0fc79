"""benchmarks/compile_update.py: its 'flat' variant does the library optimisers' arithmetic; bad input is refused
(here and by benchmarks/update_step.py)."""

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


@pytest.mark.parametrize("argv, msg", [(["--narrow_grads=kept,bogus"], "--narrow_grads: kept and/or folded"),
                                       (["--task_emb_policy_grad=tail"], "--task_emb_policy_grad: release and/or head"),
                                       (["--repeats=0"], "--repeats >= 1")])
def test_update_step_bad_arguments_exit_with_a_message(argv, msg, capsys):
    from benchmarks import update_step
    with pytest.raises(SystemExit) as e:
        update_step.main(argv)
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


# Two fusions of one shape that differ in their reduction only (add vs max), and a third equal to the first up to
# names and metadata; the entry computation calls all three.
_HLO = """HloModule m

%add_a (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%add_b (p: f32[], q: f32[]) -> f32[] {
  %p = f32[] parameter(0)
  %q = f32[] parameter(1)
  ROOT %t = f32[] add(%p, %q), metadata={op_name="other"}
}

%max_c (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %m = f32[] maximum(%x, %y)
}

%fused_1 (param_0: f32[8,4]) -> f32[8] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%param_0, %c), dimensions={1}, to_apply=%add_a, metadata={op_name="a"}
}

%fused_2 (param_0.1: f32[8,4]) -> f32[8] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  %c.1 = f32[] constant(0)
  ROOT %r.1 = f32[8]{0} reduce(%param_0.1, %c.1), dimensions={1}, to_apply=%add_b, metadata={op_name="b"}
}

%fused_3 (param_0.2: f32[8,4]) -> f32[8] {
  %param_0.2 = f32[8,4]{1,0} parameter(0)
  %c.2 = f32[] constant(0)
  ROOT %r.2 = f32[8]{0} reduce(%param_0.2, %c.2), dimensions={1}, to_apply=%max_c
}

ENTRY %main (a: f32[8,4], b: f32[8,4]) -> (f32[8], f32[8], f32[8]) {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[8,4]{1,0} parameter(1)
  %f1 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_1
  %f2 = f32[8]{0} fusion(%b), kind=kLoop, calls=%fused_2, metadata={op_name="jit(f)/reduce_sum"}
  %f3 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_3
  ROOT %t = (f32[8]{0}, f32[8]{0}, f32[8]{0}) tuple(%f1, %f2, %f3)
}
"""


def test_fused_kernels_counts_fusions_equal_up_to_names_once():
    """fused_kernels: names and metadata do not make a kernel, a called reduction's body does."""
    from benchmarks.common import fused_kernels

    assert fused_kernels(_HLO) == (3, 2)
    with pytest.raises(ValueError, match="fused_3"):
        fused_kernels(_HLO.replace("%fused_3 (", "%gone (", 1))


def test_kernel_reuse_finds_one_kernel_for_same_shape_chains(capsys):
    """benchmarks/kernel_reuse.py on a real XLA compile: chains of one shape are one kernel, emitted once;
    chains of three shapes are three (what fused_kernels counts is what the fusion emitter emits)."""
    from benchmarks import kernel_reuse

    kernel_reuse.main(["--chains=3", "--repeats=1"])
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:]
            for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("one shape", "N shapes"))}
    fusions, kernels, emitted = (int(v) for v in rows["one shape"][:3])
    assert (fusions, kernels) == (3, 1)
    assert int(rows["N shapes"][0]) == 3 and int(rows["N shapes"][1]) == 3
    if jax.default_backend() == "cpu":
        assert emitted == 1 and int(rows["N shapes"][2]) == 3


def test_kernel_reuse_bad_arguments_exit_with_a_message(capsys):
    from benchmarks import kernel_reuse

    with pytest.raises(SystemExit) as e:
        kernel_reuse.main(["--chains=1"])
    assert e.value.code == 2 and "--chains must be >= 2" in capsys.readouterr().err


@pytest.mark.parametrize("op_name, source", [
    ("jit(update)/jvp(WorldModel.Q)/Qs/layer0/add", "Q, forward"),
    ("jit(update)/transpose(jvp(WorldModel.encode))/encoder/layer1/mul", "encode, backward"),
    ("jit(update)/transpose(jvp())/while/body/closed_call/WorldModel.next/dynamics", "next, backward"),
    ("jit(update)/jvp()/reduce_sum", "other code, forward"),
    ("jit(update)/add", "other code, no gradient"),
    ("jit(update)/jit(_normal)/jit(_normal_real)/erf_inv", "random draws"),
    ("jit(update)/jit(_shuffle)/jit(_threefry_split)/while/body/add", "random draws"),
    ("", "made by XLA")])
def test_kernel_source_names_module_and_pass(op_name, source):
    from benchmarks.common import kernel_source

    assert kernel_source(op_name) == source


def test_kernels_by_source_counts_each_kernel_once_under_its_first_fusion():
    from benchmarks.common import kernels_by_source

    assert kernels_by_source(_HLO) == {"made by XLA": 2}  # f1 (no op_name) is first of its kernel, f3 has none
    named = _HLO.replace("calls=%fused_1", 'calls=%fused_1, metadata={op_name="jit(f)/jvp(WorldModel.pi)/x"}')
    assert kernels_by_source(named) == {"made by XLA": 1, "pi, forward": 1}


def test_step_profile_attributes_a_programs_time_to_its_dots_and_fusions():
    """step_profile on a real XLA:CPU execution: the matmul and the elementwise tail are found as a 'dot' and a
    'fusion' of the code outside any module, their times positive and within the calls' wall time."""
    from benchmarks.common import step_profile

    if jax.default_backend() != "cpu":
        pytest.skip("event names are XLA:CPU's")
    x = jax.random.normal(jax.random.key(0), (256, 256))
    salt = float(time.time_ns() % 1_000_003)
    compiled = jax.jit(lambda a, b: jnp.tanh(a @ b) * jnp.exp(-a) + salt).lower(x, x).compile()
    prof = step_profile(compiled, lambda i: (x, x), steps=3)
    assert prof["by_kind"]["dot"] > 0 and prof["by_kind"]["fusion"] > 0, prof
    assert prof["by_source"][("dot", "other code, no gradient")] == prof["by_kind"]["dot"]
    busy = sum(prof["threads"].values())
    assert busy == pytest.approx(prof["by_kind"]["dot"] + prof["by_kind"]["fusion"], rel=1e-6)
    assert 0 < prof["by_kind"]["dot"] < prof["wall"] * len(prof["threads"])
    # the dot's flops and the fusion's bytes (reads the product and a, writes the result), once per call
    assert prof["dot_flops"] == pytest.approx(2 * 256**3)
    assert list(prof["by_dot_shape"]) == ["[256,256] @ [256,256]"]
    assert prof["by_dot_shape"]["[256,256] @ [256,256]"] == pytest.approx((prof["by_kind"]["dot"], 2 * 256**3))
    assert prof["fusion_bytes"] == pytest.approx(3 * 256 * 256 * 4)
    assert prof["fusion_time"] == pytest.approx(prof["by_kind"]["fusion"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        step_profile(compiled, lambda i: (x, x), steps=0)


_DOTS = """
ENTRY %main (p0: f32[2,768,230], p1: f32[2,230,384]) -> f32[2,768,384] {
  %p0 = f32[2,768,230]{2,1,0} parameter(0)
  %p1 = f32[2,230,384]{2,1,0} parameter(1)
  %dot.1 = f32[2,768,384]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, \
rhs_batch_dims={0}, rhs_contracting_dims={1}
  %dot.2 = f32[230,384]{1,0} dot(f32[768,230]{1,0} %x, f32[768,384]{1,0} %y), lhs_contracting_dims={0}, \
rhs_contracting_dims={0}
  %dot.3 = f32[5,7]{1,0} dot(%unknown, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %f = (f32[4,8]{1,0}, bf16[4]{0}) fusion(%p0, %dot.2), kind=kLoop, calls=%fused_computation.1
  ROOT %g = pred[3]{0} fusion(%f), kind=kLoop, calls=%fused_computation.2
}
"""


def test_dot_table_reads_operand_shapes_from_their_definitions_or_inline():
    """flops = 2 x output elements x contracted elements, batch dims counted once; a dot whose operand shape is
    not in the text is left out rather than guessed."""
    from benchmarks.common import dot_table

    assert dot_table(_DOTS) == {"dot.1": (2.0 * 2 * 768 * 384 * 230, "[2,768,230] @ [2,230,384]"),
                                "dot.2": (2.0 * 230 * 384 * 768, "[768,230] @ [768,384]")}


def test_fusion_bytes_adds_operands_and_results_tuples_and_narrow_types_included():
    from benchmarks.common import fusion_bytes

    f = 4 * 8 * 4 + 4 * 2 + 2 * 768 * 230 * 4 + 230 * 384 * 4  # (f32[4,8], bf16[4]) + p0 + dot.2
    assert fusion_bytes(_DOTS) == {"f": f, "g": 3 + 4 * 8 * 4 + 4 * 2}


_GROUPS = """
ENTRY %main (p0: f32[768,384], p1: f32[384,384]) -> f32[16,16] {
  %p0 = f32[768,384]{1,0} parameter(0)
  %p1 = f32[384,384]{1,0} parameter(1)
  %c = f32[384,1]{1,0} constant({...})
  %mm = f32[768,384]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %mv = f32[768,1]{1,0} dot(%p0, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %q = f32[2,384,12]{2,1,0} parameter(2)
  %e = f32[2,768,384]{2,1,0} parameter(3)
  %nar = f32[2,768,12]{2,1,0} dot(%e, %q), lhs_batch_dims={0}, lhs_contracting_dims={2}, \
rhs_batch_dims={0}, rhs_contracting_dims={1}
  %bmm = f32[2,768,384]{2,1,0} dot(%e, f32[2,384,384]{2,1,0} %w), lhs_batch_dims={0}, lhs_contracting_dims={2}, \
rhs_batch_dims={0}, rhs_contracting_dims={1}
  %s = f32[16,18432]{1,0} bitcast(%p0)
  ROOT %gram = f32[16,16]{1,0} dot(%s, %s), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""


def test_dot_groups_tell_full_matmuls_from_narrow_matrix_vector_and_self_products():
    """Batch dims are not rows: a [2, 768, 384] @ [2, 384, 12] product is narrow (N = 12), [2, 768, 384] @ [2, 384,
    384] a full matmul; a product with a 1-wide column is matrix-vector; squared_norm's Gram product, the same
    array on both sides, is its own group."""
    from benchmarks.common import DOT_GROUPS, dot_groups, dot_table

    groups = dot_groups(_GROUPS)
    assert groups == {"mm": "matmul", "mv": "matrix-vector", "nar": "narrow", "bmm": "matmul",
                      "gram": "x with itself"}
    assert set(dot_table(_GROUPS)) <= set(groups)  # step_profile looks every timed dot up in both
    assert set(groups.values()) <= set(DOT_GROUPS)


def test_step_profile_groups_the_dot_time_by_kind_of_product():
    from benchmarks.common import step_profile
    from mtdistill_jax.nn.layers import squared_norm

    if jax.default_backend() != "cpu":
        pytest.skip("event names are XLA:CPU's")
    x = jax.random.normal(jax.random.key(0), (256, 256))
    salt = float(time.time_ns() % 1_000_003)
    compiled = jax.jit(lambda a, b: squared_norm(a @ b) + salt).lower(x, x).compile()
    prof = step_profile(compiled, lambda i: (x, x), steps=2)
    assert set(prof["by_dot_group"]) == {"matmul", "x with itself"}, prof["by_dot_group"]
    assert prof["by_dot_group"]["matmul"][1] == pytest.approx(2 * 256**3)
    assert sum(s for s, _ in prof["by_dot_group"].values()) == pytest.approx(
        sum(s for s, _ in prof["by_dot_shape"].values()))


def test_split_fusions_reads_xlas_thread_partitions_from_the_backend_config():
    """A fusion XLA:CPU splits across its thread pool carries outer_dimension_partitions (the parts multiply);
    one without it, or any other instruction with it, is not a split fusion."""
    from benchmarks.common import split_fusions

    hlo = """
ENTRY %main (p0: f32[768,384]) -> f32[768,384] {
  %p0 = f32[768,384]{1,0} parameter(0)
  %a = f32[768,384]{1,0} fusion(%p0), kind=kLoop, calls=%f1, backend_config={"outer_dimension_partitions":["2"]}
  %b = f32[768,384]{1,0} fusion(%a), kind=kLoop, calls=%f2, metadata={op_name="jit(f)/x"}
  %c = f32[768,384]{1,0} fusion(%b, %a), kind=kLoop, calls=%f3, backend_config={"outer_dimension_partitions":["2","3"]}
  ROOT %d = f32[768,384]{1,0} copy(%c), backend_config={"outer_dimension_partitions":["2"]}
}
"""
    assert split_fusions(hlo) == {"a": 2, "c": 6}


def test_activation_benchmark_times_every_kernel_on_a_real_activation(capsys):
    from benchmarks import activation

    activation.main(["--rows=256", "--width=128", "--repeats=2"])
    out = capsys.readouterr().out
    rows = {line[:32].strip(): line[32:].split() for line in out.splitlines()[3:]}
    assert set(rows) == set(activation.KERNELS), out
    for us, ns, gbps in rows.values():
        assert float(us) > 0 and float(ns) > 0 and float(gbps) > 0


def test_activation_benchmark_kernels_compute_what_they_name():
    """The exp-replaced Mish differs from the library's only by its exp; the others are what their names say."""
    from benchmarks import activation
    from mtdistill_jax import math as tdmath

    x = jnp.linspace(-4.0, 4.0, 12).reshape(3, 4)
    mean, rstd = jnp.full((3, 1), 0.5), jnp.full((3, 1), 2.0)
    scale, bias = jnp.arange(4.0), jnp.ones(4)
    ln = (x - 0.5) * 2.0 * scale + 1.0
    np.testing.assert_allclose(activation.KERNELS["layer norm"](x, mean, rstd, scale, bias), ln, rtol=1e-6)
    np.testing.assert_allclose(activation.KERNELS["layer norm + mish"](x, mean, rstd, scale, bias), tdmath.mish(ln),
                               rtol=1e-6)
    np.testing.assert_allclose(activation.KERNELS["exp"](x, mean, rstd, scale, bias), jnp.exp(x), rtol=1e-6)
    assert not np.allclose(activation.KERNELS["layer norm + mish, exp replaced"](x, mean, rstd, scale, bias),
                           tdmath.mish(ln))


@pytest.mark.parametrize("argv", [["--rows=0"], ["--width=-1"], ["--repeats=0"]])
def test_activation_benchmark_bad_arguments_exit_with_a_message(argv, capsys):
    from benchmarks import activation

    with pytest.raises(SystemExit) as e:
        activation.main(argv)
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_concat_norm_variant_takes_the_same_global_norm():
    from mtdistill_jax.tdmpc2.train import global_norm

    tree = {"a": jax.random.normal(jax.random.key(0), (384, 384)), "b": jnp.arange(7.0), "c": {"d": jnp.ones((2, 3))}}
    np.testing.assert_allclose(compile_update.concatenated_global_norm(tree), global_norm(tree), rtol=1e-6)
