"""Fusion passes on tiny graphs: what fires, what is refused (and why), and that values hold.

Positive cases cover tgraph's own layers and the spellings other exporters write
(scale before or after the matmul, Div or Mul, Pow or Mul squares, pre-transposed keys,
additive masks, fp32 softmax between casts, fp16 norms computed in float32 between
casts). The elementwise rules match canonical spellings, so their tests run
`canonicalize` first, as -O2 does. Every rewrite is checked numerically with
the reference interpreter and with onnxruntime (its own optimizer disabled).
"""
import math

import numpy as np
import pytest

from model_harness import run_onnx
from tgraph.dsl import InputSpec, LayerNorm, Module, MultiHeadAttention, RMSNorm, causal_mask
from tgraph.dsl import attention, gelu, gelu_tanh, padding_keep_mask, trace, where, lowest
from tgraph.dsl.tensor import Tensor, _op
from tgraph.ir import Builder, DType, TensorType
from tgraph.ir.evaluate import evaluate
from tgraph.passes import get_pass, optimize
from tgraph.passes.fuse_attention import AttentionRule, MergedHeadsRule
from tgraph.passes.fuse_elementwise import GeluRule, LayerNormRule, RMSNormRule, SoftmaxRule
from tgraph.passes.pattern import apply_rules, explain

RNG = np.random.default_rng(7)


class Fn(Module):
    """Wrap a function of named float inputs as a model."""

    def __init__(self, fn, **specs):
        super().__init__()
        self.fn, self.specs = fn, specs

    def input_specs(self):
        return self.specs

    def forward(self, **xs):
        out = self.fn(self, **xs)
        return out if isinstance(out, dict) else {"y": out}


def f32(*shape):
    return InputSpec(DType.float32, shape)


def feeds_for(graph, dims):
    out = {}
    for v in graph.inputs:
        shape = [dims.get(d, d) if isinstance(d, str) else d for d in v.shape]
        if v.dtype is DType.int64:
            out[v.name] = np.ones(shape, np.int64)
        elif v.dtype is DType.bool:
            out[v.name] = RNG.random(shape) > 0.3
        else:
            out[v.name] = RNG.standard_normal(shape).astype(np.float32)
    return out


def fuse_and_compare(model, pass_names, dims, expect, tol=1e-5, feeds=None):
    """Run the passes; assert the op histogram contains `expect` and values are unchanged."""
    graph = trace(model, model.input_specs())
    feeds = feeds or feeds_for(graph, dims)
    before = evaluate(graph, feeds)
    optimize(graph, pipeline=",".join(pass_names + ["dce"]))
    hist = graph.op_histogram()
    for op, n in expect.items():
        assert hist.get(op, 0) == n, hist
    after = evaluate(graph, feeds)
    onnx_out = run_onnx(graph, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], atol=tol, rtol=tol)
        np.testing.assert_allclose(onnx_out[name], before[name], atol=tol, rtol=tol)
    return graph


def canonical(graph):
    """What -O2 runs before the fusions, for tests that apply a rule directly."""
    get_pass("canonicalize")().run(graph)
    return graph


# ------------------------------------------------------------------------------ softmax
def _softmax_graph(stable=True, reuse_exp=False, axes2=(-1,)):
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float32, ("batch", 6)))
    src = b.op("Sub", x, b.op("ReduceMax", x, axes=[-1])) if stable else x
    e = b.op("Exp", src)
    y = b.op("Div", e, b.op("ReduceSum", e, axes=list(axes2)))
    b.graph.outputs = [y] + ([e] if reuse_exp else [])
    return b.graph


@pytest.mark.parametrize("stable", [True, False])
def test_fuse_softmax(stable):
    g = _softmax_graph(stable)
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    before = evaluate(g, {"x": x})
    counts = get_pass("fuse-softmax")().run(g)
    g.verify()
    assert counts == {"softmax": 1} and g.op_histogram() == {"Softmax": 1}
    np.testing.assert_allclose(evaluate(g, {"x": x})[g.outputs[0].name], list(before.values())[0], rtol=1e-6)


def test_softmax_refused_when_intermediate_is_used_elsewhere():
    g = _softmax_graph(reuse_exp=True)
    assert apply_rules(g, [SoftmaxRule()]) == {"softmax": 0}
    misses = explain(g, [SoftmaxRule()])
    assert any("graph output" in m.reason for m in misses), misses


