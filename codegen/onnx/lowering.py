"""Per-op lowering rules: IR nodes -> ONNX `NodeProto`s for a target opset.

`LOWERINGS` maps a qualified op name ("MatMul", "tgraph.CausalMask") to a rule
``rule(ctx, node) -> None`` that appends ONNX nodes through the `LoweringContext`.
Most standard ops are written as they are (`lower_same`); the rules below exist
where our IR keeps a static parameter as an attribute that ONNX now takes as an
input, or where an op of ours has no ONNX counterpart and becomes a subgraph.

The context checks every standard op it emits against the ONNX schemas of the
target opset, so a rule that needs a newer op fails with an `ExportError` naming the
node instead of producing a model that onnxruntime rejects. A rule may emit nodes of
another domain (e.g. ``com.microsoft`` fused kernels) after `ctx.use_domain`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper

from tgraph.errors import ExportError
from tgraph.ir.core import Node, Value
from tgraph.ir.opdefs import OPS, OnnxInterface

from .protos import finfo_min, make_attribute, tensor_proto

Rule = Callable[["LoweringContext", Node], None]
LOWERINGS: Dict[str, Rule] = {}


def lowering(*ops: str):
    """Register a rule for one or more qualified op names."""
    def register(fn: Rule) -> Rule:
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return register


@functools.lru_cache(maxsize=None)
def _schema_since(op_type: str, opset: int) -> Optional[int]:
    """The version of `op_type` in effect at `opset`, or None if it needs a later opset."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None
    return None if schema.deprecated else schema.since_version


@functools.lru_cache(maxsize=None)
def _first_opset(op_type: str) -> Optional[int]:
    try:
        return onnx.defs.get_schema(op_type, onnx.defs.onnx_opset_version(), "").since_version
    except onnx.defs.SchemaError:
        return None


