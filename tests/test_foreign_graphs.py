"""Graphs tgraph did not write: ONNX import, fusions on real exporter output, `tgraph optimize`.

Small random-initialised Hugging Face models (GPT-2: tanh GELU with Pow; LLaMA: grouped-query
attention through repeat_kv, Reciprocal/rsqrt RMSNorm, fp32 casts, rotary; BERT: erf GELU)
are exported with PyTorch's exporters, imported, optimized at -O2, and must come out with
every attention block, norm and GELU fused -- and with the same onnxruntime outputs (its
own optimizer disabled) as the exported model. Hand-built ONNX graphs cover the spellings
and the refusals (with their reasons).
"""
import math
import os
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tgraph.cli import main as cli_main
from tgraph.codegen.onnx import to_onnx
from tgraph.errors import TgraphError
from tgraph.onnx_import import import_onnx
from tgraph.passes import optimize
from tgraph.passes.fuse_attention import AttentionRule
from tgraph.passes.pattern import explain

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS, HEADS, KV_HEADS, HIDDEN = 2, 4, 2, 32
IDS = np.random.default_rng(0).integers(0, 100, (2, 5)).astype(np.int64)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)


def ort_run(model: onnx.ModelProto, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


# ------------------------------------------------------------------------------ HF exports
def _hf_model(kind: str, impl: str):
    t = transformers
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=100, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                           bos_token_id=0, eos_token_id=0)
        model = t.GPT2Model
    elif kind == "llama":
        cfg = t.LlamaConfig(vocab_size=100, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
        model = t.LlamaModel
    else:
        cfg = t.BertConfig(vocab_size=100, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=64)
        model = t.BertModel
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return model(cfg).eval()


class _LastHidden(torch.nn.Module if torch else object):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def export_hf(kind: str, impl: str, exporter: str, opset: int, path) -> onnx.ModelProto:
    model = _LastHidden(_hf_model(kind, impl))
    args = (torch.tensor(IDS), torch.tensor(MASK))
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, args, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], dynamic_axes=dyn, opset_version=opset,
                              dynamo=False)
        else:
            pytest.importorskip("onnxscript")
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
            torch.onnx.export(model, args, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], dynamic_shapes=shapes, opset_version=opset,
                              dynamo=True, verbose=False)
    return onnx.load(str(path))


# kind, attention implementation, exporter, opset: what fuses into what
EXPECT = {
    "gpt2": {"Attention": LAYERS, "LayerNormalization": 2 * LAYERS + 1, "Gelu": LAYERS},
    "llama": {"Attention": LAYERS, "RMSNormalization": 2 * LAYERS + 1},
    "bert": {"Attention": LAYERS, "LayerNormalization": 2 * LAYERS + 1, "Gelu": LAYERS},
}
LEFTOVERS = ("Softmax", "Erf", "Tanh", "Pow", "Sqrt", "ReduceMean")
CASES = [
    ("gpt2", "eager", "legacy", 17), ("gpt2", "sdpa", "legacy", 17), ("gpt2", "eager", "legacy", 14),
    ("llama", "eager", "legacy", 17), ("llama", "sdpa", "legacy", 17),
    ("bert", "eager", "legacy", 17), ("bert", "sdpa", "legacy", 17), ("bert", "eager", "legacy", 14),
    ("gpt2", "sdpa", "dynamo", 18), ("llama", "eager", "dynamo", 18), ("llama", "sdpa", "dynamo", 18),
    ("bert", "eager", "dynamo", 18),
]