def test_softmax_with_different_axes_fuses_only_the_exact_form():
    """ReduceMax over -1 but ReduceSum over 0: the max-subtracted form cannot match (its
    axes differ), but the plain form still does, as softmax over axis 0 of (x - max)."""
    g = _softmax_graph(axes2=(0,))
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    before = evaluate(g, {"x": x})
    assert apply_rules(g, [SoftmaxRule()]) == {"softmax": 1}
    node = next(n for n in g.nodes if n.op == "Softmax")
    assert node.attrs["axis"] == 0 and node.inputs[0].producer.op == "Sub"
    np.testing.assert_allclose(list(evaluate(g, {"x": x}).values())[0], list(before.values())[0], rtol=1e-6)


# ------------------------------------------------------------------------------ norms
def test_fuse_layer_norm_from_dsl():
    m = Fn(lambda self, x: self.ln(x), x=f32("batch", "seq", 16))
    m.ln = LayerNorm(16, eps=1e-6)
    g = fuse_and_compare(m, ["canonicalize", "fuse-layer-norm"], {"batch": 2, "seq": 3}, {"LayerNormalization": 1, "ReduceMean": 0})
    node = next(n for n in g.nodes if n.op == "LayerNormalization")
    assert node.attrs["epsilon"] == pytest.approx(1e-6)
    assert "LayerNormalization(%x, %ln.weight, %ln.bias)" in str(g)


@pytest.mark.parametrize("square,divide", [("pow", "recip"), ("mul", "recip"), ("pow", "div")])
def test_fuse_layer_norm_variants_without_affine(square, divide):
    def fn(self, x):
        d = x - x.mean(-1)
        var = ((d ** 2.0) if square == "pow" else d * d).mean(-1)
        std = (var + 1e-5).sqrt()
        return d * std.reciprocal() if divide == "recip" else d / std
    fuse_and_compare(Fn(fn, x=f32(4, 8)), ["canonicalize", "fuse-layer-norm"], {}, {"LayerNormalization": 1})


def test_layer_norm_over_a_middle_axis_is_refused_with_reason():
    def fn(self, x):
        d = x - x.mean(1)
        return d / ((d * d).mean(1) + 1e-5).sqrt()
    g = canonical(trace(Fn(fn, x=f32(2, 4, 8)), {"x": f32(2, 4, 8)}))
    assert apply_rules(g, [LayerNormRule()]) == {"layer-norm": 0}
    assert any("not the last one" in m.reason for m in explain(g, [LayerNormRule()]))


def test_fuse_rms_norm_from_dsl_and_hf_llama_form():
    m = Fn(lambda self, x: self.n(x), x=f32("batch", 12))
    m.n = RMSNorm(12, eps=1e-5)
    fuse_and_compare(m, ["canonicalize", "fuse-rms-norm"], {"batch": 3}, {"RMSNormalization": 1, "Sqrt": 0})

    class HF(Module):                                   # LlamaRMSNorm: w * (x * rsqrt(mean(x**2) + eps))
        def __init__(self):
            super().__init__()
            self.n = RMSNorm(12)

        def input_specs(self):
            return {"x": f32(2, 12)}

        def forward(self, x):
            var = (x ** 2.0).mean(-1)
            return {"y": self.n.weight * (x * (var + 1e-6).sqrt().reciprocal())}
    fuse_and_compare(HF(), ["canonicalize", "fuse-rms-norm"], {}, {"RMSNormalization": 1})


def _fp16_island_norm(kind, back=DType.float16, scale_inside=False, width=16):
    """HF LLaMA's fp16 RMSNorm (and the LayerNorm twin): x cast to float32, normalised,
    cast back, then the fp16 weight: ``w * (x32 * rsqrt(mean(x32**2) + eps)).to(fp16)``."""
    b = Builder()
    g = b.graph
    x = g.add_input("x", TensorType(DType.float16, ("batch", 3, width)))
    x32 = b.op("Cast", x, to=DType.float32)
    if kind == "layer":
        x32 = b.op("Sub", x32, b.op("ReduceMean", x32, axes=[-1]))
    ms = b.op("ReduceMean", b.op("Pow", x32, b.const(np.float32(2.0))), axes=[-1])
    n = b.op("Mul", x32, b.op("Reciprocal", b.op("Sqrt", b.op("Add", ms, b.const(np.float32(1e-6))))))
    gamma = RNG.normal(1, 0.2, width)
    if scale_inside:                                      # the weight applied in float32: not the ONNX op
        n = b.op("Mul", b.const(gamma.astype(np.float32)), n)
    y = b.op("Cast", n, to=back)
    if not scale_inside:
        y = b.op("Mul", b.const(gamma.astype(back.numpy)), y)
    if kind == "layer":
        y = b.op("Add", y, b.const(RNG.normal(0, 0.2, width).astype(back.numpy)))
    g.outputs = [b.op("Identity", y, hint="y")]
    g.verify()
    return g


