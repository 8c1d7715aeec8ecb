"""onnxruntime-specific fusions (-O3): what fires, what is refused and why, and that values hold.

Every rewrite is checked with the reference interpreter and with onnxruntime (its own
optimizer disabled, so ORT cannot hide a bug), against the same graph at -O2.
"""
import numpy as np
import onnx
import pytest

from model_harness import run_numpy, run_onnx
from tgraph.api import build as api_build
from tgraph.codegen.onnx import to_onnx
from tgraph.ir import Builder, DType, TensorType
from tgraph.ir.contrib import ORT_SKIP_NORM_EPSILON
from tgraph.ir.evaluate import evaluate
from tgraph.passes import get_pass, level_pipeline, optimize

RNG = np.random.default_rng(11)
H = 8


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 0.5


def residual_block(norm="LayerNormalization", shape=(2, 5, H), bias=True, axis=-1, norm_bias=True,
                   other_shape=None):
    """x + (a @ W [+ b]) -> norm; the sum is also read by a second residual (pre-LN blocks)."""
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float32, shape))
    a = g.add_input("a", TensorType(DType.float32, other_shape or shape))
    proj = b.op("MatMul", a, b.const(w(H, H)))
    if bias:
        proj = b.op("Add", proj, b.const(w(H)))
    h = b.op("Add", x, proj)
    gamma = b.const(w(H) + 1)
    if norm == "LayerNormalization":
        ins = [h, gamma] + ([b.const(w(H))] if norm_bias else [])
        y = b.op(norm, *ins, axis=axis, epsilon=1e-5)
    else:
        y = b.op(norm, h, gamma, axis=axis, epsilon=1e-6)
    out = b.op("Add", h, b.op("MatMul", y, b.const(w(H, H))))
    g.outputs = [out, y]
    g.verify()
    return g


def feeds(g):
    return {v.name: RNG.standard_normal([d if isinstance(d, int) else 3 for d in v.shape]).astype(np.float32)
            for v in g.inputs}


def check_same(before, after, inputs, tol=1e-5):
    ref = evaluate(before, inputs)
    got = evaluate(after, inputs)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=tol, atol=tol, err_msg=f"interpreter {k}")
    ort_ref, ort_got = run_onnx(before, inputs), run_onnx(after, inputs)
    for k in ort_ref:
        np.testing.assert_allclose(ort_got[k], ort_ref[k], rtol=tol, atol=tol, err_msg=f"onnxruntime {k}")


@pytest.mark.parametrize("norm,bias,norm_bias", [
    ("LayerNormalization", True, True), ("LayerNormalization", False, True), ("LayerNormalization", True, False),
    ("RMSNormalization", True, None), ("RMSNormalization", False, None)])
def test_skip_norm_fuses_residual_add_and_keeps_the_sum(norm, bias, norm_bias):
    g = residual_block(norm, bias=bias, norm_bias=bool(norm_bias))
    before = g.copy()
    counts = get_pass("fuse-skip-layer-norm")()(g)
    g.verify()
    fused = "SkipLayerNormalization" if norm == "LayerNormalization" else "SkipSimplifiedLayerNormalization"
    hist = g.op_histogram()
    assert hist.get(f"com.microsoft.{fused}") == 1 and norm not in hist
    assert hist.get("Add") == 1                     # only the second residual is left
    rule = "skip-layer-norm" if norm == "LayerNormalization" else "skip-rms-norm"
    assert counts == {"skip-layer-norm": 0, "skip-rms-norm": 0, rule: 1}
    node = next(n for n in g.nodes if n.domain == "com.microsoft")
    bias_input = 4 if norm == "LayerNormalization" else 3          # the folded projection bias
    assert (len(node.inputs) > bias_input and node.inputs[bias_input] is not None) == bias
    assert node.attrs["epsilon"] == (1e-5 if norm == "LayerNormalization" else 1e-6)
    assert node.outputs[1].users, "the residual sum feeds the next residual connection"
    check_same(before, g, feeds(g))


def test_skip_norm_epsilon_is_written_explicitly():
    """onnxruntime's default epsilon is 1e-12; LayerNormalization's is 1e-5: always write it."""
    g = residual_block()
    get_pass("fuse-skip-layer-norm")()(g)
    model = to_onnx(g)
    (node,) = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    eps = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["epsilon"]
    assert eps == pytest.approx(1e-5) and eps != pytest.approx(ORT_SKIP_NORM_EPSILON)
    assert node.domain == "com.microsoft" and len(node.output) == 4 and node.output[1:3] == ["", ""]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("com.microsoft", 1)}


def test_skip_norm_leaves_out_an_unread_sum():
    b = Builder()
    g = b.graph
    x, s = (g.add_input(n, TensorType(DType.float32, (2, 3, H))) for n in "xs")
    g.outputs = [b.op("LayerNormalization", b.op("Add", x, s), b.const(w(H)), epsilon=1e-5)]
    before = g.copy()
    get_pass("fuse-skip-layer-norm")()(g)
    (node,) = [n for n in to_onnx(g).graph.node]
    assert node.op_type == "SkipLayerNormalization" and list(node.output[1:]) == []
    check_same(before, g, feeds(g))


