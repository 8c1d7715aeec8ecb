"""Property tests for the fusions: random attention and norm subgraphs in, same numbers out.

Hypothesis draws the shapes (batch, heads, grouped KV heads, lengths, head size), the
spelling (scale before or after the matmul, Mul or Div), the masks (causal, padding,
additive bias) and the values; the fused graph must contain the fused op, verify, and
give the interpreter's pre-fusion values on onnxruntime (its own optimizer off) and on
the reference kernels.
"""
import math
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_harness import run_onnx
from tgraph.dsl import InputSpec, Module, attention, causal_mask, padding_keep_mask, where, lowest
from tgraph.dsl import trace
from tgraph.ir import DType
from tgraph.ir.evaluate import evaluate
from tgraph.passes import optimize

#: TGRAPH_PROPERTY_EXAMPLES=500 for a longer hunt than CI's
SETTINGS = settings(max_examples=int(os.environ.get("TGRAPH_PROPERTY_EXAMPLES", 25)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Fn(Module):
    def __init__(self, fn, specs):
        super().__init__()
        self.fn, self.specs = fn, specs

    def input_specs(self):
        return self.specs

    def forward(self, **xs):
        return {"y": self.fn(**xs)}


def _check(model, feeds, fused_op, count=1):
    graph = trace(model, model.input_specs())
    before = evaluate(graph, feeds)["y"]
    optimize(graph, level=2)
    graph.verify()
    assert graph.op_histogram().get(fused_op, 0) == count, graph.op_histogram()
    np.testing.assert_allclose(evaluate(graph, feeds)["y"], before, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(run_onnx(graph, feeds)["y"], before, atol=2e-5, rtol=1e-4)


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2]))
    return dict(batch=draw(st.integers(1, 2)), heads=kv_heads * group, kv_heads=kv_heads,
                seq=draw(st.integers(1, 6)), dim=draw(st.sampled_from([4, 8])),
                causal=draw(st.booleans()), padding=draw(st.booleans()), bias=draw(st.booleans()),
                scale_form=draw(st.sampled_from(["mul-after", "div-after", "mul-q", "none"])),
                seed=draw(st.integers(0, 2**16)))


@given(attention_cases())
@SETTINGS
def test_random_attention_fuses_and_keeps_values(case):
    b, h, hk, t, d = case["batch"], case["heads"], case["kv_heads"], case["seq"], case["dim"]
    rng = np.random.default_rng(case["seed"])

    def fn(q, k, v, attention_mask=None, bias=None):
        if case["scale_form"] == "mul-q":                       # scale folded into q before the matmul
            q, scale = q * 0.3, 1.0
        elif case["scale_form"] == "none":
            scale = 1.0
        else:
            scale = 0.3
        keep = padding_keep_mask(attention_mask) if attention_mask is not None else None
        if case["scale_form"] == "div-after" and hk == h:       # spelled by hand: (q @ kᵀ) / (1/0.3)
            s = (q @ k.swap_last()) / (1 / 0.3)
            if bias is not None:
                s = s + bias
            if case["causal"]:
                s = causal_mask(s)
            if keep is not None:
                s = where(keep, s, lowest(DType.float32))
            return s.softmax(-1) @ v
        return attention(q, k, v, scale=scale, causal=case["causal"], keep_mask=keep, bias=bias)

    specs = {"q": InputSpec(DType.float32, ("batch", h, "seq", d)),
             "k": InputSpec(DType.float32, ("batch", hk, "seq", d)),
             "v": InputSpec(DType.float32, ("batch", hk, "seq", d))}
    feeds = {n: rng.standard_normal((b, s[1], t, d)).astype(np.float32) for n, s in
             (("q", (b, h)), ("k", (b, hk)), ("v", (b, hk)))}
    if case["padding"]:
        specs["attention_mask"] = InputSpec(DType.int64, ("batch", "seq"))
        mask = np.ones((b, t), np.int64)
        mask[0, rng.integers(1, t + 1):] = 0                  # pad the first row on the right (>= 1 real token)
        feeds["attention_mask"] = mask
    if case["bias"] and hk == h:                              # an additive (T5-style) position bias
        specs["bias"] = InputSpec(DType.float32, (1, h, "seq", "seq"))
        feeds["bias"] = rng.standard_normal((1, h, t, t)).astype(np.float32)

    def forward(**xs):
        return fn(**xs)
    _check(Fn(forward, specs), feeds, "Attention")


@given(st.sampled_from(["layer", "rms"]), st.sampled_from(["mul", "pow"]), st.booleans(),
       st.floats(1e-12, 1e-3), st.integers(0, 2**16))