def _reference(graph, feeds):
    """onnx's ReferenceEvaluator, which follows the spec's function bodies (stash_type)."""
    from onnx.reference import ReferenceEvaluator
    from tgraph.codegen.onnx import to_onnx
    return ReferenceEvaluator(to_onnx(graph)).run(None, feeds)[0]


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_fp16_float32_island_fuses_into_the_half_precision_norm(kind):
    """LayerNormalization/RMSNormalization compute in float32 (stash_type=1) and cast the
    normalised value back before the scale: exactly the island, so it fuses on the fp16 x."""
    g = _fp16_island_norm(kind)
    feeds = {"x": (RNG.standard_normal((2, 3, 16)) * 30).astype(np.float16)}
    ref = _reference(g, feeds)
    optimize(g, level=2)
    op = "RMSNormalization" if kind == "rms" else "LayerNormalization"
    assert g.op_histogram() == {op: 1}                    # both Casts gone
    (node,) = [n for n in g.nodes if n.op == op]
    assert node.inputs[0].dtype is DType.float16 and node.attrs.get("stash_type", 1) == 1
    # the spec's own evaluation of the fused op agrees to fp16 rounding (one ulp: ORT rounds once)
    for got in (_reference(g, feeds), run_onnx(g, feeds)["y"], evaluate(g, feeds)["y"]):
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_hf_llama_rms_norm_exported_in_fp16_fuses_and_matches_torch():
    """LlamaRMSNorm.half() as torch.onnx writes it (Cast, Pow, ReduceMean, Add, Sqrt,
    Div(1, ..), Mul, Cast, Mul) -> one fp16 RMSNormalization, with torch's numbers."""
    import io
    import warnings
    onnx = pytest.importorskip("onnx")
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from tgraph.onnx_import import import_onnx
    torch.manual_seed(0)
    norm = llama.LlamaRMSNorm(16, eps=1e-6).half().eval()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        x = (torch.randn(2, 3, 16) * 30).half()
        expected = norm(x).float().numpy()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(norm, (x,), f, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    g = import_onnx(onnx.load_from_string(f.getvalue()))
    assert "Cast" in g.op_histogram()
    optimize(g, level=2)
    assert g.op_histogram() == {"RMSNormalization": 1}
    got = run_onnx(g, {"x": x.numpy()})["y"]
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_fp16_island_with_the_scale_inside_fuses_in_float32():
    g = _fp16_island_norm("rms", scale_inside=True)
    feeds = {"x": (RNG.standard_normal((2, 3, 16)) * 30).astype(np.float16)}
    ref = _reference(g, feeds)
    optimize(g, level=2)
    (node,) = [n for n in g.nodes if n.op == "RMSNormalization"]
    assert node.inputs[0].dtype is DType.float32 and g.op_histogram()["Cast"] == 2
    np.testing.assert_allclose(run_onnx(g, feeds)["y"].astype(np.float32), ref.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_fp16_island_cast_back_to_another_dtype_is_refused_with_reason():
    g = canonical(_fp16_island_norm("rms", back=DType.bfloat16))
    assert apply_rules(g, [RMSNormRule()]) == {"rms-norm": 0}
    assert any("casts back to bfloat16" in m.reason for m in explain(g, [RMSNormRule()]))


def test_fp16_softmax_island_keeps_its_casts():
    b = Builder()
    x = b.graph.add_input("x", TensorType(DType.float16, ("batch", 6)))
    x32 = b.op("Cast", x, to=DType.float32)
    e = b.op("Exp", b.op("Sub", x32, b.op("ReduceMax", x32, axes=[-1])))
    b.graph.outputs = [b.op("Cast", b.op("Div", e, b.op("ReduceSum", e, axes=[-1])), to=DType.float16, hint="y")]
    feeds = {"x": (RNG.standard_normal((3, 6)) * 8).astype(np.float16)}
    ref = _reference(b.graph, feeds)
    optimize(b.graph, level=2)
    assert b.graph.op_histogram() == {"Cast": 2, "Softmax": 1}
    assert next(n for n in b.graph.nodes if n.op == "Softmax").inputs[0].dtype is DType.float32
    np.testing.assert_allclose(run_onnx(b.graph, feeds)["y"], ref, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------ GELU
@pytest.mark.parametrize("form", ["erf", "tanh", "gpt2", "erf-div"])
def test_fuse_gelu(form):
    def fn(self, x):
        if form == "erf":
            return gelu(x)
        if form == "tanh":
            return gelu_tanh(x)
        if form == "gpt2":                                  # 0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3)))
            return 0.5 * x * (1.0 + ((x + 0.044715 * (x ** 3.0)) * math.sqrt(2 / math.pi)).tanh())
        return x * ((x / math.sqrt(2.0)).erf() + 1.0) * 0.5
    g = fuse_and_compare(Fn(fn, x=f32(3, 9)), ["canonicalize", "fuse-gelu"], {}, {"Gelu": 1, "Erf": 0, "Tanh": 0})
    node = next(n for n in g.nodes if n.op == "Gelu")
    assert node.attrs.get("approximate", "none") == ("tanh" if form in ("tanh", "gpt2") else "none")


def test_gelu_with_wrong_constant_is_not_fused():
    g = canonical(trace(Fn(lambda self, x: x * 0.5 * ((x * 0.6).erf() + 1.0), x=f32(3)), {"x": f32(3)}))
    assert apply_rules(g, [GeluRule()]) == {"gelu": 0}


# ------------------------------------------------------------------------------ attention
def _attn_model(heads=4, kv_heads=4, causal=False, mask=False, bias=False, scale=None, d=32):
    class M(Module):
        def __init__(self):
            super().__init__()
            self.attn = MultiHeadAttention(d, heads, num_kv_heads=kv_heads, causal=causal, scale=scale)

        def input_specs(self):
            specs = {"x": f32("batch", "seq", d)}
            if mask:
                specs["attention_mask"] = InputSpec(DType.int64, ("batch", "seq"))
            if bias:
                specs["bias"] = f32(1, heads, "seq", "seq")
            return specs

        def forward(self, x, attention_mask=None, bias=None):
            keep = padding_keep_mask(attention_mask) if attention_mask is not None else None
            return {"y": self.attn(x, keep_mask=keep, bias=bias)}
    return M()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(causal=True),
    dict(causal=True, mask=True),
    dict(heads=4, kv_heads=2, causal=True, mask=True),          # grouped-query
    dict(heads=4, kv_heads=1, mask=True),                       # multi-query
    dict(scale=1.0, bias=True, mask=True),                      # T5: no scaling, position bias
], ids=["plain", "causal", "causal-padding", "gqa", "mqa", "t5-bias"])
def test_fuse_attention_dsl(kw):
    model = _attn_model(**kw)
    graph = trace(model, model.input_specs())
    feeds = feeds_for(graph, {"batch": 2, "seq": 5})
    if "attention_mask" in feeds:
        feeds["attention_mask"] = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    g = fuse_and_compare(model, ["fuse-attention", "causal-mask"], {}, {"Attention": 1, "Softmax": 0,
                                                                         "tgraph.CausalMask": 0}, feeds=feeds)
    node = next(n for n in g.nodes if n.op == "Attention")
    assert node.attrs["is_causal"] == int(kw.get("causal", False))
    expected_scale = 1.0 if kw.get("scale") == 1.0 else 1 / math.sqrt(32 // kw.get("heads", 4))
    assert node.attrs["scale"] == pytest.approx(expected_scale)


@pytest.mark.parametrize("variant", ["scale-q-before", "div-after", "pretransposed-k", "where-10000", "where-shared",
                                     "fp32-casts", "scale-q-and-kt", "two-biases"])
def test_fuse_attention_foreign_spellings(variant):
    def fn(self, q, k, v):
        if variant == "scale-q-before":
            s = (q * 0.25) @ k.swap_last()
        elif variant == "div-after":
            s = (q @ k.swap_last()) / 4.0
        elif variant == "pretransposed-k":                # k arrives as Kᵀ: (B, H, D, T)
            s = (q @ k) * 0.25
        elif variant == "where-10000":                   # contrib-style -10000 fill, mask from elsewhere
            s = where(k.sum(-1).swap_last() > -100.0, (q @ k.swap_last()) * 0.25, -10000.0)
        elif variant == "where-shared":                   # the mask reuses the scores: must be refused
            s0 = q @ k.swap_last()
            s = where(s0 > -100.0, s0 * 0.25, -10000.0)
        elif variant == "scale-q-and-kt":                 # torch SDPA's export: sqrt(scale) on each side
            s = (q * 0.5) @ (k.swap_last() * 0.5)
        elif variant == "two-biases":                     # T5: + position bias, then + padding mask
            s = ((q @ k.swap_last()) * 0.25 + k.sum(-1).swap_last()) + v.sum(-1).swap_last()
        else:
            s = ((q @ k.swap_last()) * 0.25).cast(DType.float32)
        p = s.softmax(-1)
        return p @ v
    kshape = (1, 2, 16, 6) if variant == "pretransposed-k" else (1, 2, 6, 16)
    m = Fn(fn, q=f32(1, 2, 6, 16), k=f32(*kshape), v=f32(1, 2, 6, 16))
    if variant == "where-shared":
        g = trace(m, m.input_specs())
        assert apply_rules(g, [AttentionRule()]) == {"attention": 0}
        assert any("used elsewhere" in x.reason for x in explain(g, [AttentionRule()]))
        return
    g = fuse_and_compare(m, ["fuse-attention"], {}, {"Attention": 1, "Softmax": 0, "Add": 1 if variant == "two-biases" else 0})
    assert next(n for n in g.nodes if n.op == "Attention").attrs["scale"] == pytest.approx(0.25)


def test_attention_on_repeated_kv_gets_the_kv_heads():
    """An Attention-23 that an exporter wrote on HF's repeat_kv (torch dynamo, opset 23) gets the
    un-repeated K/V: the op shares each K/V head among its group of query heads itself."""
    def fn(self, q, k, v):
        rep = [t.unsqueeze(2).expand([1, 2, 2, 6, 16]).reshape(1, 4, 6, 16) for t in (k, v)]
        return Tensor(_op("Attention", q._value(), rep[0]._value(), rep[1]._value(), scale=0.25, is_causal=1))
    m = Fn(fn, q=f32(1, 4, 6, 16), k=f32(1, 2, 6, 16), v=f32(1, 2, 6, 16))
    g = fuse_and_compare(m, ["fuse-attention"], {}, {"Attention": 1, "Expand": 0})
    att = next(n for n in g.nodes if n.op == "Attention")
    assert att.inputs[1].shape[1] == att.inputs[2].shape[1] == 2 and att.attrs["is_causal"] == 1


def test_attention_with_probabilities_returned_is_refused():
    def fn(self, q, k, v):
        p = ((q @ k.swap_last()) * 0.25).softmax(-1)
        return {"y": p @ v, "probs": p}
    g = trace(Fn(fn, q=f32(1, 2, 4, 8), k=f32(1, 2, 4, 8), v=f32(1, 2, 4, 8)),
              {"q": f32(1, 2, 4, 8), "k": f32(1, 2, 4, 8), "v": f32(1, 2, 4, 8)})
    assert apply_rules(g, [AttentionRule()]) == {"attention": 0}
    assert any("graph output" in x.reason for x in explain(g, [AttentionRule()]))


# ------------------------------------------------------------------------------ causal masking
def _cross_causal(tq="q", tk="k"):
    """Causal attention where Tq and Tk are different symbols (a cache-like layout)."""
    def fn(self, q, k, v):
        return attention(q, k, v, scale=0.25, causal=True)
    return Fn(fn, q=f32(1, 2, tq, 8), k=f32(1, 2, tk, 8), v=f32(1, 2, tk, 8))


def test_causal_with_unequal_lengths_fuses_with_an_end_aligned_mask():
    """Tq != Tk (a KV cache's past): is_causal (upper-left) would be wrong, so the fused op
    gets the end-aligned causal mask explicitly; query i sees keys j <= i + Tk - Tq."""
    m = _cross_causal()
    g = trace(m, m.input_specs())
    feeds = {"q": RNG.standard_normal((1, 2, 3, 8)).astype(np.float32),
             "k": RNG.standard_normal((1, 2, 5, 8)).astype(np.float32)}
    feeds["v"] = feeds["k"].copy()
    before = evaluate(g, feeds)["y"]
    optimize(g, level=2)
    hist = g.op_histogram()
    assert "tgraph.CausalMask" not in hist and hist.get("Attention") == 1
    (att,) = [n for n in g.nodes if n.op == "Attention"]
    assert att.attrs["is_causal"] == 0 and len(att.inputs) == 4 and att.inputs[3].type.dtype.name == "bool"
    s = feeds["q"] @ feeds["k"].swapaxes(-1, -2) * 0.25
    s = np.where(np.arange(5)[None] <= np.arange(3)[:, None] + 2, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ feeds["v"]
    np.testing.assert_allclose(before, ref, atol=1e-5)
    np.testing.assert_allclose(run_onnx(g, feeds)["y"], ref, atol=1e-5)
    np.testing.assert_allclose(evaluate(g, feeds)["y"], ref, atol=1e-5)


def test_masked_positions_get_exactly_zero_probability_and_full_masks_give_no_nan():
    def fn(self, s, attention_mask):
        keep = padding_keep_mask(attention_mask)
        return {"p": where(keep, causal_mask(s),
                           lowest(DType.float32)).softmax(-1)}
    m = Fn(fn, s=f32(2, 1, 4, 4), attention_mask=InputSpec(DType.int64, (2, 4)))
    g = trace(m, m.input_specs())
    optimize(g, level=2)                                    # causal-mask makes the mask explicit
    assert "tgraph.CausalMask" not in g.op_histogram()
    s = (RNG.standard_normal((2, 1, 4, 4)) * 50).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.int64)          # second row: nothing to attend to
    p = run_onnx(g, {"s": s, "attention_mask": mask})["p"]
    upper = np.triu(np.ones((4, 4), bool), 1)
    assert np.all(p[0, 0][upper] == 0.0)
    assert not np.isnan(p).any()


def test_fp16_causal_attention_does_not_overflow():
    def fn(self, q, k, v):
        return attention(q, k, v, scale=0.25, causal=True)
    m = Fn(fn, q=InputSpec(DType.float16, (1, 1, 4, 8)), k=InputSpec(DType.float16, (1, 1, 4, 8)),
           v=InputSpec(DType.float16, (1, 1, 4, 8)))
    feeds = {n: (RNG.standard_normal((1, 1, 4, 8)) * 30).astype(np.float16) for n in "qkv"}
    for level in (0, 2):
        g = trace(m, m.input_specs())
        optimize(g, level=level)
        assert np.isfinite(run_onnx(g, feeds)["y"]).all(), level


# ------------------------------------------------------------------------------ merged heads
def test_attention_between_head_split_and_merge_becomes_3d():
    model = _attn_model(heads=4, kv_heads=2, causal=True, mask=True)
    graph = trace(model, model.input_specs())
    feeds = feeds_for(graph, {"batch": 2, "seq": 5})
    feeds["attention_mask"] = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    g = fuse_and_compare(model, ["fuse-attention"], {}, {"Attention": 1, "Transpose": 0, "Reshape": 0}, feeds=feeds)
    node = next(n for n in g.nodes if n.op == "Attention")
    assert node.inputs[0].type.rank == 3
    assert (node.attrs["q_num_heads"], node.attrs["kv_num_heads"]) == (4, 2)


def test_heads_stay_split_when_the_4d_key_is_used_elsewhere():
    def fn(self, q, k, v):
        qh, kh, vh = (t.reshape(0, 0, 2, 8).transpose(0, 2, 1, 3) for t in (q, k, v))
        y = attention(qh, kh, vh, scale=0.25).transpose(0, 2, 1, 3).reshape(0, 0, 16)
        return {"y": y, "present_key": kh}                     # as a KV cache's present output does
    m = Fn(fn, q=f32(1, 3, 16), k=f32(1, 3, 16), v=f32(1, 3, 16))
    g = fuse_and_compare(m, ["fuse-attention"], {}, {"Attention": 1})
    assert next(n for n in g.nodes if n.op == "Attention").inputs[0].type.rank == 4
    assert any("graph output" in x.reason or "used elsewhere" in x.reason
               for x in explain(trace(m, m.input_specs()), [AttentionRule(), MergedHeadsRule()]))
