"""`fuse-rotary`: rotate_half rotary embeddings -> RotaryEmbedding-23.

Positive cases: the zoo's LLaMA (full rotation, grouped heads) and PaLM/GPT-NeoX (partial
rotation), plus the Slice spelling of a PyTorch export. Negative cases assert the reason.
Numerics: onnxruntime with its optimizer disabled, before and after, at two sequence
lengths (the fused graph must stay dynamic), and the reference interpreter.
"""
import numpy as np
import pytest

from model_harness import run_onnx, run_numpy
from tgraph.api import build
from tgraph.dsl.rotary import inv_freq
from tgraph.ir import Builder, DType, TensorType
from tgraph.ir.evaluate import evaluate
from tgraph.passes import optimize
from tgraph.passes.fuse_rotary import RotaryRule
from tgraph.passes.pattern import apply_rules, explain

RNG = np.random.default_rng(11)
TINY = {"vocab_size": "67", "d_model": "32", "num_layers": "2", "num_heads": "4", "d_ff": "48"}


def i64(*v):
    return np.array(v, np.int64)


def rotary_graph(d=8, r=None, halves="split", tables="computed", freqs=None, neg_first=True, leak=False,
                 table_shape=None, x_batch="batch", position_ids=False):
    """x: (B, 3, T, d) rotated on its first r dims, written out op by op like the DSL does."""
    r = r or d
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float32, (x_batch, 3, "seq", d)))
    ids = g.add_input("ids", TensorType(DType.int64, ("batch", "seq")))
    if tables == "computed":
        freq = b.const(inv_freq(r, 10000.0) if freqs is None else freqs)
        if position_ids:                                                          # per-row positions
            pos = b.op("Unsqueeze", b.op("Cast", ids, to=DType.float32), axes=[2])  # (B, T, 1)
            ang = b.op("Unsqueeze", b.op("Mul", pos, freq), axes=[1])            # (B, 1, T, r)
        else:
            seq = b.op("Squeeze", b.op("Shape", ids, start=1, end=2), axes=[0])
            pos = b.op("Unsqueeze", b.op("Cast", b.op("Range", b.const(i64(0)[0]), seq, b.const(i64(1)[0])),
                                         to=DType.float32), axes=[1])                 # (T, 1)
            ang = b.op("Mul", pos, freq)                                              # (T, r)
        cos, sin = b.op("Cos", ang), b.op("Sin", ang)
    else:
        cos = g.add_input("cos", TensorType(DType.float32, table_shape or ("seq", r)))
        sin = g.add_input("sin", TensorType(DType.float32, table_shape or ("seq", r)))
    rot, rest = (b.op("Split", x, axis=-1, split=[r, d - r]) if r < d else (x, None))

    def cut(t, at, width):
        if halves == "split":
            return b.op("Split", t, axis=-1, split=[at, width - at])
        return (b.op("Slice", t, b.const(i64(0)), b.const(i64(at)), b.const(i64(-1)), b.const(i64(1))),
                b.op("Slice", t, b.const(i64(at)), b.const(i64(2 ** 62)), b.const(i64(-1)), b.const(i64(1))))

    x1, x2 = cut(rot, r // 2, r)
    parts = [b.op("Neg", x2), x1] if neg_first else [x1, b.op("Neg", x2)]
    rotated = b.op("Concat", *parts, axis=-1)
    y = b.op("Add", b.op("Mul", rot, cos), b.op("Mul", rotated, sin))
    if rest is not None:
        y = b.op("Concat", y, rest, axis=-1)
    g.outputs = [y] + ([b.op("Mul", rotated, rotated)] if leak else [])
    g.verify()
    return g


def feeds(graph, batch=2, seq=5):
    out = {}
    for v in graph.inputs:
        shape = [{"batch": batch, "seq": seq}.get(s, s) for s in v.shape]
        out[v.name] = RNG.integers(0, 50, shape) if v.dtype is DType.int64 \
            else RNG.standard_normal(shape).astype(np.float32)
    return out


def fuse(graph):
    optimize(graph, pipeline="canonicalize")            # as at -O2: one spelling (no unit Slice steps)
    return apply_rules(graph, [RotaryRule()])["rotary"]


# ------------------------------------------------------------------------------ positive
@pytest.mark.parametrize("halves,position_ids", [("split", False), ("slice", False), ("split", True)])
@pytest.mark.parametrize("d,r", [(8, None), (8, 4), (12, 4)])
def test_fuses_and_keeps_values(halves, position_ids, d, r):
    """Split or Slice halves; a [T, R] table or a per-row [B, 1, T, R] one (position_ids)."""
    g = rotary_graph(d=d, r=r, halves=halves, position_ids=position_ids)
    inputs = [feeds(g, 2, 5), feeds(g, 1, 9)]
    before = [run_onnx(g, f) for f in inputs]
    assert fuse(g) == 1
    optimize(g, pipeline="cse,dce")
    hist = g.op_histogram()
    assert hist["RotaryEmbedding"] == 1 and "Neg" not in hist and "Split" not in hist, hist
    node = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert node.attrs["rotary_embedding_dim"] == (0 if r is None else r)
    for f, want in zip(inputs, before):          # two sequence lengths: still dynamic
        got = run_onnx(g, f)
        ref = evaluate(g, f)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(ref[name], want[name], atol=1e-5, rtol=1e-5)


def _zoo(name, overrides, level):
    return build(name, {**TINY, **overrides}, level=level).graph


@pytest.mark.parametrize("name,overrides,rdim", [
    ("llama", {"num_kv_heads": "2"}, 0),                               # full rotation, grouped heads
    ("palm", {"num_kv_heads": "1", "rotary_pct": "0.5"}, 4),           # multi-query, half the head rotates
    ("palm", {"num_kv_heads": "4", "rotary_pct": "0.25", "shared_norm": "false", "norm_bias": "true"}, 2),
])
def test_zoo_models_fuse_every_rotary(name, overrides, rdim):
    g0, g2 = _zoo(name, overrides, 0), _zoo(name, overrides, 2)
    hist = g2.op_histogram()
    assert hist.get("RotaryEmbedding") == 2 * 2, hist                  # q and k of 2 layers
    assert "Neg" not in hist and "Sin" in hist                         # the tables are still computed in-graph
    assert {n.attrs["rotary_embedding_dim"] for n in g2.nodes if n.op == "RotaryEmbedding"} == {rdim}
    for batch, seq in ((2, 7), (1, 3)):
        ids = RNG.integers(0, 67, (batch, seq))
        mask = np.ones((batch, seq), np.int64)
        mask[0, -1] = 0
        f = {"input_ids": ids, "attention_mask": mask}
        want = run_onnx(g0, f)["logits"]
        np.testing.assert_allclose(run_onnx(g2, f)["logits"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run_numpy(g2, f)["logits"], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position_ids", ["true", "false"])
def test_kv_cache_tables_fuse(position_ids):
    """With a KV cache the tables are per-row [B, 1, T, R] (position_ids input) or [T, R] rows
    past..past+T-1 whose length shape inference cannot name; both fuse and keep values."""
    from tgraph.models.llama import LlamaConfig
    if "use_cache" not in LlamaConfig.__dataclass_fields__:
        pytest.skip("llama has no KV cache option")
    ov = {"num_kv_heads": "2", "use_cache": "true", "use_position_ids": position_ids}
    g0, g2 = _zoo("llama", ov, 0), _zoo("llama", ov, 2)
    assert g2.op_histogram().get("RotaryEmbedding") == 4 and "Neg" not in g2.op_histogram()
    batch, seq, past = 2, 3, 4
    f = {}
    for v in g0.inputs:
        if v.name == "input_ids":
            f[v.name] = RNG.integers(0, 67, (batch, seq))
        elif v.name == "attention_mask":
            f[v.name] = np.ones((batch, past + seq), np.int64)
        elif v.name == "position_ids":
            f[v.name] = np.array([[4, 5, 6], [2, 3, 4]], np.int64)       # row 1 has 2 pads on the left
        else:                                                             # past keys/values (B, Hkv, P, D)
            f[v.name] = RNG.standard_normal((batch,) + tuple(past if isinstance(d, str) else d
                                                              for d in v.shape[1:])).astype(np.float32)
    want, got = run_onnx(g0, f), run_onnx(g2, f)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)


def test_runs_before_attention_at_O2():
    from tgraph.passes import level_pipeline
    pipe = level_pipeline(2)
    assert pipe.index("fuse-rotary") < pipe.index("fuse-attention")


# ------------------------------------------------------------------------------ negative
def _reasons(graph):
    optimize(graph, pipeline="canonicalize")
    return [m.reason for m in explain(graph, [RotaryRule()])]


@pytest.mark.parametrize("kwargs,reason", [
    ({"tables": "inputs"}, "cannot prove that cos table cos repeats over its two halves"),
    ({"freqs": np.arange(8, dtype=np.float32)}, "repeats over its two halves"),        # GPT-J style table
    ({"tables": "inputs", "table_shape": ("batch", 3, "seq", 8)}, "not [seq, rotary_dim], [batch, 1, seq, rotary_dim] or [batch, seq, 1"),
    ({"tables": "inputs", "table_shape": ("batch", 1, "seq", 8), "x_batch": 1}, "broadcasts x float32[1,3,seq,8] up"),
    ({"leak": True}, "used elsewhere"),
])
def test_refused_with_reason(kwargs, reason):
    g = rotary_graph(**kwargs)
    reasons = _reasons(g)
    assert any(reason in r for r in reasons), reasons
    assert fuse(g) == 0
    assert "RotaryEmbedding" not in g.op_histogram()


def test_inverse_rotation_is_not_fused():
    """concat(x1, -x2) rotates the other way: RotaryEmbedding cannot express it."""
    g = rotary_graph(neg_first=False)
    optimize(g, pipeline="canonicalize")
    misses = {m.node: m.reason for m in explain(g, [RotaryRule()])}
    assert "expected Neg" in misses[g.outputs[0].producer.name], misses
    assert fuse(g) == 0


def test_uneven_cut_is_refused():
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float32, (1, 2, 4, 8)))
    cos = b.const(np.ones((4, 8), np.float32))
    x1, x2 = b.op("Split", x, axis=-1, split=[3, 5])
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    g.outputs = [b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, cos))]
    assert any("not in the middle" in r for r in _reasons(g)), _reasons(g)