@SETTINGS
def test_random_norms_fuse_and_keep_values(kind, square, affine, eps, seed):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(2, 24))
    gamma = rng.standard_normal(width).astype(np.float32)
    beta = rng.standard_normal(width).astype(np.float32)

    def fn(x):
        from tgraph.dsl import tensor
        if kind == "layer":
            d = x - x.mean(-1)
            var = ((d ** 2.0) if square == "pow" else d * d).mean(-1)
            y = d / (var + eps).sqrt()
            return y * tensor(gamma) + tensor(beta) if affine else y
        ms = ((x ** 2.0) if square == "pow" else x * x).mean(-1)
        return x * (ms + eps).sqrt().reciprocal() * tensor(gamma)

    feeds = {"x": (rng.standard_normal((2, 3, width)) * rng.uniform(0.1, 10)).astype(np.float32)}
    _check(Fn(fn, {"x": InputSpec(DType.float32, ("batch", 3, width))}), feeds,
           "LayerNormalization" if kind == "layer" else "RMSNormalization")


# ------------------------------------------------------------------ spellings of the elementwise formulas
# Each case writes one formula the way some exporter might: Div or Mul by a reciprocal,
# Pow or Mul squares, constants on either side, with or without the affine tail, in
# float32 or in a float16 graph (norms and softmax computed in float32 between Casts, as
# HF LLaMA does in fp16). -O2 (canonicalize, then the fusions) must leave the fused op and
# the unfused graph's numbers, on onnxruntime and on the interpreter.
F32, F16 = DType.float32, DType.float16


class Spell:
    """Builds a graph, drawing each spelling choice from hypothesis."""

    def __init__(self, draw, dtype=F32):
        from tgraph.ir import Builder
        self.draw, self.b = draw, Builder()
        self.dtype = dtype

    def pick(self, *options):
        return self.draw(st.sampled_from(options))

    def const(self, value, dtype=None):
        """A scalar, as a 0-d or a 1-element constant."""
        arr = np.asarray(value, (dtype or self.dtype).numpy)
        return self.b.const(arr.reshape(self.pick((), (1,))))

    def op(self, name, *ins, **attrs):
        return self.b.op(name, *ins, **attrs)

    def output(self, y):
        """`y` as the graph's output "y"."""
        self.b.graph.outputs = [self.b.op("Identity", y, hint="y")]
        return self.b.graph

    def commuted(self, name, a, c):
        """Mul/Add with the operands in either order."""
        return self.op(name, a, c) if self.pick(True, False) else self.op(name, c, a)

    def square(self, v):
        return self.op("Mul", v, v) if self.pick("mul", "pow") == "mul" else self.op("Pow", v, self.const(2.0))

    def sqrt(self, v):
        return self.op("Sqrt", v) if self.pick("sqrt", "pow") == "sqrt" else self.op("Pow", v, self.const(0.5))

    def divide(self, num, den):
        style = self.pick("div", "reciprocal", "one-div")
        if style == "div":
            return self.op("Div", num, den)
        r = self.op("Reciprocal", den) if style == "reciprocal" else self.op("Div", self.const(1.0), den)
        return self.commuted("Mul", num, r)

    def reduce(self, op, v, axis):
        return self.op(op, v, axes=[axis], keepdims=1)


