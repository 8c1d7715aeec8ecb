"""Property tests for the fusions: random attention and norm subgraphs in, same numbers out.

Hypothesis draws the shapes (batch, heads, grouped KV heads, lengths, head size), the
spelling (scale before or after the matmul, Mul or Div), the masks (causal, padding,
additive bias) and the values; the fused graph must contain the fused op, verify, and
give the interpreter's pre-fusion values on onnxruntime (its own optimizer off) and on
the reference kernels.
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_harness import run_onnx
from tgraph.dsl import InputSpec, Module, attention, causal_mask, padding_keep_mask, where, lowest
from tgraph.dsl import trace
from tgraph.ir import DType
from tgraph.ir.evaluate import evaluate
from tgraph.passes import optimize

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