def test_hugging_face_llama_export_fuses(tmp_path):
    """PyTorch's export of HF LLaMA: Slice halves, [1, 1, T, D] tables from cat(freqs, freqs)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.LlamaModel(cfg).eval()

    graph, exported = _export_and_fuse(hf, tmp_path / "llama.onnx")
    assert "Neg" not in graph.op_histogram()
    _check_against_export(graph, exported)


def _export_and_fuse(hf, path):
    """Export an HF base model's last hidden state with torch's legacy exporter (opset 17), import
    it and run -O2: (the fused graph, the exported model). Every layer's q and k must rotate."""
    import warnings

    import onnx
    import torch

    from tgraph.onnx_import import import_onnx

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = hf

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    ids, mask = RNG.integers(0, 67, (2, 5)), np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(), (torch.tensor(ids), torch.tensor(mask)), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["y"], dynamic_axes=dyn,
                          opset_version=17, dynamo=False)
    exported = onnx.load(str(path))
    graph = import_onnx(exported)
    result = optimize(graph, level=2)
    assert result.fusions()["rotary"] == 2 * hf.config.num_hidden_layers, result.near_misses()
    return graph, exported


def _check_against_export(graph, exported):
    """The fused graph equals the export on onnxruntime (optimizer off) at two shapes, a padded row each."""
    for batch, seq in ((2, 5), (1, 8)):
        f = {"input_ids": RNG.integers(0, 67, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64)}
        f["attention_mask"][0, -1] = 0
        np.testing.assert_allclose(run_onnx(graph, f)["y"], _ort(exported, f), atol=1e-5, rtol=0)