@pytest.mark.parametrize("kwargs,reason", [
    (dict(shape=(2, 5, H), other_shape=(5, H)), "Add broadcasts"),
    (dict(shape=(2, 2, 5, H)), "input rank 4"),
    (dict(axis=1), "not normalised over the last axis"),
])
def test_skip_norm_refusals(kwargs, reason):
    g = residual_block(**kwargs)
    p = get_pass("fuse-skip-layer-norm")()
    assert not any(p(g).values())
    assert any(reason in m.reason and m.rule == "skip-layer-norm" for m in p.near_misses)


def test_skip_norm_refuses_a_computed_gamma():
    b = Builder()
    g = b.graph
    x, s = (g.add_input(n, TensorType(DType.float32, (2, 3, H))) for n in "xs")
    gamma = g.add_input("gamma", TensorType(DType.float32, (H,)))
    g.outputs = [b.op("LayerNormalization", b.op("Add", x, s), gamma)]
    p = get_pass("fuse-skip-layer-norm")()
    assert p(g) == {"skip-layer-norm": 0, "skip-rms-norm": 0}
    assert any("gamma gamma is not a constant vector" in m.reason for m in p.near_misses), p.near_misses


def qkv_graph(bias=(True, True, True), shared_weight=False):
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float32, ("batch", "seq", H)))
    outs = []
    wq = b.const(w(H, H))
    for i, has_bias in enumerate(bias):
        weight = wq if (shared_weight and i == 0) else b.const(w(H, 4 if i else H))
        y = b.op("MatMul", x, weight)
        outs.append(b.op("Add", y, b.const(w(y.shape[-1]))) if has_bias else y)
    if shared_weight:
        outs.append(b.op("MatMul", outs[0], wq))     # the Q weight is read twice: not packable
    g.outputs = outs
    g.verify()
    return g


@pytest.mark.parametrize("bias", [(True, True, True), (False, False, False), (True, False, True)])
def test_packed_qkv(bias):
    g = qkv_graph(bias)
    before = g.copy()
    assert get_pass("fuse-packed-qkv")()(g) == {"packed": 1}
    g.verify()
    hist = g.op_histogram()
    assert hist["MatMul"] == 1 and hist["Split"] == 1
    assert hist.get("Add", 0) == (1 if all(bias) else sum(bias))
    split = next(n for n in g.nodes if n.op == "Split")
    assert split.attrs["split"] == [H, 4, 4]
    check_same(before, g, feeds(g))


def test_packed_qkv_leaves_shared_weights_alone():
    g = qkv_graph(shared_weight=True)
    assert get_pass("fuse-packed-qkv")()(g) == {"packed": 1}   # K and V only
    split = next(n for n in g.nodes if n.op == "Split")
    assert split.attrs["split"] == [4, 4]


def test_o3_packs_projections_but_leaves_skip_norms_to_be_asked_for():
    """The levels follow the benchmark: packed QKV helped on ORT CPU, skip norms did not."""
    assert "fuse-packed-qkv" in level_pipeline(3) and "fuse-packed-qkv" not in level_pipeline(2)
    assert "fuse-skip-layer-norm" not in level_pipeline(3)


@pytest.mark.parametrize("family,overrides", [
    ("gpt2", {"n_layer": "2", "n_embd": "32", "n_head": "4", "vocab_size": "50", "n_positions": "16"}),
    ("llama", {"num_layers": "2", "d_model": "32", "num_heads": "4", "num_kv_heads": "2", "d_ff": "48",
               "vocab_size": "50"}),
])
def test_ort_fusions_match_o2_on_models(family, overrides):
    g2 = api_build(family, overrides, level=2).graph
    g3 = api_build(family, overrides, level=3).graph
    everything = ",".join(level_pipeline(2) + ["fuse-skip-layer-norm", "fuse-packed-qkv", "dce"])
    gall = api_build(family, overrides, pipeline=everything).graph
    assert g3.op_histogram()["MatMul"] < g2.op_histogram()["MatMul"]          # projections packed
    assert any(k.startswith("com.microsoft.Skip") for k in gall.op_histogram()), gall.op_histogram()
    inputs = {v.name: (RNG.integers(0, 50, (2, 6)) if v.name == "input_ids" else np.ones((2, 6), np.int64))
              for v in g2.inputs}
    ref = run_onnx(g2, inputs)
    for g in (g3, gall):
        for name, got in run_onnx(g, inputs).items():
            np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-4)
        for name, got in run_numpy(g, inputs).items():
            np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-4)


def test_skip_norm_sum_read_before_the_norm_and_as_an_output():
    """The sum's other users may come before the norm (and it may be a graph output): the
    fused op is built before the residual Add, the first node whose value it replaces."""
    b = Builder()
    g = b.graph
    x, s = (g.add_input(n, TensorType(DType.float32, (2, 3, H))) for n in "xs")
    h = b.op("Add", x, s)
    early = b.op("Relu", h)                               # reads the sum before the norm exists
    y = b.op("LayerNormalization", h, b.const(w(H)), b.const(w(H)), epsilon=1e-5)
    g.outputs = [b.op("Add", y, early), h]
    g.verify()
    before = g.copy()
    assert get_pass("fuse-skip-layer-norm")()(g)["skip-layer-norm"] == 1
    g.verify()
    assert "Add" in g.op_histogram() and g.op_histogram()["com.microsoft.SkipLayerNormalization"] == 1
    assert g.outputs[1].name == "add" and g.outputs[1].producer.op == "SkipLayerNormalization"
    check_same(before, g, feeds(g))