def _run_case(graph, feeds, fused_op, gone, tol):
    graph.verify()
    before_ort = run_onnx(graph, feeds)["y"]
    before = evaluate(graph, feeds)["y"]
    optimize(graph, level=2)
    graph.verify()
    hist = graph.op_histogram()
    assert hist.get(fused_op, 0) == 1, hist
    assert not set(gone) & set(hist), hist
    np.testing.assert_allclose(np.asarray(evaluate(graph, feeds)["y"], np.float32), np.asarray(before, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(run_onnx(graph, feeds)["y"], np.float32),
                               np.asarray(before_ort, np.float32), **tol)
    return graph


def _tol(dtype):
    return dict(atol=2e-5, rtol=1e-4) if dtype is F32 else dict(atol=1e-2, rtol=1e-2)


@st.composite
def norm_cases(draw, kind):
    """(graph, feeds, fp16 island?) for LayerNorm or RMSNorm in a random spelling."""
    from tgraph.ir import TensorType
    half = draw(st.booleans())
    outer = F16 if half else F32
    s = Spell(draw, F32)
    width = draw(st.integers(2, 24))
    rank = draw(st.sampled_from([2, 3]))
    shape = (2, 3, width)[-rank:]
    x_in = s.b.graph.add_input("x", TensorType(outer, ("batch",) + shape[1:]))
    x = s.op("Cast", x_in, to=F32) if half else x_in
    eps = draw(st.floats(1e-12, 1e-3))
    axis = s.pick(-1, rank - 1)                      # the last axis, as exporters write it
    if kind == "layer":
        d = s.op("Sub", x, s.reduce("ReduceMean", x, axis))
        var = s.reduce("ReduceMean", s.square(d), axis)
        y = s.divide(d, s.sqrt(s.commuted("Add", var, s.const(eps))))
    else:
        ms = s.reduce("ReduceMean", s.square(x), axis)
        y = s.divide(x, s.sqrt(s.commuted("Add", ms, s.const(eps))))
    if half:
        y = s.op("Cast", y, to=F16)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tail = "gamma" if kind == "rms" else draw(st.sampled_from(["none", "gamma", "gamma+beta", "beta"]))
    if "gamma" in tail:
        y = s.commuted("Mul", y, s.b.const(rng.standard_normal(width).astype(outer.numpy)))
    if "beta" in tail:
        y = s.commuted("Add", y, s.b.const(rng.standard_normal(width).astype(outer.numpy)))
    feeds = {"x": (rng.standard_normal((2,) + shape[1:]) * rng.uniform(0.1, 10)).astype(outer.numpy)}
    return s.output(y), feeds, outer


@given(st.sampled_from(["layer", "rms"]).flatmap(lambda k: st.tuples(st.just(k), norm_cases(k))))
@SETTINGS
def test_random_norm_spellings_fuse_and_keep_values(case):
    kind, (graph, feeds, dtype) = case
    op = "LayerNormalization" if kind == "layer" else "RMSNormalization"
    g = _run_case(graph, feeds, op, ("ReduceMean", "Sqrt", "Pow", "Reciprocal"), _tol(dtype))
    (node,) = [n for n in g.nodes if n.op == op]
    assert node.inputs[0].dtype is dtype              # an fp16 island fuses into the fp16 op (stash_type=1)
    assert "Cast" not in g.op_histogram()


@st.composite
def softmax_cases(draw):
    """Softmax with or without the max, Div or Mul by the reciprocal of the sum, in float32
    or between Casts in a float16 graph (the Casts stay: ONNX's fp16 Softmax promises no
    float32 accumulation)."""
    from tgraph.ir import TensorType
    s = Spell(draw, F32)
    half = draw(st.booleans())
    outer = F16 if half else F32
    rank = draw(st.sampled_from([2, 3]))
    shape = (2, 3, draw(st.integers(1, 9)))[-rank:]
    axis = s.pick(-1, rank - 1)
    x_in = s.b.graph.add_input("x", TensorType(outer, ("batch",) + shape[1:]))
    x = s.op("Cast", x_in, to=F32) if half else x_in
    if draw(st.booleans()):
        x = s.op("Sub", x, s.reduce("ReduceMax", x, axis))
    e = s.op("Exp", x)
    y = s.divide(e, s.reduce("ReduceSum", e, axis))
    if half:
        y = s.op("Cast", y, to=F16)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = {"x": (rng.standard_normal((2,) + shape[1:]) * 3).astype(outer.numpy)}
    return s.output(y), feeds, outer


@given(softmax_cases())
@SETTINGS
def test_random_softmax_spellings_fuse_and_keep_values(case):
    graph, feeds, dtype = case
    g = _run_case(graph, feeds, "Softmax", ("Exp", "ReduceSum", "ReduceMax", "Reciprocal"), _tol(dtype))
    (node,) = [n for n in g.nodes if n.op == "Softmax"]
    assert node.inputs[0].dtype is F32


@st.composite
def gelu_cases(draw):
    """GELU's erf and tanh forms with the 0.5 anywhere, x/√2 or x·(1/√2), 0.5· or /2,
    constants on either side, in float32 or float16."""
    from tgraph.ir import TensorType
    dtype = draw(st.sampled_from([F32, F16]))
    s = Spell(draw, dtype)
    x = s.b.graph.add_input("x", TensorType(dtype, ("batch", draw(st.integers(1, 9)))))
    form = s.pick("erf", "tanh")
    if form == "erf":
        inner = s.op("Div", x, s.const(math.sqrt(2.0))) if s.pick(True, False) else \
            s.commuted("Mul", x, s.const(1 / math.sqrt(2.0)))
        act = s.commuted("Add", s.op("Erf", inner), s.const(1.0))
    else:
        cube = s.op("Pow", x, s.const(3.0))
        poly = s.commuted("Add", x, s.commuted("Mul", cube, s.const(0.044715)))
        act = s.commuted("Add", s.op("Tanh", s.commuted("Mul", poly, s.const(math.sqrt(2 / math.pi)))), s.const(1.0))

    def half(v):
        return s.op("Div", v, s.const(2.0)) if s.pick(True, False) else s.commuted("Mul", v, s.const(0.5))
    where = s.pick("x", "act", "outside")
    if where == "x":
        y = s.commuted("Mul", half(x), act)
    elif where == "act":
        y = s.commuted("Mul", x, half(act))
    else:
        y = half(s.commuted("Mul", x, act))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    feeds = {"x": (rng.standard_normal((3, x.shape[1])) * 2).astype(dtype.numpy)}
    return s.output(y), feeds, dtype, form


@given(gelu_cases())
@SETTINGS
def test_random_gelu_spellings_fuse_and_keep_values(case):
    graph, feeds, dtype, form = case
    g = _run_case(graph, feeds, "Gelu", ("Erf", "Tanh", "Pow"), _tol(dtype))
    (node,) = [n for n in g.nodes if n.op == "Gelu"]
    assert node.attrs.get("approximate", "none") == ("tanh" if form == "tanh" else "none")