def _ort(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ------------------------------------------------------------------------------ rotate_every_two (GPT-J)
def _inv_freq_half(r):
    return (1.0 / 10000.0 ** (np.arange(0, r, 2) / r)).astype(np.float32)          # (R/2,)


def every_two_graph(d=8, r=None, heads_axis=2, tables="interleaved"):
    """GPT-J's rotary, op by op as torch exports it: x (B, T, 3, d) (heads_axis 2) or (B, 3, T, d),
    rotate_every_two(x) = stack(-x[..., 1::2], x[..., 0::2]).flatten(-2), and tables that
    repeat_interleave each angle (Unsqueeze -> Tile -> Reshape); `tables="halves"` repeats
    them rotate_half's way instead (cat(f, f)), which this layout must refuse."""
    r = r or d
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float32, ("batch", "seq", 3, d) if heads_axis == 2 else ("batch", 3, "seq", d)))
    ids = g.add_input("ids", TensorType(DType.int64, ("batch", "seq")))
    pos = b.op("Unsqueeze", b.op("Cast", ids, to=DType.float32), axes=[2])              # (B, T, 1)
    ang = b.op("Mul", pos, b.const(_inv_freq_half(r)))                                   # (B, T, R/2)

    def table(fn):
        t = b.op("Unsqueeze", b.op(fn, ang), axes=[heads_axis])                          # (B, T, 1, R/2) | (B, 1, T, R/2)
        if tables == "halves":
            return b.op("Concat", t, t, axis=-1)
        t = b.op("Tile", b.op("Unsqueeze", t, axes=[4]), b.const(i64(1, 1, 1, 1, 2)))    # (.., R/2, 2)
        return b.op("Reshape", t, b.const(i64(0, 0, 0, r)))                               # (.., R): each angle twice
    cos, sin = table("Cos"), table("Sin")
    big = b.const(i64(2 ** 62))
    rot = b.op("Slice", x, b.const(i64(0)), b.const(i64(r)), b.const(i64(-1)), b.const(i64(1))) if r < d else x
    even = b.op("Slice", rot, b.const(i64(0)), big, b.const(i64(-1)), b.const(i64(2)))
    odd = b.op("Slice", rot, b.const(i64(1)), big, b.const(i64(-1)), b.const(i64(2)))
    pairs = b.op("Concat", b.op("Unsqueeze", b.op("Neg", odd), axes=[-1]), b.op("Unsqueeze", even, axes=[-1]), axis=-1)
    rotated = b.op("Reshape", pairs, b.op("Shape", rot))
    y = b.op("Add", b.op("Mul", rot, cos), b.op("Mul", rotated, sin))
    if r < d:
        y = b.op("Concat", y, b.op("Slice", x, b.const(i64(r)), big, b.const(i64(-1)), b.const(i64(1))), axis=-1)
    g.outputs = [y]
    g.verify()
    return g