@pytest.mark.parametrize("kind,impl,exporter,opset", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_hf_export_fuses_completely_and_keeps_values(kind, impl, exporter, opset, tmp_path):
    exported = export_hf(kind, impl, exporter, opset, tmp_path / "model.onnx")
    graph = import_onnx(exported)
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in graph.outputs] == ["last_hidden_state"]
    result = optimize(graph, level=2)
    hist = graph.op_histogram()
    for op, n in EXPECT[kind].items():
        assert hist.get(op, 0) == n, (op, hist, result.near_misses())
    for op in LEFTOVERS:
        assert op not in hist, (op, hist)
    # SDPA's Where(IsNaN(p), 0, p) moves to the attention output (same values), one per block
    assert hist.get("IsNaN", 0) == (LAYERS if impl == "sdpa" else 0)
    if kind == "llama":                    # repeat_kv undone: K and V keep their 2 heads
        for node in graph.nodes:
            if node.op == "Attention" and node.inputs[0].type.rank == 3:     # heads merged: [B, T, H*D]
                assert (node.attrs["q_num_heads"], node.attrs["kv_num_heads"]) == (HEADS, KV_HEADS)
                assert node.inputs[1].shape[2] == node.inputs[2].shape[2] == KV_HEADS * (HIDDEN // HEADS)
            elif node.op == "Attention":
                assert node.inputs[0].shape[1] == HEADS and node.inputs[1].shape[1] == KV_HEADS
                assert node.inputs[2].shape[1] == KV_HEADS
    feeds = {"input_ids": IDS, "attention_mask": MASK}
    want = ort_run(exported, feeds)[0]
    got = ort_run(to_onnx(graph), feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ hand-built ONNX
def _attention_onnx(scale_form="div-after", mask="one-minus-min", repeat=False, probs_out=False,
                    pretransposed=False, softmax_casts=False, B=2):
    """A HF-style attention block written with standard ONNX ops."""
    H, T, D = 4, 5, 8
    hk = KV_HEADS if repeat else H
    kshape = [B, hk, D, T] if pretransposed else [B, hk, T, D]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, H, T, D]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, kshape),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [B, hk, T, D]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, T])]
    inits = [numpy_helper.from_array(np.array(math.sqrt(D), np.float32), "sqrt_d"),
             numpy_helper.from_array(np.array(1 / math.sqrt(D), np.float32), "inv_sqrt_d"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fmin"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "mask_axes")]
    nodes = []
    k, v = "k", "v"
    if repeat:
        inits += [numpy_helper.from_array(np.array([2], np.int64), "ax2"),
                  numpy_helper.from_array(np.array([B, hk, H // hk, T, D], np.int64), "rep_shape"),
                  numpy_helper.from_array(np.array([B, H, T, D], np.int64), "heads_shape")]
        for x in ("k", "v"):
            nodes += [helper.make_node("Unsqueeze", [x, "ax2"], [f"{x}/u"]),
                      helper.make_node("Expand", [f"{x}/u", "rep_shape"], [f"{x}/e"]),
                      helper.make_node("Reshape", [f"{x}/e", "heads_shape"], [f"{x}::rep"])]
        k, v = "k::rep", "v::rep"
    kt = k
    if not pretransposed:
        nodes.append(helper.make_node("Transpose", [k], ["kT"], perm=[0, 1, 3, 2]))
        kt = "kT"
    q = "q"
    if scale_form == "mul-before":
        nodes.append(helper.make_node("Mul", ["q", "inv_sqrt_d"], ["q_scaled"]))
        q = "q_scaled"
    nodes.append(helper.make_node("MatMul", [q, kt], ["qk"]))
    s = "qk"
    if scale_form == "div-after":
        nodes.append(helper.make_node("Div", ["qk", "sqrt_d"], ["scores"]))
        s = "scores"
    if mask == "one-minus-min":                  # (1 - mask) * finfo.min, added
        nodes += [helper.make_node("Unsqueeze", ["attention_mask", "mask_axes"], ["m4"]),
                  helper.make_node("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "mf"], ["inv"]),
                  helper.make_node("Mul", ["inv", "fmin"], ["bias"]),
                  helper.make_node("Add", [s, "bias"], ["masked"])]
        s = "masked"
    if softmax_casts:
        nodes.append(helper.make_node("Cast", [s], ["s32"], to=TensorProto.FLOAT))
        s = "s32"
    nodes.append(helper.make_node("Softmax", [s], ["probs"], axis=-1))
    p = "probs"
    if softmax_casts:
        nodes.append(helper.make_node("Cast", ["probs"], ["probs_cast"], to=TensorProto.FLOAT))
        p = "probs_cast"
    nodes.append(helper.make_node("MatMul", [p, v], ["context:0"]))
    outputs = [helper.make_tensor_value_info("context:0", TensorProto.FLOAT, [B, H, T, D])]
    if probs_out:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "attn", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(pretransposed=False, repeat=False):
    rng = np.random.default_rng(3)
    hk = KV_HEADS if repeat else 4
    kshape = (2, hk, 8, 5) if pretransposed else (2, hk, 5, 8)
    return {"q": rng.standard_normal((2, 4, 5, 8)).astype(np.float32),
            "k": rng.standard_normal(kshape).astype(np.float32),
            "v": rng.standard_normal((2, hk, 5, 8)).astype(np.float32), "attention_mask": MASK}


@pytest.mark.parametrize("kw", [dict(), dict(scale_form="mul-before"), dict(pretransposed=True),
                                dict(softmax_casts=True), dict(repeat=True)],
                         ids=["div-after", "mul-before", "pretransposed-k", "fp32-casts", "repeat-kv"])
def test_hand_built_attention_spellings_fuse(kw):
    model = _attention_onnx(**kw)
    graph = import_onnx(model)
    optimize(graph, level=2)
    hist = graph.op_histogram()
    assert hist.get("Attention") == 1 and "Softmax" not in hist, hist
    att = next(n for n in graph.nodes if n.op == "Attention")
    assert att.attrs["scale"] == pytest.approx(1 / math.sqrt(8))
    if kw.get("repeat"):
        assert att.inputs[1].shape[1] == KV_HEADS and "Expand" not in hist
    assert [v.name for v in graph.outputs] == ["context:0"]      # interface names kept exactly
    feeds = _feeds(kw.get("pretransposed", False), kw.get("repeat", False))
    np.testing.assert_allclose(ort_run(to_onnx(graph), feeds)[0], ort_run(model, feeds)[0], atol=1e-5)


def test_attention_whose_probabilities_are_an_output_is_refused_with_reason():
    graph = import_onnx(_attention_onnx(probs_out=True))
    result = optimize(graph, level=2)
    assert "Attention" not in graph.op_histogram()
    reasons = result.near_misses()["attention"]
    assert any("probs" in r and "graph output" in r for r in reasons), reasons


def test_repeated_kv_used_elsewhere_is_kept_and_fed_whole():
    """The repeated K is also a graph output: un-repeating would need it anyway, so the
    fused Attention takes the repeated K/V (all heads) instead of refusing."""
    model = _attention_onnx(repeat=True)
    model.graph.output.append(helper.make_tensor_value_info("k::rep", TensorProto.FLOAT, None))
    graph = import_onnx(model)
    optimize(graph, level=2)
    att = next(n for n in graph.nodes if n.op == "Attention")
    assert att.inputs[1].name == "k::rep" and att.inputs[1].shape[1] == 4
    feeds = _feeds(repeat=True)
    for got, want in zip(ort_run(to_onnx(graph), feeds), ort_run(model, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_softmax_used_elsewhere_is_refused_with_reason():
    model = _attention_onnx()
    extra = helper.make_node("ReduceMax", ["probs"], ["pmax"], keepdims=0, axes=[-1])
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("pmax", TensorProto.FLOAT, None))
    graph = import_onnx(model)
    misses = explain(graph, [AttentionRule()])
    assert any("intermediate probs is used elsewhere" in m.reason for m in misses), misses


def test_repeat_that_is_not_repeat_kv_keeps_all_heads():
    """Expand that broadcasts the batch axis, not the new group axis: not repeat_kv, so
    the fused Attention must get the expanded K/V (all heads), never the un-repeated ones."""
    model = _attention_onnx(repeat=True, B=1)
    for init in model.graph.initializer:
        if init.name == "rep_shape":               # batch 1 -> 2 instead of group 1 -> 2
            init.CopyFrom(numpy_helper.from_array(np.array([2, KV_HEADS, 1, 5, 8], np.int64), "rep_shape"))
    graph = import_onnx(model)
    optimize(graph, pipeline="fuse-attention,dce")
    att = next(n for n in graph.nodes if n.op == "Attention")
    assert att.inputs[1].shape[1] == 4, "un-repeated K fed although Expand did not repeat heads"
    feeds = {k: v[:1] for k, v in _feeds(repeat=True).items()}
    np.testing.assert_allclose(ort_run(to_onnx(graph), feeds)[0], ort_run(model, feeds)[0], atol=1e-5)


# ------------------------------------------------------------------------------ the importer
def _tiny(op_nodes, inputs, outputs, inits=(), opset=17, domain_ops=()):
    g = helper.make_graph(op_nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)] +
                             [helper.make_opsetid(d, 1) for d in domain_ops], ir_version=8)


def test_import_names_types_constants_and_axes_inputs():
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", None, 6])
    y = helper.make_tensor_value_info("out/y", TensorProto.FLOAT, ["batch", 1, 1])
    nodes = [helper.make_node("Constant", [], ["/c:0"], value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("ReduceMean", ["input.1", "/c:0"], ["m"], keepdims=1),
             helper.make_node("Mul", ["m", "w.weight"], ["out/y"])]
    w = numpy_helper.from_array(np.array([[[2.0]]], np.float32), "w.weight")
    g = import_onnx(_tiny(nodes, [x], [y], [w], opset=18))
    assert g.inputs[0].name == "input.1" and g.inputs[0].shape == ("batch", None, 6)
    assert g.outputs[0].name == "out/y"
    assert g.constants["w.weight"].is_param and "w.weight" in g.parameters()
    red = next(n for n in g.nodes if n.op == "ReduceMean")
    assert red.attrs["axes"] == [2] and red.outputs[0].name.isidentifier()
    xs = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(to_onnx(g), {"input.1": xs})[0], xs.mean(2, keepdims=True) * 2, rtol=1e-6)


def test_import_errors_are_one_line_and_name_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    with pytest.raises(TgraphError, match=r"node 'weird' \(Det\): op Det is not supported") as e:
        import_onnx(_tiny([helper.make_node("Det", ["x"], ["y"], name="weird")], [x], [y]))
    assert "\n" not in str(e.value)
    # com.microsoft is imported for the contrib ops of the op table (the skip norms), not others
    with pytest.raises(TgraphError, match=r"node 'g' \(Gelu\): op com.microsoft.Gelu is not supported"):
        import_onnx(_tiny([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft", name="g")], [x], [y],
                          domain_ops=["com.microsoft"]))
    with pytest.raises(TgraphError, match=r"domain 'ai.example' is not supported"):
        import_onnx(_tiny([helper.make_node("Gelu", ["x"], ["y"], domain="ai.example", name="g")], [x], [y],
                          domain_ops=["ai.example"]))
    f8 = helper.make_tensor_value_info("f8", TensorProto.FLOAT6E2M3, [2, 3])
    with pytest.raises(TgraphError, match=r"graph input 'f8' has unsupported element type 27"):
        import_onnx(_tiny([helper.make_node("Identity", ["f8"], ["y"], name="i")], [f8], [y]))
    with pytest.raises(TgraphError, match="opset 11"):
        import_onnx(_tiny([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=11))
    with pytest.raises(TgraphError, match="not found"):
        import_onnx(tmp_path / "missing.onnx")


def test_import_external_data_model(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    model = _tiny([helper.make_node("MatMul", ["x", "big.w"], ["y"])], [x], [y], [numpy_helper.from_array(w, "big.w")])
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    assert os.path.exists(tmp_path / "ext.onnx.data")
    g = import_onnx(path)
    np.testing.assert_array_equal(g.constants["big.w"].const, w)


# ------------------------------------------------------------------------------ the CLI
def test_cli_optimize_writes_model_and_reports(tmp_path, capsys):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_attention_onnx(), str(src))
    assert cli_main(["optimize", str(src), "-o", str(dst), "--report"]) == 0
    out = capsys.readouterr().out
    assert "fuse-attention" in out and "attention=1" in out
    assert "near misses" in out and "gelu" in out          # rules that did not fire say why
    optimized = onnx.load(str(dst))
    assert [n.op_type for n in optimized.graph.node].count("Attention") == 1
    feeds = _feeds()
    np.testing.assert_allclose(ort_run(optimized, feeds)[0], ort_run(onnx.load(str(src)), feeds)[0], atol=1e-5)
    # refusals are reported too: with the probabilities returned, attention says why it did not fire
    onnx.save(_attention_onnx(probs_out=True), str(src))
    assert cli_main(["optimize", str(src), "-o", str(dst), "--pipeline", "fuse-attention", "--report"]) == 0
    assert "attention at" in capsys.readouterr().out


def test_cli_optimize_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    onnx.save(_tiny([helper.make_node("Det", ["x"], ["y"], name="hs")], [x], [x]), str(bad))
    assert cli_main(["optimize", str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Det" in err
    assert not (tmp_path / "o.onnx").exists()
    assert cli_main(["optimize", str(bad), "-o", str(tmp_path / "o.txt")]) == 2
