"""Per-op emitters: how each op of the table becomes one NumPy expression.

`EMITTERS` maps a qualified op name to a callable `emit(ctx) -> str`. Most entries are
one of two kinds:

* `Inline("{0} @ {1}")`: an expression template for ops NumPy already spells with
  ONNX semantics. ``{0}``, ``{1}``... are the inputs, ``{args}`` all of them, and
  ``{name}`` the literal of attribute `name`.
* `Call(kernels.softmax)`: a call `k.softmax(x, axis=-1)` of the op's reference kernel
  (`tgraph.ir.kernels`, `tgraph.ir.fused`), whose source is copied into the generated
  module, so the kernels stay the one definition of what an op means.

A few ops pick between the two by dtype or by what is constant (integer `Div` needs
the truncating kernel; a `Slice` with constant bounds reads best as ``x[:, 1:]``).
Inputs of one op always share a dtype (the op table checks it), and constants are
written with their dtype, so NumPy's promotion rules never widen a result.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from tgraph.ir import contrib, fused, kernels
from tgraph.ir.core import Node, Value
from tgraph.ir.opdefs import OPS

from .literals import attr_lit, dtype_lit, str_lit


class EmitContext:
    """What an emitter sees of one node: its rendered inputs and attribute literals."""

    def __init__(self, node: Node, args: List[str], use_kernel: Callable[[Callable], str]):
        self.node = node
        self.args = args
        self._use_kernel = use_kernel

    @property
    def attrs(self) -> Dict[str, Any]:
        return self.node.attrs

    def input(self, i: int) -> Optional[Value]:
        ins = self.node.inputs
        return ins[i] if i < len(ins) else None

    def const(self, i: int) -> Optional[np.ndarray]:
        v = self.input(i)
        return None if v is None else v.const

    def kernel(self, fn: Callable) -> str:
        """Ask for kernel `fn` in the generated module; returns how to call it."""
        return self._use_kernel(fn)

    def attr_literals(self) -> Dict[str, str]:
        return {name: attr_lit(value) for name, value in self.node.attrs.items() if value is not None}


@dataclass(frozen=True)
class Inline:
    """An expression template (see the module docstring)."""

    template: str

    def __call__(self, ctx: EmitContext) -> str:
        return self.template.format(*ctx.args, args=", ".join(ctx.args), **ctx.attr_literals())


@dataclass(frozen=True)
class Call:
    """A call of a reference kernel; attributes equal to the defaults are left out."""

    kernel: Callable

    def __call__(self, ctx: EmitContext) -> str:
        args = list(ctx.args)
        while args and args[-1] == "None":       # trailing omitted optional inputs
            args.pop()
        params = inspect.signature(self.kernel).parameters
        opdef = OPS[ctx.node.qualified_op]
        for name, value in ctx.node.attrs.items():
            if value is None:
                continue
            default = params[name].default if name in params else inspect.Parameter.empty
            if name in opdef.attrs and _same(value, opdef.attrs[name]) and _same(value, default):
                continue
            args.append(f"{name}={attr_lit(value)}")
        return f"{ctx.kernel(self.kernel)}({', '.join(args)})"


def emit_gather(ctx: EmitContext) -> str:
    """Gather from a weight table (an embedding, a position table) checks its indices and
    names the input or node at fault; other Gathers are the kernel."""
    table, indices = ctx.input(0), ctx.input(1)
    if table.const is None:
        return Call(kernels.gather)(ctx)
    given = indices.producer is None and indices.const is None         # ids fed by the caller
    where = f"input {indices.name!r} (ids into {table.name})" if given else \
        f"node {ctx.node.name!r} (Gather from {table.name})"
    return f"__take({ctx.args[0]}, {ctx.args[1]}, {int(ctx.attrs.get('axis', 0))}, {str_lit(where)})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------- ops that choose
def _div(ctx: EmitContext) -> str:
    # ONNX Div truncates integers toward zero; `/` would make floats and `//` floors.
    if ctx.input(0).dtype.is_int:
        return Call(kernels.div)(ctx)
    return "{0} / {1}".format(*ctx.args)


def _matmul(ctx: EmitContext) -> str:
    # `@` of bfloat16/float8 arrays (ml_dtypes) gives float32: the kernel casts back
    if ctx.input(0).dtype.is_ml_dtype:
        return Call(kernels.matmul)(ctx)
    return "{0} @ {1}".format(*ctx.args)


def _pow(ctx: EmitContext) -> str:
    # ONNX Pow keeps the base's type; NumPy would promote a mixed pair
    if ctx.input(0).dtype is not ctx.input(1).dtype:
        return Call(kernels.pow_)(ctx)
    return "{0} ** {1}".format(*ctx.args)


def _transpose(ctx: EmitContext) -> str:
    perm = ctx.attrs.get("perm")
    if perm is None:
        return f"np.transpose({ctx.args[0]})"
    return f"np.transpose({ctx.args[0]}, {attr_lit([int(p) for p in perm])})"


def _squeeze(ctx: EmitContext) -> str:
    if ctx.input(1) is not None:                 # axes computed at run time
        return Call(kernels.squeeze)(ctx)
    axes = ctx.attrs.get("axes")
    if axes is None:
        return f"np.squeeze({ctx.args[0]})"
    return f"np.squeeze({ctx.args[0]}, axis={attr_lit([int(a) for a in axes])})"


def _unsqueeze(ctx: EmitContext) -> str:
    # np.expand_dims normalises negative axes against the output rank, as ONNX does.
    if ctx.input(1) is not None:                 # axes computed at run time
        return Call(kernels.unsqueeze)(ctx)
    return f"np.expand_dims({ctx.args[0]}, {attr_lit([int(a) for a in ctx.attrs['axes']])})"


def _cast(ctx: EmitContext) -> str:
    to = ctx.attrs["to"]
    if to.name.startswith("float8") or ctx.attrs.get("saturate") is not None:
        return Call(kernels.cast)(ctx)           # float8 targets saturate
    return f"{ctx.args[0]}.astype({dtype_lit(to)})"


def _reshape(ctx: EmitContext) -> str:
    """A constant shape becomes np.reshape; a 0 entry ("copy this dim") reads ``x.shape[i]``."""
    shape = ctx.const(1)
    if shape is None or shape.ndim != 1:
        return Call(kernels.reshape)(ctx)
    x = ctx.args[0]
    dims = [int(d) for d in shape]
    if ctx.attrs.get("allowzero") or 0 not in dims:
        return f"np.reshape({x}, {attr_lit(dims)})"
    rank = ctx.input(0).type.rank
    if rank is None or not x.isidentifier() or any(d == 0 and i >= rank for i, d in enumerate(dims)):
        return Call(kernels.reshape)(ctx)
    parts = [f"{x}.shape[{i}]" if d == 0 else str(d) for i, d in enumerate(dims)]
    return f"np.reshape({x}, ({', '.join(parts)}{',' if len(parts) == 1 else ''}))"


_TO_END = 2 ** 62


def _slice(ctx: EmitContext) -> str:
    """Constant bounds with positive steps: Python slicing clamps exactly as ONNX does."""
    x = ctx.input(0)
    consts = [ctx.const(i) for i in range(1, 5)]
    starts, ends = consts[0], consts[1]
    rank = None if x.shape is None else len(x.shape)
    given = [ctx.input(i) is not None for i in range(1, 5)]
    if (rank is None or starts is None or ends is None
            or any(g and c is None for g, c in zip(given, consts))):
        return Call(kernels.slice)(ctx)
    starts = [int(s) for s in starts.reshape(-1)]
    ends = [int(e) for e in ends.reshape(-1)]
    axes = [int(a) for a in consts[2].reshape(-1)] if consts[2] is not None else list(range(len(starts)))
    steps = [int(s) for s in consts[3].reshape(-1)] if consts[3] is not None else [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)) or any(s <= 0 for s in steps):
        return Call(kernels.slice)(ctx)
    if any(not -rank <= a < rank for a in axes):
        return Call(kernels.slice)(ctx)
    axes = [a % rank for a in axes]
    if len(set(axes)) != len(axes):
        return Call(kernels.slice)(ctx)
    index = [":"] * (max(axes) + 1 if axes else 0)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        text = ("" if start == 0 else str(start)) + ":" + ("" if end >= _TO_END else str(end))
        index[axis] = text + (f":{step}" if step != 1 else "")
    if not index:
        return ctx.args[0]
    return f"{ctx.args[0]}[{', '.join(index)}]"


# ---------------------------------------------------------------- the table
EMITTERS: Dict[str, Callable[[EmitContext], str]] = {
    "Add": Inline("{0} + {1}"),
    "Sub": Inline("{0} - {1}"),
    "Mul": Inline("{0} * {1}"),
    "Div": _div,
    "Pow": _pow,
    "MatMul": _matmul,
    "Gemm": Call(kernels.gemm),
    "Sqrt": Inline("np.sqrt({0})"),
    "Reciprocal": Inline("np.reciprocal({0})"),
    "Neg": Inline("-{0}"),
    "Exp": Inline("np.exp({0})"),
    "Log": Inline("np.log({0})"),
    "Erf": Call(kernels.erf),
    "Tanh": Inline("np.tanh({0})"),
    "Sigmoid": Call(kernels.sigmoid),
    "Relu": Call(kernels.relu),
    "Cos": Inline("np.cos({0})"),
    "Sin": Inline("np.sin({0})"),
    "Identity": Inline("{0}"),
    "Not": Inline("np.logical_not({0})"),
    "And": Inline("np.logical_and({0}, {1})"),
    "Or": Inline("np.logical_or({0}, {1})"),
    "Equal": Inline("{0} == {1}"),
    "Less": Inline("{0} < {1}"),
    "Greater": Inline("{0} > {1}"),
    "LessOrEqual": Inline("{0} <= {1}"),
    "GreaterOrEqual": Inline("{0} >= {1}"),
    "IsNaN": Inline("np.isnan({0})"),
    "Softmax": Call(kernels.softmax),
    "ReduceMean": Call(kernels.reduce_mean),
    "ReduceSum": Call(kernels.reduce_sum),
    "ReduceMax": Call(kernels.reduce_max),
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": Call(kernels.expand),
    "Concat": Inline("np.concatenate(({args},), axis={axis})"),
    "Split": Call(kernels.split),
    "Slice": _slice,
    "Gather": emit_gather,
    "GatherElements": Call(kernels.gather_elements),
    "GatherND": Call(kernels.gather_nd),
    "Max": Call(kernels.maximum),
    "Flatten": Call(kernels.flatten),
    "Where": Inline("np.where({0}, {1}, {2})"),
    "Cast": _cast,
    "Trilu": Call(kernels.trilu),
    "Shape": Call(kernels.shape),
    "ConstantOfShape": Call(kernels.constant_of_shape),
    "Range": Call(kernels.range_),
    "CumSum": Call(kernels.cumsum),
    "tgraph.CausalMask": Call(kernels.causal_mask),
    # read from other exporters' graphs (tgraph.ir.opdefs_more)
    **{op: Call(fn) for op, fn in (
        ("Abs", kernels.abs_), ("Ceil", kernels.ceil), ("Floor", kernels.floor), ("Round", kernels.round_),
        ("Sign", kernels.sign), ("IsInf", kernels.isinf), ("Mod", kernels.mod), ("Xor", kernels.xor),
        ("Min", kernels.minimum), ("Sum", kernels.sum_), ("Mean", kernels.mean), ("Clip", kernels.clip),
        ("Size", kernels.size), ("CastLike", kernels.cast_like), ("ArgMax", kernels.arg_max),
        ("ArgMin", kernels.arg_min), ("ReduceMin", kernels.reduce_min), ("ReduceProd", kernels.reduce_prod),
        ("ReduceL1", kernels.reduce_l1), ("ReduceL2", kernels.reduce_l2),
        ("ReduceSumSquare", kernels.reduce_sum_square), ("ReduceLogSum", kernels.reduce_log_sum),
        ("ReduceLogSumExp", kernels.reduce_log_sum_exp), ("LogSoftmax", kernels.log_softmax),
        ("Hardmax", kernels.hardmax), ("Dropout", kernels.dropout), ("TopK", kernels.top_k),
        ("Pad", kernels.pad), ("Tile", kernels.tile), ("Einsum", kernels.einsum),
        ("ScatterElements", kernels.scatter_elements), ("ScatterND", kernels.scatter_nd),
        ("EyeLike", kernels.eye_like), ("OneHot", kernels.one_hot), ("NonZero", kernels.non_zero),
        ("LeakyRelu", kernels.leaky_relu), ("PRelu", kernels.prelu), ("Elu", kernels.elu), ("Selu", kernels.selu),
        ("Celu", kernels.celu), ("HardSigmoid", kernels.hard_sigmoid), ("HardSwish", kernels.hard_swish),
        ("Softplus", kernels.softplus), ("Softsign", kernels.softsign),
        ("ThresholdedRelu", kernels.thresholded_relu), ("Mish", kernels.mish), ("Swish", kernels.swish),
        ("DequantizeLinear", kernels.dequantize_linear), ("QuantizeLinear", kernels.quantize_linear),
        ("DynamicQuantizeLinear", kernels.dynamic_quantize_linear), ("MatMulInteger", kernels.matmul_integer))},
    # fused ops (tgraph.ir.fused): what the fusion passes produce
    "LayerNormalization": Call(fused.layer_normalization),
    "RMSNormalization": Call(fused.rms_normalization),
    "Gelu": Call(fused.gelu),
    "Attention": Call(kernels.onnx_attention),
    "RotaryEmbedding": Call(fused.rotary_embedding),
    # onnxruntime contrib ops (tgraph.ir.contrib): what the -O3 ort fusions produce
    "com.microsoft.SkipLayerNormalization": Call(contrib.skip_layer_normalization),
    "com.microsoft.SkipSimplifiedLayerNormalization": Call(contrib.skip_simplified_layer_normalization),
    "com.microsoft.GroupQueryAttention": Call(contrib.group_query_attention),
    "com.microsoft.FastGelu": Call(contrib.fast_gelu),
    "com.microsoft.BiasGelu": Call(contrib.bias_gelu),
    "com.microsoft.RotaryEmbedding": Call(contrib.ms_rotary_embedding),
    "com.microsoft.EmbedLayerNormalization": Call(contrib.embed_layer_normalization),
    # weight-only quantization (passes/quantize.py): dequantize, then MatMul
    "com.microsoft.MatMulNBits": Call(contrib.matmul_nbits),
}