def every_two_reference(x, ids, r, heads_axis):
    """The GPT-J formula in NumPy (HF's apply_rotary_pos_emb with rotate_every_two)."""
    ang = ids[..., None].astype(np.float64) * _inv_freq_half(r)                          # (B, T, R/2)
    cos, sin = (np.expand_dims(np.repeat(f(ang), 2, axis=-1), heads_axis) for f in (np.cos, np.sin))
    rot = x[..., :r]
    rotated = np.stack([-rot[..., 1::2], rot[..., 0::2]], axis=-1).reshape(rot.shape)
    return np.concatenate([rot * cos + rotated * sin, x[..., r:]], axis=-1)


@pytest.mark.parametrize("heads_axis", [2, 1])
@pytest.mark.parametrize("d,r", [(8, None), (8, 4), (12, 4)])
def test_every_two_fuses_interleaved_and_matches_the_formula(heads_axis, d, r):
    g = every_two_graph(d=d, r=r, heads_axis=heads_axis)
    inputs = [feeds(g, 2, 5), feeds(g, 1, 9)]
    refs = [every_two_reference(f["x"], f["ids"], r or d, heads_axis) for f in inputs]
    for f, ref in zip(inputs, refs):                       # the graph is the formula
        np.testing.assert_allclose(run_onnx(g, f)[g.outputs[0].name], ref, atol=1e-5, rtol=1e-5)
    assert fuse(g) == 1
    optimize(g, pipeline="cse,dce")
    hist = g.op_histogram()
    assert hist["RotaryEmbedding"] == 1 and "Neg" not in hist, hist
    node = next(n for n in g.nodes if n.op == "RotaryEmbedding")
    assert node.attrs["interleaved"] == 1 and node.attrs["rotary_embedding_dim"] == (0 if r is None else r)
    assert node.inputs[0].type.rank == (3 if heads_axis == 2 else 4)      # [B, T, H*D] with num_heads
    for f, ref in zip(inputs, refs):                       # onnxruntime's RotaryEmbedding-23 and ours
        np.testing.assert_allclose(run_onnx(g, f)[g.outputs[0].name], ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(evaluate(g, f)[g.outputs[0].name], ref, atol=1e-5, rtol=1e-5)


def test_every_two_with_rotate_half_tables_is_refused():
    g = every_two_graph(tables="halves")
    assert any("repeats each column for a pair of dims" in r for r in _reasons(g)), _reasons(g)
    assert fuse(g) == 0


def test_hugging_face_gptj_export_fuses_interleaved(tmp_path):
    """PyTorch's legacy export of HF GPT-J (partial rotary on [B, T, H, D], repeat_interleave'd
    tables): every rotary becomes RotaryEmbedding{interleaved=1}, attention fuses with merged
    heads, and the outputs are onnxruntime's on the exported model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTJConfig(vocab_size=67, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                  n_inner=48, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.GPTJModel(cfg).eval()

    graph, exported = _export_and_fuse(hf, tmp_path / "gptj.onnx")
    hist = graph.op_histogram()
    assert "Neg" not in hist and hist.get("Attention") == 2, hist
    assert {n.attrs["interleaved"] for n in graph.nodes if n.op == "RotaryEmbedding"} == {1}
    assert all(n.inputs[0].type.rank == 3 for n in graph.nodes if n.op == "Attention")       # heads merged
    _check_against_export(graph, exported)

