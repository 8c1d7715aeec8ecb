"""More graphs tgraph did not write: do they fuse *fully* at -O2 (tgraph issue 11, item 5)?

tests/test_foreign_graphs.py covers fp32 GPT-2/LLaMA/BERT from the legacy exporter (opsets
14, 17) and the dynamo one (opset 18). Here: the dynamo exporter at opset 23 (which writes
Attention, RMSNormalization, RotaryEmbedding itself), fp16 models (real Casts to fp32 inside
RMSNorm and softmax), GPT-J (interleaved rotary, `rotate_every_two`), T5 (encoder-decoder,
relative position bias, no attention scale), and hand-built spellings of rotary and of the
softmax scale. Each export is made once per session (they are the slow part).

"Fuses fully" is asserted op by op: every attention block -> Attention, every norm ->
LayerNormalization/RMSNormalization, GELU -> Gelu, rotary -> RotaryEmbedding, and none of the
ops those are written with left over. Values are a separate test: onnxruntime (optimizer
off) on tgraph's -O2 re-export against the exported model, same inputs, padded rows included.
A failing case prints the fusion's near misses (`optimize(...).near_misses()`), which name
the rule and the node where it gave up.
"""
import math
from typing import NamedTuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_foreign_graphs import EXPECT, HEADS, HIDDEN, KV_HEADS, LAYERS, LEFTOVERS, _attention_onnx, _feeds, ort_run
from tgraph.codegen.onnx import to_onnx
from tgraph.onnx_import import import_onnx
from tgraph.passes import optimize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import foreign_exports  # noqa: E402  (needs torch and transformers)


class Case(NamedTuple):
    kind: str           # gpt2 | llama | gptj | t5
    impl: str           # HF attention implementation: eager | sdpa
    dtype: str          # fp32 | fp16 (model.half() before export)
    exporter: str       # legacy | dynamo
    opset: int

    @property
    def id(self) -> str:
        return "-".join(map(str, self))


# what every case must fuse into (counts), and the ops those fusions must leave none of
ROTARY = {"RotaryEmbedding": 2 * LAYERS}                      # q and k of every layer
FUSED = {
    "gpt2": EXPECT["gpt2"],
    "llama": {**EXPECT["llama"], **ROTARY},
    "gptj": {"Attention": LAYERS, "LayerNormalization": LAYERS + 1, "Gelu": LAYERS, **ROTARY},
    # encoder: self-attention; decoder: self- and cross-attention. Norms: one per sublayer + final.
    "t5": {"Attention": 3 * LAYERS, "RMSNormalization": 2 * LAYERS + 3 * LAYERS + 2},
}
RULE = {"Attention": "attention", "LayerNormalization": "layer-norm", "RMSNormalization": "rms-norm",
        "Gelu": "gelu", "RotaryEmbedding": "rotary"}          # the rule that writes each fused op
# rotate_half / rotate_every_two negate a half; T5's decoder bucketing negates int64 positions
NO_LEFTOVERS = {"gpt2": LEFTOVERS, "llama": LEFTOVERS + ("Reciprocal", "Neg"),
                "gptj": LEFTOVERS + ("Neg",), "t5": LEFTOVERS + ("Reciprocal",)}


FUSE_CASES = [
    pytest.param(Case("gpt2", "sdpa", "fp32", "dynamo", 23)),
    pytest.param(Case("llama", "sdpa", "fp32", "dynamo", 23)),
    pytest.param(Case("gpt2", "eager", "fp16", "legacy", 17)),
    pytest.param(Case("gpt2", "eager", "fp16", "dynamo", 18)),
    pytest.param(Case("llama", "eager", "fp16", "legacy", 17)),
    pytest.param(Case("llama", "eager", "fp16", "dynamo", 18)),
    pytest.param(Case("gptj", "eager", "fp32", "legacy", 17)),
    pytest.param(Case("gptj", "eager", "fp32", "dynamo", 18)),
    pytest.param(Case("t5", "eager", "fp32", "legacy", 17)),
    pytest.param(Case("t5", "eager", "fp32", "dynamo", 18)),
]
_ids = [p.values[0].id for p in FUSE_CASES]