class LoweringContext:
    """Collects the ONNX nodes, extra initializers and opset imports of one export."""

    def __init__(self, opset: int, taken_names: Iterable[str] = ()):
        self.opset = opset
        self.nodes: List[NodeProto] = []
        self.initializers: List[TensorProto] = []
        self.opset_imports: Dict[str, int] = {"": opset}
        self.node: Optional[Node] = None        # the IR node being lowered
        self._names = set(taken_names)
        self._node_names: set = set()
        self._consts: Dict[tuple, str] = {}

    # ---- dispatch -----------------------------------------------------------------
    def lower(self, node: Node) -> None:
        rule = LOWERINGS.get(node.qualified_op)
        if rule is None:
            raise ExportError(f"node {node.name}: no ONNX lowering for op {node.qualified_op!r}")
        self.node = node
        try:
            rule(self, node)
        finally:
            self.node = None

    def _where(self) -> str:
        return f"node {self.node.name} ({self.node.qualified_op})" if self.node is not None else "export"

    # ---- names and constants -------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A value name unused by the graph and by anything emitted so far."""
        base = f"{self.node.name}_{hint}" if self.node is not None else hint
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, array, hint: str = "const") -> str:
        """An initializer holding `array`; equal constants are shared (axes, scalars)."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            saved, self.node = self.node, None
            try:
                name = self.fresh(f"onnx_{hint}")
            finally:
                self.node = saved
            self.initializers.append(tensor_proto(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int], hint: str) -> str:
        return self.const(np.array([int(v) for v in values], dtype=np.int64), hint)

    # ---- opsets ------------------------------------------------------------------------
    def require_opset(self, version: int, what: str) -> None:
        if self.opset < version:
            raise ExportError(f"{self._where()}: {what} needs opset >= {version}, exporting opset {self.opset}")

    def use_domain(self, domain: str, version: int = 1) -> None:
        """Declare an extra operator domain (e.g. ``com.microsoft``) the model imports."""
        known = self.opset_imports.get(domain)
        if known is not None and known != version:
            raise ExportError(f"{self._where()}: domain {domain!r} requested at versions {known} and {version}")
        self.opset_imports[domain] = version

    # ---- emitting ----------------------------------------------------------------------
    def emit(self, op_type: str, inputs: Sequence[Optional[str]], outputs: Union[int, Sequence[str]] = 1,
             *, domain: str = "", **attrs) -> List[str]:
        """Append one ONNX node; returns its output names (fresh ones when `outputs` is a count)."""
        if domain == "":
            if _schema_since(op_type, self.opset) is None:
                first = _first_opset(op_type)
                if first is None:
                    raise ExportError(f"{self._where()}: {op_type!r} is not an ONNX operator")
                raise ExportError(f"{self._where()}: ONNX op {op_type} needs opset >= {first}, "
                                  f"exporting opset {self.opset}")
        elif domain not in self.opset_imports:
            raise ExportError(f"{self._where()}: emits {domain}.{op_type} without ctx.use_domain({domain!r})")
        if isinstance(outputs, int):
            outputs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        outputs = list(outputs)
        try:
            attributes = [make_attribute(k, v) for k, v in sorted(attrs.items()) if v is not None]
        except (TypeError, ValueError) as e:
            raise ExportError(f"{self._where()}: cannot write attributes of {op_type}: {e}") from None
        proto = helper.make_node(op_type, ["" if i is None else i for i in inputs], outputs,
                                 name=self._node_name(op_type, outputs), domain=domain or None)
        proto.attribute.extend(attributes)
        self.nodes.append(proto)
        return outputs

    def _node_name(self, op_type: str, outputs: Sequence[str]) -> str:
        ir = self.node
        if ir is None:
            base = op_type
        elif any(o.name in outputs for o in ir.outputs):
            base = ir.name                       # the node that produces the IR node's results
        else:
            base = f"{ir.name}/{op_type}"
        name, i = base, 0
        while name in self._node_names:
            i += 1
            name = f"{base}_{i}"
        self._node_names.add(name)
        return name


def names(values: Sequence[Optional[Value]]) -> List[Optional[str]]:
    return [None if v is None else v.name for v in values]


# ------------------------------------------------------------------------- the rules
def onnx_interface(node: Node) -> OnnxInterface:
    return OPS[node.qualified_op].onnx


def emit_interface(ctx: LoweringContext, node: Node, attrs: Optional[dict] = None,
                   op_type: Optional[str] = None) -> List[str]:
    """The ONNX node of `node` as its op's `OnnxInterface` describes it at the target opset:
    attributes that ONNX takes as inputs there become constant inputs, outputs go to their
    ONNX positions. `attrs` (default: the node's) lets a rule adjust semantics first."""
    interface = onnx_interface(node)
    attrs = dict(node.attrs if attrs is None else attrs)
    ins = names(node.inputs)
    written = interface.as_inputs(ctx.opset)
    for spec in interface.attr_inputs:
        if spec not in written and spec.index < len(ins) and ins[spec.index] is not None:
            raise ExportError(f"{ctx._where()}: {spec.attr} is computed at run time, which ONNX allows from "
                              f"opset {spec.since} (exporting opset {ctx.opset})")
    for spec in written:
        value = attrs.pop(spec.attr, None)
        if value is None:
            continue                           # an absent optional input (e.g. Squeeze without axes)
        ins += [None] * (spec.index - len(ins))
        ins.insert(spec.index, ctx.const(spec.to_array(value), spec.attr))
    return ctx.emit(op_type or node.op, ins, interface.onnx_outputs(names(node.outputs)), domain=node.domain,
                    **attrs)


_SAME_AS_ONNX = (
    "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Erf",
    "Tanh", "Sigmoid", "Relu", "Cos", "Sin", "Identity", "Not", "And", "Or", "Equal", "Less", "Greater",
    "Softmax", "Transpose", "Reshape", "Expand", "Concat", "Slice", "Gather", "Where", "Trilu", "Shape",
    "Range", "Cast", "LayerNormalization", "Gelu", "RotaryEmbedding",
    "LessOrEqual", "GreaterOrEqual", "IsNaN", "Flatten", "GatherElements", "GatherND", "Max",
    "Squeeze", "Unsqueeze", "CumSum",
    # read from other exporters' graphs (tgraph.ir.opdefs_more), written back as they came
    "Abs", "Ceil", "Floor", "Round", "Sign", "IsInf", "Mod", "Xor", "Min", "Sum", "Mean", "Clip", "Size",
    "CastLike", "ArgMax", "ArgMin", "LogSoftmax", "Hardmax", "TopK", "Pad", "Tile", "Einsum",
    "ScatterElements", "ScatterND", "EyeLike", "OneHot", "NonZero", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Swish", "DequantizeLinear",
    "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
)


@lowering(*_SAME_AS_ONNX)
def lower_same(ctx: LoweringContext, node: Node) -> None:
    """The ONNX op of the same name, through the op's ONNX interface (static attributes that
    ONNX takes as inputs, e.g. CumSum's axis, become constants; a DType attribute its enum)."""
    emit_interface(ctx, node)


@lowering("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
def lower_reduce(ctx: LoweringContext, node: Node) -> None:
    """Empty axes means "reduce nothing" in our IR but "reduce all" in ONNX: an Identity."""
    axes = node.attrs.get("axes")
    if axes is not None and len(axes) == 0:
        ctx.emit("Identity", names(node.inputs), names(node.outputs))
        return
    emit_interface(ctx, node)


@lowering("Split")
def lower_split(ctx: LoweringContext, node: Node) -> None:
    """With only a count, opset 18 wants `num_outputs`; older ones split evenly."""
    attrs = {"axis": node.attrs.get("axis", 0), "split": node.attrs.get("split")}
    if attrs["split"] is None and ctx.opset >= 18 and len(node.inputs) < 2:   # (sizes may be a runtime input)
        attrs["num_outputs"] = len(node.outputs)
    emit_interface(ctx, node, attrs)


@lowering("RMSNormalization")
def lower_rms_normalization(ctx: LoweringContext, node: Node) -> None:
    """RMSNormalization-23; below opset 23 (a graph imported from an older model, such as
    onnxruntime's SimplifiedLayerNormalization) the same formula in standard ops:
    x / sqrt(mean(x², axes) + epsilon) * scale, the statistics in float32 (stash_type 1)."""
    if ctx.opset >= 23:
        emit_interface(ctx, node)
        return
    (x, scale), (out,) = node.inputs, node.outputs
    rank = x.type.rank
    if rank is None:
        raise ExportError(f"node {node.name} (RMSNormalization): below opset 23 the input's rank must be known")
    axes = list(range(node.attrs.get("axis", -1) % rank, rank))
    stash = np.float32 if node.attrs.get("stash_type", 1) == 1 and x.dtype.numpy != np.float64 else x.dtype.numpy
    xs = x.name
    if np.dtype(stash) != x.dtype.numpy:
        (xs,) = ctx.emit("Cast", [xs], 1, to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(stash)))
    (square,) = ctx.emit("Mul", [xs, xs], 1)
    if ctx.opset >= 18:
        (mean,) = ctx.emit("ReduceMean", [square, ctx.ints(axes, "axes")], 1, keepdims=1)
    else:
        (mean,) = ctx.emit("ReduceMean", [square], 1, axes=axes, keepdims=1)
    eps = ctx.const(np.array(node.attrs.get("epsilon", 1e-5), dtype=stash), "epsilon")
    (std,) = ctx.emit("Sqrt", [ctx.emit("Add", [mean, eps], 1)[0]], 1)
    (normed,) = ctx.emit("Div", [xs, std], 1)
    if np.dtype(stash) != x.dtype.numpy:
        (normed,) = ctx.emit("Cast", [normed], 1, to=x.dtype.onnx)
    ctx.emit("Mul", [normed, scale.name], [out.name])


@lowering("Dropout")
def lower_dropout(ctx: LoweringContext, node: Node) -> None:
    """The mask output is written only when something reads it."""
    out, mask = node.outputs
    needed = mask.users or (node.graph is not None and any(o is mask for o in node.graph.outputs))
    emit_interface_outputs = [out.name] + ([mask.name] if needed else [])
    ctx.emit("Dropout", names(node.inputs), emit_interface_outputs, **node.attrs)


@lowering("ConstantOfShape")
def lower_constant_of_shape(ctx: LoweringContext, node: Node) -> None:
    """`value` must be a one-element 1-D tensor."""
    value = node.attrs.get("value")
    value = None if value is None else np.asarray(value).reshape(1)
    ctx.emit("ConstantOfShape", names(node.inputs), names(node.outputs), value=value)


@lowering("tgraph.CausalMask")
def lower_causal_mask(ctx: LoweringContext, node: Node) -> None:
    """scores[..., i, j] stays where j <= i + (Tk - Tq), else the dtype's lowest value.

    Built from Shape/Range so Tq and Tk are read at run time: row i may see keys up to
    ``last[i] = (Tk - Tq) + i``, i.e. ``last = Range(Tk - Tq, Tk)``; with `window` W > 0 also
    hidden are the keys j < last[i] - (W - 1).
    """
    (scores,), (out,) = node.inputs, node.outputs
    dtype = scores.dtype
    if not dtype.is_float:
        raise ExportError(f"node {node.name} (tgraph.CausalMask): scores must be float, got {dtype.name}")
    (tq,) = ctx.emit("Shape", [scores.name], [ctx.fresh("tq")], start=-2, end=-1)   # [Tq]
    (tk,) = ctx.emit("Shape", [scores.name], [ctx.fresh("tk")], start=-1)                  # [Tk]
    scalar = ctx.ints([0], "axes")
    (past,) = ctx.emit("Sub", [tk, tq], [ctx.fresh("past")])                               # [Tk - Tq]
    (tk0,) = ctx.emit("Squeeze", [tk, scalar], [ctx.fresh("tk_scalar")])
    (past0,) = ctx.emit("Squeeze", [past, scalar], [ctx.fresh("past_scalar")])
    one = ctx.const(np.array(1, dtype=np.int64), "one")
    zero = ctx.const(np.array(0, dtype=np.int64), "zero")
    (cols,) = ctx.emit("Range", [zero, tk0, one], [ctx.fresh("cols")])                    # [Tk]
    (last,) = ctx.emit("Range", [past0, tk0, one], [ctx.fresh("last")])                   # [Tq]
    (last_col,) = ctx.emit("Unsqueeze", [last, ctx.ints([1], "axes")], [ctx.fresh("last_col")])  # [Tq, 1]
    (hidden,) = ctx.emit("Greater", [cols, last_col], [ctx.fresh("hidden")])              # [Tq, Tk]
    window = int(node.attrs.get("window", 0) or 0)
    if window > 0:
        reach = ctx.const(np.array(window - 1, dtype=np.int64), "window_reach")
        (first_col,) = ctx.emit("Sub", [last_col, reach], [ctx.fresh("first_col")])           # [Tq, 1]
        (old,) = ctx.emit("Less", [cols, first_col], [ctx.fresh("outside_window")])         # [Tq, Tk]
        (hidden,) = ctx.emit("Or", [hidden, old], [ctx.fresh("hidden")])
    fill = ctx.const(np.array(finfo_min(dtype), dtype=dtype.numpy), f"{dtype.name}_min")
    ctx.emit("Where", [hidden, fill, scores.name], [out.name])


@lowering("Attention")
def lower_attention(ctx: LoweringContext, node: Node) -> None:
    """Attention-23 (24 with nonpad_kv_seqlen, 25 with a sliding window). onnxruntime (1.31)
    insists that a mask's query axis equals Tq, where the spec allows broadcasting: a
    [.., 1, Tk] padding mask is expanded to [.., Tq, Tk] first. Of the four outputs
    (Y, present_key, present_value, qk_matmul_output) only those something reads are written."""
    q, k, v = (x.name for x in node.inputs[:3])
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    ins = [q, k, v]
    if mask is not None and node.inputs[0].type.rank is not None:
        m = mask.name
        if mask.shape is None or mask.shape[-2] == 1:
            rank = len(mask.shape) if mask.shape is not None else 4
            lead = ctx.emit("Shape", [m], 1, start=0, end=rank - 2)[0]
            tq_axis = node.inputs[0].type.rank - 2              # [B, H, Tq, D] or [B, Tq, H*D]
            tq = ctx.emit("Shape", [q], 1, start=tq_axis, end=tq_axis + 1)[0]
            tk = ctx.emit("Shape", [m], 1, start=rank - 1)[0]
            shape = ctx.emit("Concat", [lead, tq, tk], 1, axis=0)[0]
            m = ctx.emit("Expand", [m, shape], 1)[0]
        ins.append(m)
    elif len(node.inputs) > 4:
        ins.append(None)
    ins += names(node.inputs[4:])
    while ins and ins[-1] is None:
        ins.pop()
    graph_outputs = {id(o) for o in node.graph.outputs} if node.graph is not None else set()
    outs = [o.name if i == 0 or o.users or id(o) in graph_outputs else "" for i, o in enumerate(node.outputs)]
    while len(outs) > 1 and not outs[-1]:
        outs.pop()
    attrs = dict(node.attrs)
    if len(outs) < 4 and attrs.get("qk_matmul_output_mode") == 0:
        del attrs["qk_matmul_output_mode"]       # (the mode only shapes the qk output: 0 is the default)
    ctx.emit("Attention", ins, outs, **attrs)


@lowering("com.microsoft.SkipLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization")
def lower_skip_norm(ctx: LoweringContext, node: Node) -> None:
    """onnxruntime's outputs are (output, mean, inv_std_var, input_skip_bias_sum): the IR's
    second output (the sum) goes to index 3, and is left out when nothing reads it."""
    ctx.use_domain("com.microsoft", 1)
    out, total = node.outputs
    needed = total.users or (node.graph is not None and any(o is total for o in node.graph.outputs))
    outs = onnx_interface(node).onnx_outputs([out.name, total.name if needed else ""])
    ctx.emit(node.op, names(node.inputs), outs, domain="com.microsoft", epsilon=float(node.attrs["epsilon"]))


@lowering("com.microsoft.GroupQueryAttention")
def lower_group_query_attention(ctx: LoweringContext, node: Node) -> None:
    """onnxruntime's contrib op, inputs and attributes as they are (`tgraph.ir.contrib`)."""
    ctx.use_domain("com.microsoft", 1)
    ctx.emit(node.op, names(node.inputs), names(node.outputs), domain="com.microsoft", **node.attrs)


@lowering("com.microsoft.MatMulNBits")
def lower_matmul_nbits(ctx: LoweringContext, node: Node) -> None:
    """Written as it is; absent optional inputs before `bias` (zero_points, g_idx) become ""."""
    ctx.use_domain("com.microsoft", 1)
    ins = names(node.inputs)
    while ins and ins[-1] is None:
        ins.pop()
    attrs = {k: int(v) for k, v in node.attrs.items()}
    ctx.emit(node.op, ins, names(node.outputs), domain="com.microsoft", **attrs)


@lowering("com.microsoft.FastGelu", "com.microsoft.BiasGelu", "com.microsoft.RotaryEmbedding",
          "com.microsoft.EmbedLayerNormalization")
def lower_contrib_as_is(ctx: LoweringContext, node: Node) -> None:
    """onnxruntime contrib ops read from other tools' graphs, written back as they came; an
    output nothing reads (EmbedLayerNormalization's embedding_sum) is left out."""
    ctx.use_domain("com.microsoft", 1)
    outs = names(node.outputs)
    graph_outputs = {id(o) for o in node.graph.outputs} if node.graph is not None else set()
    while len(outs) > 1 and not node.outputs[len(outs) - 1].users and id(node.outputs[len(outs) - 1]) not in graph_outputs:
        outs.pop()
    ins = names(node.inputs)
    while ins and ins[-1] is None:
        ins.pop()
    ctx.emit(node.op, ins, outs, domain="com.microsoft", **node.attrs)
