"""Table-driven op tests: every op in the op table, three oracles.

Each case builds a one-node graph with `Builder`, exports it with `to_onnx` and runs
(a) the op table's NumPy kernel, (b) `onnx.reference.ReferenceEvaluator`, (c)
onnxruntime on CPU with its graph optimizer off, so ORT cannot rewrite the lowering.
All three must agree, the inferred output types must match what actually comes out,
and the exported model must pass `onnx.checker` with full shape inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from tgraph.codegen.onnx import DEFAULT_OPSET, LOWERINGS, to_onnx
from tgraph.ir import OPS, Builder, DType, TensorType

RNG = np.random.default_rng(1234)
I64_MAX = np.iinfo(np.int64).max


def f32(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, size=shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


def scalar(value, dtype=np.int64):
    return np.array(value, dtype=dtype)


@dataclass
class Case:
    op: str                                   # qualified name, e.g. "tgraph.CausalMask"
    inputs: Sequence[Optional[np.ndarray]]
    attrs: Dict[str, Any] = field(default_factory=dict)
    const: Tuple[int, ...] = ()               # inputs baked into the graph as constants
    sym: Dict[int, tuple] = field(default_factory=dict)   # input index -> dims with symbols
    opsets: Tuple[int, ...] = (DEFAULT_OPSET,)
    tol: float = 1e-5
    name: str = ""
    ref_bug: str = ""                         # why onnx.reference is not an oracle for this case

    @property
    def id(self) -> str:
        return f"{self.op}-{self.name}" if self.name else self.op


def C(op, *inputs, const=(), sym=None, opsets=(DEFAULT_OPSET,), tol=1e-5, name="", ref_bug="", **attrs):
    return Case(op, list(inputs), attrs, tuple(const), dict(sym or {}), tuple(opsets), tol, name, ref_bug)


# onnx 1.23's reference Slice uses Python slicing; the spec (and ORT, and ONNX shape
# inference) clamp a negative-step start below -dim to 0, which keeps element 0.
SLICE_REF_BUG = "onnx.reference Slice does not clamp a negative-step start to [0, dim-1]"


ALL_OPSETS = (17, 18, DEFAULT_OPSET, 25)   # where the lowering depends on the opset


def nbits(K, N, bits, block, symmetric=False):
    """(B, scales, zero_points or None, bias) of a random [K, N] weight, as MatMulNBits stores them."""
    from tgraph.passes.quantize import matmul_nbits_inputs, quantize_weight

    return (*matmul_nbits_inputs(quantize_weight(f32(K, N), bits, block, symmetric)), f32(N))

CASES = [
    C("Add", f32(2, 3), f32(3), name="broadcast"),
    C("Add", i64(1, -2, 3), i64(4, 5, -6), name="int64"),
    C("Add", f32(4, 3), f32(3), sym={0: ("batch", 3)}, name="symbolic"),
    C("Sub", f32(2, 3), f32(2, 1)),
    C("Sub", np.array([5, -3], np.int32), np.array([7, 2], np.int32), name="int32"),
    C("Mul", f32(2, 3, 4), f32(4)),
    C("Div", f32(2, 3), f32(2, 3, lo=0.5, hi=2.0)),
    C("Div", i64(7, -7, 7, -7, 6, 0), i64(2, 2, -2, -2, 3, 5), name="int64-truncates"),
    C("Pow", f32(2, 3, lo=0.1, hi=3.0), np.array(2.0, np.float32), const=(1,), name="square"),
    C("Pow", f32(2, 3, lo=0.1, hi=3.0), f32(2, 3, lo=-1.5, hi=1.5), name="general"),
    C("MatMul", f32(2, 3, 4), f32(4, 5)),
    C("MatMul", f32(4), f32(4, 5), name="vector"),
    C("MatMul", f32(2, 1, 3, 4), f32(3, 4, 2), name="batch-broadcast"),
    C("MatMul", f32(2, 5, 4), f32(4, 3), sym={0: ("batch", "seq", 4)}, name="symbolic"),
    C("Gemm", f32(3, 4), f32(4, 5), f32(5), alpha=0.5, beta=2.0, name="bias"),
    C("Gemm", f32(4, 3), f32(5, 4), transA=1, transB=1, name="transposed"),
    C("Sqrt", f32(2, 3, lo=0.0, hi=4.0)),
    C("Reciprocal", f32(2, 3, lo=0.5, hi=3.0)),
    C("Neg", f32(2, 3)),
    C("Neg", i64(1, -2, 0), name="int64"),
    C("Exp", f32(2, 3)),
    C("Log", f32(2, 3, lo=0.01, hi=5.0)),
    C("Erf", np.linspace(-4, 4, 41, dtype=np.float32)),
    C("Tanh", f32(2, 3, lo=-5, hi=5)),
    C("Sigmoid", f32(2, 3, lo=-8, hi=8)),
    C("Relu", f32(2, 3)),
    C("Cos", f32(2, 3, lo=-4, hi=4)),
    C("Sin", f32(2, 3, lo=-4, hi=4)),
    C("Identity", f32(2, 3)),
    C("Identity", np.array([True, False]), name="bool"),
    C("Not", np.array([[True, False], [False, False]])),
    C("And", np.array([True, True, False, False]), np.array([True, False, True, False])),
    C("Or", np.array([True, True, False, False]), np.array([True, False, True, False])),
    C("Equal", i64(1, 2, 3), i64(1, 0, 3)),
    C("Equal", np.array([1.0, 2.5], np.float32), np.array([1.0, 2.0], np.float32), name="float"),
    C("Less", f32(2, 3), f32(3)),
    C("Less", i64(1, 5, 3), i64(2, 5, 1), name="int64"),
    C("Greater", f32(2, 3), f32(2, 1)),
    C("LessOrEqual", i64(1, 5, 3), i64(2, 5, 1)),
    C("GreaterOrEqual", f32(2, 3), f32(2, 1)),
    C("GreaterOrEqual", i64(1, 5, 3), i64(2, 5, 1), name="int64"),
    C("IsNaN", np.array([1.0, np.nan, -np.inf, 0.0], np.float32)),
    C("Flatten", f32(2, 3, 4), axis=2),
    C("Flatten", f32(2, 3, 4), axis=0, name="axis0"),
    C("Flatten", f32(2, 3, 4), axis=-1, name="negative-axis"),
    C("GatherElements", f32(3, 4), np.array([[0, 3], [2, -1], [1, 1]], np.int64), axis=1),
    C("GatherND", f32(3, 4, 2), np.array([[0, 3], [2, -1]], np.int64)),
    C("GatherND", f32(2, 3, 4), np.array([[[1], [0]], [[2], [2]]], np.int64), batch_dims=1, name="batch-dims"),
    C("Max", f32(2, 3), f32(3)),
    C("Max", i64(1, 5, 3), i64(2, 5, 1), i64(0, 7, 0), name="three-int64"),
    C("Softmax", f32(2, 3, 5, lo=-5, hi=5)),
    C("Softmax", f32(2, 3, 5), axis=1, name="axis1"),
    *[C(op, f32(2, 3, 4), axes=[-1], opsets=ALL_OPSETS, name="last")
      for op in ("ReduceMean", "ReduceSum", "ReduceMax")],
    *[C(op, f32(2, 3, 4), axes=[0, 2], keepdims=0, opsets=ALL_OPSETS, name="two-axes")
      for op in ("ReduceMean", "ReduceSum", "ReduceMax")],
    *[C(op, f32(2, 3), opsets=ALL_OPSETS, name="all") for op in ("ReduceMean", "ReduceSum", "ReduceMax")],
    *[C(op, f32(2, 3), axes=[], opsets=ALL_OPSETS, name="none") for op in ("ReduceMean", "ReduceSum", "ReduceMax")],
    C("ReduceMean", f32(2, 5, 8), axes=[-1], sym={0: ("batch", "seq", 8)}, name="symbolic"),
    C("Transpose", f32(2, 3, 4), perm=[0, 2, 1]),
    C("Transpose", f32(2, 3, 4), name="reverse"),
    C("Reshape", f32(2, 3, 4), i64(0, -1), const=(1,)),
    C("Reshape", f32(2, 3, 4), i64(4, 6), name="dynamic-shape"),
    C("Reshape", f32(3, 8), i64(0, 2, 4), const=(1,), sym={0: ("batch", 8)}, name="symbolic"),
    C("Squeeze", f32(2, 1, 3, 1), axes=[1]),
    C("Squeeze", f32(2, 1, 3, 1), name="all-ones"),
    C("Unsqueeze", f32(2, 3), axes=[0, -1]),
    C("Expand", f32(3, 1), i64(2, 3, 4), const=(1,)),
    C("Expand", f32(3, 1), i64(3, 5), name="dynamic-shape"),
    C("Concat", f32(2, 1), f32(2, 3), f32(2, 2), axis=1),
    C("Concat", i64(1, 2), i64(3), axis=-1, name="int64"),
    C("Split", f32(2, 5), axis=1, split=[2, 3], opsets=ALL_OPSETS, name="sizes"),
    C("Split", f32(6, 2), num_outputs=3, opsets=ALL_OPSETS, name="num-outputs"),
    C("Slice", f32(4, 6), i64(1, 0), i64(3, -1), const=(1, 2)),
    C("Slice", f32(4, 6), i64(-1), i64(-I64_MAX), i64(1), i64(-2), const=(1, 2, 3, 4), name="reverse"),
    C("Slice", f32(5), i64(-10), i64(-20), i64(0), i64(-1), const=(1, 2, 3, 4), name="clamped-negative-step",
      ref_bug=SLICE_REF_BUG),
    C("Slice", f32(5), i64(10), i64(2), i64(0), i64(-1), const=(1, 2, 3, 4), name="start-past-end"),
    C("Slice", f32(3, 7), i64(2), i64(I64_MAX), i64(-1), const=(1, 2, 3), name="to-end"),
    C("Slice", f32(3, 7), i64(1), i64(5), i64(1), i64(2), name="dynamic"),
    C("Gather", f32(5, 3), i64(4, 0, -1)),
    C("Gather", f32(2, 5), np.array([[0, 1], [4, 3]], np.int32), axis=1, name="int32-2d"),
    C("Gather", f32(5, 3), scalar(2), const=(1,), name="scalar"),
    C("Where", np.array([[True], [False]]), f32(2, 3), f32(3)),
    C("Cast", np.array([-2.7, -0.5, 0.5, 3.9], np.float32), to=DType.int64, name="float-to-int"),
    C("Cast", f32(2, 3), to=DType.float16, name="to-fp16"),
    C("Cast", i64(3, -4), to=DType.float32, name="int-to-float"),
    C("Cast", np.array([True, False]), to=DType.float32, name="bool-to-float"),
    C("Cast", np.array([0.0, 2.5], np.float32), to=DType.bool, name="float-to-bool"),
    C("Trilu", f32(3, 4)),
    C("Trilu", f32(2, 4, 3), scalar(-1), upper=0, const=(1,), name="lower-k"),
    C("Shape", f32(2, 3, 4)),
    C("Shape", f32(2, 3, 4), start=1, name="start"),
    C("Shape", f32(2, 3, 4), start=-2, end=-1, name="start-end"),
    C("ConstantOfShape", i64(2, 3), const=(0,)),
    C("ConstantOfShape", i64(2, 3), value=np.array([7], np.int64), name="int64-input"),
    C("Range", scalar(0), scalar(10), scalar(3), const=(0, 1, 2)),
    C("Range", scalar(1.0, np.float32), scalar(2.0, np.float32), scalar(0.25, np.float32), const=(0, 1, 2),
      name="float"),
    C("Range", scalar(5), scalar(-3), scalar(-2), name="dynamic-negative"),
    C("CumSum", i64(1, 0, 1, 1, 0, 1, 1, 1).reshape(2, 4), axis=1, name="int64"),
    C("CumSum", f32(2, 3, 4), axis=-2, exclusive=1, name="exclusive"),
    C("CumSum", f32(3, 5), axis=0, reverse=1, name="reverse"),
    C("CumSum", f32(2, 5), axis=1, exclusive=1, reverse=1, sym={0: ("batch", 5)}, name="exclusive-reverse"),
    # ops read from other exporters' graphs (tgraph.ir.opdefs_more)
    C("Abs", f32(2, 3)), C("Ceil", f32(2, 3)), C("Floor", f32(2, 3)),
    C("Round", np.array([0.5, 1.5, 2.5, -0.5, -1.7], np.float32)), C("Sign", f32(2, 3)),
    C("IsInf", np.array([1.0, np.inf, -np.inf, np.nan], np.float32), detect_negative=0),
    C("Mod", i64(7, -7, 7, -7), i64(3, 3, -3, -3)),
    C("Mod", f32(2, 3), f32(3, lo=0.5, hi=1.5), fmod=1, name="fmod"),
    C("Xor", np.array([True, True, False]), np.array([True, False, False])),
    C("Min", f32(2, 3), f32(3), f32(2, 1)), C("Sum", f32(2, 3), f32(3)), C("Mean", f32(2, 3), f32(2, 3), f32(3)),
    C("Clip", f32(2, 3), scalar(-0.5, np.float32), scalar(0.5, np.float32), const=(1, 2)),
    C("Clip", f32(2, 3), None, scalar(0.5, np.float32), name="max-only"),
    C("Size", f32(2, 3, 4)),
    C("CastLike", f32(2, 3), np.array([1], np.int32)),
    C("ArgMax", np.array([[1, 3, 3], [2, 0, 2]], np.float32), axis=1, select_last_index=1),
    C("ArgMin", f32(3, 4), axis=0, keepdims=0),
    *[C(op, f32(2, 3, 4, lo=0.1, hi=2.0), axes=[1], keepdims=0, opsets=(17, 18), name="axis1")
      for op in ("ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
                 "ReduceLogSumExp")],
    C("ReduceSum", f32(2, 3, 4), i64(0, 2), opsets=(18,), name="runtime-axes"),
    C("Unsqueeze", f32(2, 3), i64(0), name="runtime-axes"),
    C("Split", f32(5, 2), i64(2, 3), num_outputs=2, name="runtime-sizes"),
    C("LogSoftmax", f32(2, 5), axis=-1), C("Hardmax", np.array([[1, 3, 3], [2, 0, 2]], np.float32), axis=1),
    C("Dropout", f32(2, 3), scalar(0.3, np.float32), const=(1,)),
    C("TopK", np.array([[1, 3, 3, 0], [2, 0, 2, 5]], np.float32), i64(2), const=(1,), axis=1),
    C("TopK", np.array([[1, 3, 3, 0], [2, 0, 2, 5]], np.float32), i64(3), const=(1,), largest=0, name="smallest"),
    C("Pad", f32(2, 3), i64(1, 0, 0, 2), scalar(1.5, np.float32), const=(1, 2)),
    C("Pad", f32(2, 3), i64(1, 1, 1, 1), const=(1,), mode="reflect", name="reflect"),
    C("Tile", f32(2, 3), i64(2, 1), const=(1,)),
    C("Einsum", f32(2, 3, 4), f32(2, 4, 5), equation="bij,bjk->bik"),
    C("ScatterElements", f32(3, 3), np.array([[1, 0, 2]], np.int64), f32(1, 3), axis=0, reduction="add"),
    C("ScatterND", f32(4, 3), np.array([[1], [3]], np.int64), f32(2, 3)),
    C("EyeLike", f32(3, 4), k=1),
    C("OneHot", i64(0, 2, -1), scalar(3), np.array([0.0, 1.0], np.float32), const=(1,), axis=0),
    C("NonZero", np.array([[1, 0], [3, 4]], np.float32)),
    C("LeakyRelu", f32(2, 3), alpha=0.1), C("PRelu", f32(2, 3), f32(3)), C("Elu", f32(2, 3)),
    C("Selu", f32(2, 3)), C("Celu", f32(2, 3), alpha=2.0), C("HardSigmoid", f32(2, 3, lo=-4, hi=4)),
    C("HardSwish", f32(2, 3, lo=-4, hi=4)), C("Softplus", f32(2, 3)), C("Softsign", f32(2, 3)),
    C("ThresholdedRelu", f32(2, 3), alpha=0.5), C("Mish", f32(2, 3)), C("Swish", f32(2, 3), alpha=1.5, opsets=(24,)),
    C("DequantizeLinear", np.array([0, 3, 128, 255], np.uint8), scalar(0.5, np.float32), scalar(128, np.uint8)),
    C("QuantizeLinear", f32(2, 4), scalar(0.05, np.float32), scalar(3, np.int8)),
    C("DynamicQuantizeLinear", f32(2, 4)),
    C("MatMulInteger", np.array([[1, 2], [3, 4]], np.uint8), np.array([[5, 6], [7, 8]], np.uint8),
      scalar(1, np.uint8)),
    C("Cast", f32(4, lo=-1000, hi=1000), to=DType.float8e4m3fn, opsets=(23,), name="float8-saturates"),
    # fused ops (tgraph.ir.fused), produced by the fusion passes
    C("LayerNormalization", f32(2, 3, 8), f32(8), f32(8), const=(1, 2), epsilon=1e-5, name="affine"),
    C("LayerNormalization", f32(2, 8), f32(8), epsilon=1e-6, sym={0: ("batch", 8)}, name="no-bias"),
    C("RMSNormalization", f32(2, 3, 8), f32(8), const=(1,), epsilon=1e-6, opsets=(23, 25)),
    C("Gelu", f32(3, 7, lo=-4, hi=4), opsets=(20, 23), name="erf"),
    C("Gelu", f32(3, 7, lo=-4, hi=4), approximate="tanh", name="tanh"),
    C("Attention", f32(2, 4, 3, 8), f32(2, 4, 3, 8), f32(2, 4, 3, 8), name="mha"),
    C("Attention", f32(2, 4, 5, 8), f32(2, 2, 5, 8), f32(2, 2, 5, 8), is_causal=1, scale=0.3, name="gqa-causal"),
    C("Attention", f32(2, 4, 3, 8), f32(2, 1, 5, 8), f32(2, 1, 5, 8),
      np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool).reshape(2, 1, 1, 5), name="mqa-padding-mask"),
    C("Attention", f32(1, 2, 4, 8), f32(1, 2, 4, 8), f32(1, 2, 4, 8), f32(1, 2, 4, 4), is_causal=1,
      name="additive-mask-causal"),
    C("Attention", f32(2, 3, 32), f32(2, 5, 16), f32(2, 5, 16),
      np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool).reshape(2, 1, 1, 5), q_num_heads=4, kv_num_heads=2,
      name="3d-gqa-padding-mask"),
    C("Attention", f32(1, 4, 16), f32(1, 4, 16), f32(1, 4, 16), q_num_heads=2, kv_num_heads=2, is_causal=1,
      sym={0: ("batch", "seq", 16), 1: ("batch", "seq", 16), 2: ("batch", "seq", 16)}, name="3d-causal-symbolic"),
    C("Attention", f32(1, 2, 3, 8), f32(1, 2, 3, 8), f32(1, 2, 3, 8), None, f32(1, 2, 4, 8), f32(1, 2, 4, 8),
      is_causal=1, name="past-present-qk"),
    C("Attention", f32(1, 4, 3, 8), f32(1, 2, 5, 8), f32(1, 2, 5, 8), softcap=2.0, name="gqa-softcap"),
    C("Attention", f32(2, 3, 16), f32(2, 5, 16), f32(2, 5, 16), None, None, None, np.array([3, 5], np.int64),
      q_num_heads=2, kv_num_heads=2, is_causal=1, opsets=(24,), name="3d-nonpad-kv-seqlen"),
    C("RotaryEmbedding", f32(2, 3, 5, 8), f32(7, 4), f32(7, 4), np.array([[0, 1, 2, 3, 4], [6, 5, 0, 2, 2]]),
      const=(1, 2), name="position-ids"),
    C("RotaryEmbedding", f32(2, 3, 5, 8), f32(2, 5, 2), f32(2, 5, 2), rotary_embedding_dim=4,
      sym={0: ("batch", 3, "seq", 8), 1: ("batch", "seq", 2), 2: ("batch", "seq", 2)}, name="partial-3d-caches"),
    C("RotaryEmbedding", f32(2, 4, 12), f32(6, 3), f32(6, 3), np.array([[5, 0, 1, 2], [0, 1, 2, 3]]),
      interleaved=1, num_heads=2, name="interleaved-3d-input"),
    # onnxruntime contrib ops (tgraph.ir.contrib): onnx.reference has no kernels for them, so
    # onnxruntime is the outside oracle
    C("com.microsoft.SkipLayerNormalization", f32(2, 3, 8), f32(2, 3, 8), f32(8), f32(8), f32(8), const=(2, 3, 4),
      epsilon=1e-5, name="beta-bias"),
    C("com.microsoft.SkipLayerNormalization", f32(4, 8), f32(4, 8), f32(8), epsilon=1e-6, name="2d-gamma-only"),
    C("com.microsoft.SkipLayerNormalization", f32(2, 3, 8), f32(2, 3, 8), f32(8), None, f32(8), const=(2, 4),
      epsilon=1e-5, sym={0: ("batch", "seq", 8), 1: ("batch", "seq", 8)}, name="bias-no-beta"),
    C("com.microsoft.SkipSimplifiedLayerNormalization", f32(2, 3, 8), f32(2, 3, 8), f32(8), f32(8), const=(2, 3),
      epsilon=1e-6, name="bias"),
    C("com.microsoft.SkipSimplifiedLayerNormalization", f32(3, 8), f32(3, 8), f32(8), epsilon=1e-5, name="2d"),
    # GroupQueryAttention: every row full, so onnxruntime's freshly allocated present is all written
    C("com.microsoft.GroupQueryAttention", f32(2, 3, 32), f32(2, 3, 16), f32(2, 3, 16), f32(2, 1, 0, 16),
      f32(2, 1, 0, 16), np.array([2, 2], np.int32), scalar(3, np.int32), num_heads=2, kv_num_heads=1,
      name="prompt"),
    C("com.microsoft.GroupQueryAttention", f32(2, 1, 64), f32(2, 1, 32), f32(2, 1, 32), f32(2, 2, 5, 16),
      f32(2, 2, 5, 16), np.array([4, 4], np.int32), scalar(5, np.int32), f32(8, 8), f32(8, 8), const=(7, 8),
      num_heads=4, kv_num_heads=2, do_rotary=1, name="decode-rotary"),
    C("com.microsoft.MatMulNBits", f32(2, 3, 40), *nbits(40, 6, 4, 16)[:3], const=(1, 2, 3), K=40, N=6, bits=4,
      block_size=16, tol=1e-4, name="int4-padded-zero-points"),
    C("com.microsoft.MatMulNBits", f32(3, 64), *nbits(64, 5, 8, 32, symmetric=True)[:2], None, None,
      nbits(64, 5, 8, 32)[3], const=(1, 2, 5), K=64, N=5, bits=8, block_size=32, tol=1e-4, name="int8-symmetric-bias"),
    C("com.microsoft.FastGelu", f32(2, 3, 8, lo=-4, hi=4), f32(8), const=(1,), tol=1e-4, name="bias"),
    C("com.microsoft.FastGelu", f32(3, 8, lo=-4, hi=4), tol=1e-4, name="no-bias"),
    C("com.microsoft.BiasGelu", f32(2, 3, 8, lo=-4, hi=4), f32(8), const=(1,), tol=1e-5),
    C("com.microsoft.RotaryEmbedding", f32(2, 5, 16), np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]), f32(9, 4),
      f32(9, 4), const=(2, 3), name="3d-position-ids"),
    C("com.microsoft.RotaryEmbedding", f32(1, 2, 4, 8), i64(3), f32(8, 4), f32(8, 4), const=(2, 3), interleaved=1,
      name="4d-offset-interleaved"),
    C("com.microsoft.RotaryEmbedding", f32(2, 3, 16), np.array([[0, 1, 2], [2, 3, 4]]), f32(6, 2), f32(6, 2),
      const=(2, 3), num_heads=2, rotary_embedding_dim=4, name="partial"),
    C("com.microsoft.EmbedLayerNormalization", np.array([[1, 4, 2], [0, 3, 3]], np.int32),
      np.array([[0, 0, 1], [0, 1, 1]], np.int32), f32(6, 8), f32(5, 8), f32(2, 8), f32(8), f32(8),
      np.array([[1, 1, 0], [1, 1, 1]], np.int32), const=(2, 3, 4, 5, 6), epsilon=1e-5, name="segments-mask"),
    C("tgraph.CausalMask", f32(4, 4), name="square"),
    C("tgraph.CausalMask", f32(2, 3, 2, 5), name="past"),
    C("tgraph.CausalMask", f32(1, 2, 5, 3), name="more-queries-than-keys"),
    C("tgraph.CausalMask", f32(2, 3, 4).astype(np.float16), tol=1e-3, name="fp16"),
    C("tgraph.CausalMask", f32(2, 2, 3, 6), sym={0: ("batch", "heads", "q", "k")}, opsets=ALL_OPSETS,
      name="symbolic"),
    C("tgraph.CausalMask", f32(2, 3, 4, 9), window=3, name="window-past"),
    C("tgraph.CausalMask", f32(1, 2, 7, 7), window=1, name="window-1"),
    C("tgraph.CausalMask", f32(2, 2, 5, 8), sym={0: ("batch", "heads", "q", "k")}, opsets=ALL_OPSETS, window=4,
      name="window-symbolic"),
]


# ------------------------------------------------------------------------------ helpers
def build(case: Case):
    """A one-node graph; returns (graph, output values, feeds, kernel inputs)."""
    b = Builder()
    g = b.graph
    domain, _, op = case.op.rpartition(".")
    values, feeds = [], {}
    for i, array in enumerate(case.inputs):
        if array is None:                     # an omitted optional input
            values.append(None)
        elif i in case.const:
            values.append(b.const(array, hint=f"c{i}"))
        else:
            dims = case.sym.get(i, array.shape)
            v = g.add_input(f"x{i}", TensorType(DType.of(array.dtype), dims))
            feeds[v.name] = array
            values.append(v)
    out = b.op(op, *values, domain=domain, **case.attrs)
    g.outputs = list(out) if isinstance(out, tuple) else [out]
    g.verify()
    return g, feeds


def bindings(case: Case) -> Dict[str, int]:
    bound = {}
    for i, dims in case.sym.items():
        for d, n in zip(dims, case.inputs[i].shape):
            if isinstance(d, str):
                bound[d] = n
    return bound


def ort_run(model: onnx.ModelProto, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same(actual, expected, tol, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.dtype == np.uint8 and expected.dtype.kind == "V" and expected.dtype.itemsize == 1:
        actual = actual.view(expected.dtype)       # onnxruntime returns float8 as its bytes
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.dtype.kind == "f":
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tol, atol=tol,
                                   err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)


PARAMS = [pytest.param(case, opset, id=f"{case.id}-opset{opset}") for case in CASES for opset in case.opsets]


@pytest.mark.parametrize("case,opset", PARAMS)
def test_op_matches_kernel_reference_and_onnxruntime(case: Case, opset: int):
    g, feeds = build(case)
    node = g.nodes[0]
    model = to_onnx(g, opset=opset)
    onnx.checker.check_model(model, full_check=True)

    kernel_out = OPS[node.qualified_op].kernel(*case.inputs, **node.attrs)
    kernel_out = list(kernel_out) if isinstance(kernel_out, tuple) else [kernel_out]
    ort_out = ort_run(model, feeds)
    # onnx.reference has no com.microsoft kernels: there onnxruntime is the outside oracle
    ref_out = ort_out if node.domain == "com.microsoft" else ReferenceEvaluator(model).run(None, feeds)
    assert len(kernel_out) == len(ref_out) == len(ort_out) == len(g.outputs)

    bound = bindings(case)
    for value, k, r, o in zip(g.outputs, kernel_out, ref_out, ort_out):
        if case.ref_bug:
            r = o
        else:
            assert_same(k, r, case.tol, f"{value.name}: kernel vs onnx.reference")
        assert_same(o, k, case.tol, f"{value.name}: onnxruntime vs kernel")
        # The inferred type describes what actually comes out.
        assert value.type.dtype.numpy == np.asarray(r).dtype
        assert value.type.shape is not None and len(value.type.shape) == np.ndim(r), value.type
        for dim, actual in zip(value.type.shape, np.shape(r)):
            if isinstance(dim, int):
                assert dim == actual, f"{value.name}: inferred {value.type}, got {np.shape(r)}"
            elif isinstance(dim, str) and dim in bound:
                assert bound[dim] == actual, f"{value.name}: inferred {value.type}, got {np.shape(r)}"


def test_every_op_has_a_case():
    missing = set(OPS) - {case.op for case in CASES}
    assert not missing, f"ops without a test case: {sorted(missing)}"


def test_every_op_has_an_onnx_lowering():
    missing = set(OPS) - set(LOWERINGS)
    assert not missing, f"ops without an ONNX lowering rule: {sorted(missing)}"


def test_symbolic_dims_become_dim_params():
    case = next(c for c in CASES if c.id == "tgraph.CausalMask-symbolic")
    g, _ = build(case)
    model = to_onnx(g)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "heads", "q", "k"]
    assert [d.dim_param for d in out.type.tensor_type.shape.dim] == ["batch", "heads", "q", "k"]


@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 7), (3, 3), (4, 9), (6, 2)])
def test_causal_mask_is_dynamic_in_tq_and_tk(tq, tk):
    """One exported model, many (Tq, Tk): the mask is computed from the runtime shape."""
    b = Builder()
    x = b.graph.add_input("scores", TensorType(DType.float32, ("batch", 2, "q", "k")))
    b.graph.outputs = [b.op("CausalMask", x, domain="tgraph")]
    model = to_onnx(b.graph)
    scores = f32(2, 2, tq, tk)
    (got,) = ort_run(model, {"scores": scores})
    keep = np.arange(tk)[None, :] <= np.arange(tq)[:, None] + (tk - tq)      # hand-derived rule
    want = np.where(keep, scores, np.finfo(np.float32).min)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(OPS["tgraph.CausalMask"].kernel(scores), want)


def test_expand_to_a_run_time_shape_keeps_the_static_dims_it_cannot_change():
    """Expand's target may only be 1 or equal where the input has a static size other than 1,
    so those dims survive an unknown target (transformers-4.x rotary tables: inv_freq[1, R/2, 1]
    expanded to [B, -1, 1])."""
    from tgraph.ir import Builder, DType, Graph, TensorType

    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, (1, 8, 1)))
    shape = g.add_input("shape", TensorType(DType.int64, (3,)))
    y = b.op("Expand", x, shape)
    assert y.shape == (None, 8, None)
    wider = b.op("Expand", x, g.add_input("s4", TensorType(DType.int64, (4,))))
    assert wider.shape == (None, None, 8, None)
    from tgraph.ir.evaluate import evaluate
    g.outputs = [y]
    out = evaluate(g, {"x": np.ones((1, 8, 1), np.float32), "shape": np.array([3, 8, 2]),
                       "s4": np.array([1, 1, 1, 1])})
    assert out[y.name].shape == (3, 8, 2)