# torch's opset-23 RotaryEmbedding gets cos/sin caches [1, T, R/2]; onnxruntime 1.31 wants
# [B, T, R/2] and rejects the exported model itself at batch 2, so its reference values come
# from onnx.reference. tgraph's `rotary-cache-batch` expands the caches, so ORT runs the -O2 model.
ORT_REJECTS_ORIGINAL = {Case("llama", "sdpa", "fp32", "dynamo", 23)}
VALUE_CASES = [pytest.param(p.values[0]) for p in FUSE_CASES]


# ------------------------------------------------------------------------------ cached exports
@pytest.fixture(scope="session")
def foreign(tmp_path_factory):
    """case -> (exported ModelProto, tgraph graph after -O2, its OptimizeResult), each made once."""
    cache = {}
    root = tmp_path_factory.mktemp("foreign_exports")

    def get(case: Case):
        if case not in cache:
            model = foreign_exports.export(*case, root / f"{case.id}.onnx")
            graph = import_onnx(model)
            result = optimize(graph, level=2)
            cache[case] = (model, graph, result)
        return cache[case]
    return get


def _kv_heads(node) -> int:
    """How many K heads an Attention reads: [B, Hkv, S, D], or [B, S, Hkv*D] with kv_num_heads."""
    k = node.inputs[1]
    if k.type.rank == 3:
        assert k.shape[2] == node.attrs["kv_num_heads"] * (HIDDEN // HEADS), (k.type, node.attrs)
        return node.attrs["kv_num_heads"]
    return k.shape[1]


@pytest.mark.parametrize("case", FUSE_CASES, ids=_ids)
def test_export_fuses_fully(case, foreign):
    _, graph, result = foreign(case)
    hist = graph.op_histogram()
    misses = result.near_misses()
    for op, n in FUSED[case.kind].items():
        assert hist.get(op, 0) == n, f"{op}: {hist.get(op, 0)} of {n}; {RULE[op]} near misses: {misses.get(RULE[op])}"
    left = [op for op in NO_LEFTOVERS[case.kind] if op in hist]
    assert not left, f"left unfused: {left} in {hist}; near misses: {misses}"
    attention = [n for n in graph.nodes if n.op == "Attention"]
    if case.kind == "llama":                     # repeat_kv undone: K and V keep their 2 heads
        assert [_kv_heads(n) for n in attention] == [KV_HEADS] * LAYERS, [n.inputs[1].type for n in attention]
    if case.kind == "t5":                        # T5 does not scale QK^T
        assert [n.attrs["scale"] for n in attention] == [1.0] * len(attention)
    else:
        scale = 1 / math.sqrt(HIDDEN // HEADS)
        tol = 2e-3 if case.dtype == "fp16" else 1e-6       # the fp16 graph holds scale as an fp16 constant
        assert all(n.attrs["scale"] == pytest.approx(scale, rel=tol) for n in attention)
    if case.kind == "gptj":                      # rotate_every_two: pairs (2i, 2i+1)
        rotary = [n for n in graph.nodes if n.op == "RotaryEmbedding"]
        assert [n.attrs.get("interleaved") for n in rotary] == [1] * len(rotary)


def _assert_close(got, want, dtype: str):
    """fp32: 1e-5 absolute. fp16: 2 fp16 ulps at the output's magnitude -- both graphs compute the
    same math and differ in where they round (a fused op keeps fp32 inside), which moves a value
    by an ulp or two; a wrong fusion (scale, mask, head order) moves it by tenths."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        return
    atol = 2 * float(np.spacing(np.abs(want).max().astype(np.float16)))
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=atol, rtol=0)


@pytest.mark.parametrize("case", VALUE_CASES, ids=_ids)
def test_export_keeps_values(case, foreign):
    model, graph, _ = foreign(case)
    feeds = foreign_exports.feeds_for(case.kind)
    if case in ORT_REJECTS_ORIGINAL:
        from onnx.reference import ReferenceEvaluator
        want = ReferenceEvaluator(model).run(None, feeds)
    else:
        want = ort_run(model, feeds)
    got = ort_run(to_onnx(graph), feeds)
    assert [v.name for v in graph.outputs] == foreign_exports.output_names_for(case.kind)
    for g, w in zip(got, want):
        _assert_close(g, w, case.dtype)


# ------------------------------------------------------------------------------ hand-built ONNX
def _rotary_onnx(negate: str = "neg", tables: str = "range", d: int = 8):
    """HF's rotate_half rotary on x [B, H, T, d], the tables computed in the graph, the negation of
    the second half written as `negate`: Neg, Mul(x2, -1) or Mul(-1, x2).

    tables="range": angles = Range(T) ⊗ inv_freq ([T, d]). tables="position-ids": transformers
    4.x's LlamaRotaryEmbedding as its legacy export (Optimum's) writes it: inv_freq[None, :, None]
    Expand-ed to [B, -1, 1] (the -1 turned into 1 by Where(Equal(shape, -1))), MatMul with
    position_ids[:, None, :], Transpose, Unsqueeze(1) -> [B, 1, T, d]."""
    c = lambda name, v, dt=np.int64: numpy_helper.from_array(np.array(v, dt), name)      # noqa: E731
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    inits = [c("zero", 0), c("one", 1), c("ax1", [1]), c("ax0", [0]), c("lo", [0]), c("mid", [d // 2]),
             c("hi", [2 ** 62]), c("last", [-1]), c("minus_one_i", [-1]), c("one_i", [1]), c("neg1", -1),
             c("inv_freq", inv_freq, np.float32), c("inv_freq_3d", inv_freq[None, :, None], np.float32),
             c("minus_one", -1.0, np.float32)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "seq", d])]
    if tables == "range":
        nodes = [helper.make_node("Shape", ["x"], ["t1"], start=2, end=3),
                 helper.make_node("Squeeze", ["t1", "ax0"], ["t"]),
                 helper.make_node("Range", ["zero", "t", "one"], ["pos_i"]),
                 helper.make_node("Cast", ["pos_i"], ["pos_f"], to=TensorProto.FLOAT),
                 helper.make_node("Unsqueeze", ["pos_f", "ax1"], ["pos"]),                  # [T, 1]
                 helper.make_node("Mul", ["pos", "inv_freq"], ["freqs"]),                   # [T, d/2]
                 helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),          # [T, d]
                 helper.make_node("Cos", ["emb"], ["cos"]), helper.make_node("Sin", ["emb"], ["sin"])]
    else:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
        nodes = [helper.make_node("Shape", ["position_ids"], ["ps"]),
                 helper.make_node("Gather", ["ps", "zero"], ["b"], axis=0),
                 helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
                 helper.make_node("Concat", ["b1", "minus_one_i", "one_i"], ["shp"], axis=0),    # [B, -1, 1]
                 helper.make_node("Shape", ["shp"], ["shp_n"]),
                 helper.make_node("ConstantOfShape", ["shp_n"], ["ones"],
                                  value=numpy_helper.from_array(np.array([1], np.int64))),
                 helper.make_node("Mul", ["ones", "neg1"], ["neg_ones"]),
                 helper.make_node("Equal", ["shp", "neg_ones"], ["is_neg"]),
                 helper.make_node("Where", ["is_neg", "ones", "shp"], ["shp1"]),                 # [B, 1, 1]
                 helper.make_node("Expand", ["inv_freq_3d", "shp1"], ["inv_b"]),                 # [B, d/2, 1]
                 helper.make_node("Unsqueeze", ["position_ids", "ax1"], ["pid3"]),
                 helper.make_node("Cast", ["pid3"], ["pid_f"], to=TensorProto.FLOAT),            # [B, 1, T]
                 helper.make_node("MatMul", ["inv_b", "pid_f"], ["freqs_t"]),                    # [B, d/2, T]
                 helper.make_node("Transpose", ["freqs_t"], ["freqs"], perm=[0, 2, 1]),
                 helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),               # [B, T, d]
                 helper.make_node("Cos", ["emb"], ["cos3"]), helper.make_node("Sin", ["emb"], ["sin3"]),
                 helper.make_node("Unsqueeze", ["cos3", "ax1"], ["cos"]),                        # [B, 1, T, d]
                 helper.make_node("Unsqueeze", ["sin3", "ax1"], ["sin"])]
    nodes += [helper.make_node("Slice", ["x", "lo", "mid", "last"], ["x1"]),
              helper.make_node("Slice", ["x", "mid", "hi", "last"], ["x2"])]
    if negate == "neg":
        nodes.append(helper.make_node("Neg", ["x2"], ["nx2"]))
    elif negate == "mul-minus-one":
        nodes.append(helper.make_node("Mul", ["x2", "minus_one"], ["nx2"]))
    else:
        nodes.append(helper.make_node("Mul", ["minus_one", "x2"], ["nx2"]))
    nodes += [helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
              helper.make_node("Mul", ["x", "cos"], ["x_cos"]),
              helper.make_node("Mul", ["rot", "sin"], ["r_sin"]),
              helper.make_node("Add", ["x_cos", "r_sin"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "seq", d])
    used = {name for n in nodes for name in n.input}
    g = helper.make_graph(nodes, "rotary", inputs, [y], [t for t in inits if t.name in used])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("negate,tables", [
    ("neg", "range"),
    pytest.param("mul-minus-one", "range"),
    pytest.param("minus-one-mul", "range"),
    ("neg", "position-ids"),
])
def test_hand_built_rotary_spellings_fuse(negate, tables):
    model = _rotary_onnx(negate, tables)
    onnx.checker.check_model(model)
    graph = import_onnx(model)
    result = optimize(graph, level=2)
    hist = graph.op_histogram()
    assert hist.get("RotaryEmbedding") == 1, (hist, result.near_misses().get("rotary"))
    # the negation and the products with x went into the op; what is left computes the tables
    assert "Neg" not in hist and not [n.name for n in graph.nodes if n.op == "Mul" and n.outputs[0].type.rank == 4]
    rng = np.random.default_rng(5)
    for t in (5, 7):                                    # stays dynamic in the sequence length
        feeds = {"x": rng.standard_normal((2, 4, t, 8)).astype(np.float32),
                 "position_ids": np.stack([np.arange(t), np.arange(t) + 3]).astype(np.int64)}
        pos = feeds["position_ids"] if tables == "position-ids" else np.arange(t)[None]
        feeds = {k: v for k, v in feeds.items() if k in {i.name for i in model.graph.input}}
        want = ort_run(model, feeds)[0]
        np.testing.assert_allclose(want, _rotate_half(feeds["x"], pos), atol=1e-5)     # the builder is HF's formula
        np.testing.assert_allclose(ort_run(to_onnx(graph), feeds)[0], want, atol=1e-5)


def _rotate_half(x, positions):
    """HF's apply_rotary_pos_emb in NumPy: x·cos + rotate_half(x)·sin, angles positions ⊗ inv_freq."""
    d = x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    ang = positions[..., None].astype(np.float32) * inv_freq                       # [B|1, T, d/2]
    emb = np.concatenate([ang, ang], -1)[:, None]                                  # [B|1, 1, T, d]
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def _scaled_before(which: str):
    """`_attention_onnx` without a scale, then Div(q, sqrt(d)) -- or Div by d^(1/4) on both q and
    Kᵀ -- put in front of the QKᵀ MatMul."""
    model = _attention_onnx(scale_form="none")
    d = 8
    inits = model.graph.initializer
    inits.append(numpy_helper.from_array(np.array(d ** 0.25, np.float32), "fourth_root_d"))
    qk = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "qk")
    new = [helper.make_node("Div", ["q", "sqrt_d" if which == "q" else "fourth_root_d"], ["q_scaled"])]
    qk.input[0] = "q_scaled"
    if which == "q-and-k":
        new.append(helper.make_node("Div", [qk.input[1], "fourth_root_d"], ["kT_scaled"]))
        qk.input[1] = "kT_scaled"
    at = list(model.graph.node).index(qk)
    for i, n in enumerate(new):
        model.graph.node.insert(at + i, n)
    return model


@pytest.mark.parametrize("which", ["q", "q-and-k"])
def test_hand_built_softmax_scale_divided_before_the_matmul_fuses(which):
    model = _scaled_before(which)
    onnx.checker.check_model(model)
    graph = import_onnx(model)
    result = optimize(graph, level=2)
    hist = graph.op_histogram()
    assert hist.get("Attention") == 1 and "Softmax" not in hist and "Div" not in hist, (hist, result.near_misses())
    att = next(n for n in graph.nodes if n.op == "Attention")
    assert att.attrs["scale"] == pytest.approx(1 / math.sqrt(8))
    feeds = _feeds()
    np.testing.assert_allclose(ort_run(to_onnx(graph), feeds)[0], ort_run(model, feeds)[0], atol=1e-5)
