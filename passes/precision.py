"""`to-fp16` / `to-bf16`: run a float32 graph in half precision, keeping the risky parts in float32.

A naive conversion (every float32 tensor becomes float16) breaks on ordinary inputs:
in an un-fused LayerNorm ``mean((x - mean(x))**2)`` overflows 65504 as soon as
activations reach ~256, and attention scores ``q @ k^T`` overflow for large
activations, turning the softmax into NaN. So each float node is given a precision:

* **float32** (`ALWAYS_FP32`): reductions that can overflow (ReduceMean, ReduceSum),
  Softmax, float CumSum/Range, and Cos/Sin (rotary angles ``position * inv_freq``
  need float32: float16 integers stop being exact at 2048), plus `keep_ops`.
* Then, to a fixed point: an elementwise/layout node, or an activation-by-activation
  MatMul, whose every user runs in float32 runs in float32 too (backward: the squares
  feeding a variance, the score MatMul, mask and scale feeding a softmax); and an
  elementwise/layout node whose every non-constant float input comes from float32
  runs in float32 (forward: ``var + eps``, ``sqrt``, ``1/x`` after a variance).
* Everything else runs in the target dtype. Fused LayerNormalization /
  RMSNormalization keep ``stash_type=1`` (their statistics are float32 inside);
  fused Attention runs in float32 (its inputs cast up, its output down): onnxruntime
  1.31's CPU kernel computes ``q @ k^T`` in float16 even with ``softmax_precision=1``,
  so scores past 65504 became inf and the logits NaN where -O0 (whose score MatMul is
  float32 by the rule above) stayed finite. ``half-attention=true`` keeps the op in half
  precision with ``softmax_precision=1`` instead, for providers whose kernels accumulate
  the scores in float32; `bench/fp16_attention.py` measures the difference.

Exact reads that only order or compare (ReduceMax, Equal, Less ...: `FOLLOW_INPUTS`)
run in their inputs' precision and do not count as users, so the fully-masked-row guard
``Equal(ReduceMax(masked scores), finfo.min)`` keeps the scores float32.

Casts are inserted where a value crosses from one precision to the other (one per
value and direction). Constants follow their users: converted in place when every
user is half precision (parameters keep their names), duplicated for mixed use
(a parameter is converted once and cast back up for float32 users), clipped to the
target's finite range so ``finfo(float32).min`` masks stay finite. Parameters clipped
that way are counted (``clamped_weights``) and named in one warning line.

Graph I/O: float inputs and outputs become the target dtype by default (a KV cache
fed back step to step should be half precision); ``keep-io=true`` keeps float32 at the
edges with Casts. Integer inputs never change. float64 is left alone.

onnxruntime 1.31's CPU provider has float16 kernels for every op tgraph emits (the
fused ones compute in float32 inside); for bfloat16 it has almost none (MatMul, Add,
Mul, Sqrt, Softmax, ReduceMean, Attention ... are missing: see
`tgraph.runtime.precision.ORT_CPU_BF16_KERNELS`), so bfloat16 models are meant for
CUDA, and `tgraph.runtime.Session` explains the failure on the CPU in one line.
"""
from __future__ import annotations

from typing import ClassVar, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

from tgraph.errors import ConfigError
from tgraph.ir import DType, Graph, TensorType
from tgraph.ir.core import Node, Value
from tgraph.ir.traits import ops_with
from tgraph.numerics import clamp_summary, warn
from tgraph.ir.lazy import fold_blocks, is_lazy

from .base import Pass, register_pass

#: Ops always computed in float32 (inputs cast up, outputs cast down).
ALWAYS_FP32 = frozenset({"ReduceMean", "ReduceSum", "Softmax", "CumSum", "Range", "Cos", "Sin"})
#: Float arithmetic that may run in either precision (the op table's elementwise ops that
#: neither compare nor convert), and ops that only move elements.
ELEMENTWISE = ops_with("elementwise") - ops_with("comparison") - ops_with("conversion")
LAYOUT = ops_with("layout")
#: Exact, order-preserving reads (a row maximum, comparisons): they run in their inputs'
#: precision and never pull a float32 producer down (the fully-masked-row guard's ReduceMax
#: reads the float32 masked scores next to the softmax).
FOLLOW_INPUTS = frozenset({"ReduceMax", "Max", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
                           "IsNaN"})
#: Ops whose float inputs are read for their shape only: they never need a Cast.
SHAPE_ONLY = ops_with("shape_only")
#: Target dtypes by the names the CLI and `api.build` accept.
TARGETS = {"float16": DType.float16, "fp16": DType.float16, "half": DType.float16,
           "bfloat16": DType.bfloat16, "bf16": DType.bfloat16}

LOW, FP32 = "low", "fp32"


def target_dtype(name) -> DType:
    """`DType.float16` or `DType.bfloat16` from a name such as ``"float16"`` or ``"bf16"``."""
    if isinstance(name, DType) and name in (DType.float16, DType.bfloat16):
        return name
    try:
        return TARGETS[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown half-precision dtype {name!r}; use float16 or bfloat16") from None


def convert_array(array: np.ndarray, dtype: DType) -> np.ndarray:
    """`array` in `dtype`, finite values clipped to its finite range (inf and nan stay).
    A lazy checkpoint weight stays lazy: converted block by block as it is written."""
    if is_lazy(array):
        return array.map(lambda block: convert_array(block, dtype), dtype.numpy, f"to {dtype.name}")
    info = _finfo(dtype)
    a = np.asarray(array)
    clipped = np.where(np.isfinite(a), np.clip(a, info.min, info.max), a)
    return clipped.astype(dtype.numpy)


def out_of_range(array: np.ndarray, dtype: DType) -> int:
    """How many finite values of `array` lie beyond `dtype`'s finite range (and would be clipped)."""
    info = _finfo(dtype)
    return fold_blocks(array, lambda a: int(np.count_nonzero(np.isfinite(a) & ((a > info.max) | (a < info.min)))))


def _finfo(dtype: DType):
    if dtype is DType.bfloat16:
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(dtype.numpy)


def _split_ops(text: str) -> Set[str]:
    return {t for t in (p.strip() for p in str(text or "").replace("|", "+").split("+")) if t}


class _Plan:
    """Which precision each float node runs in (the decision half of the pass)."""

    def __init__(self, graph: Graph, low: DType, keep: Set[str]):
        self.graph, self.low, self.keep = graph, low, keep
        self.mode: Dict[int, str] = {}          # id(node) -> LOW / FP32, for flexible nodes
        self.fixed: Dict[int, Optional[str]] = {}  # id(node) -> precision of a float->float Cast (or None)
        for node in graph.nodes:
            kind = self._classify(node)
            if kind == "fixed":
                to = DType.of(node.attrs["to"])
                self.fixed[id(node)] = FP32 if to is DType.float32 else LOW if to is low else None
            elif kind == "flexible":
                self.mode[id(node)] = FP32 if node.qualified_op in keep else LOW
        self._outputs = {id(v) for v in graph.outputs}

    def _is_float(self, v: Optional[Value]) -> bool:
        return v is not None and v.dtype in (DType.float32, self.low)

    def _classify(self, node: Node) -> Optional[str]:
        if node.op == "Cast" and not node.domain:
            src = node.inputs[0]
            if src is not None and src.dtype.is_float:
                return "fixed"          # an explicit float->float cast keeps its meaning
            return "flexible" if DType.of(node.attrs["to"]) is DType.float32 else None
        if any(self._is_float(v) for v in node.inputs) or any(self._is_float(v) for v in node.outputs):
            return "flexible"
        return None

    def precision_of(self, v: Value) -> Optional[str]:
        """Where `v` is computed: LOW/FP32 for node outputs, None for constants and inputs."""
        p = v.producer
        if p is None:
            return LOW if v.const is None and self._is_float(v) else None
        if id(p) in self.fixed:
            return self.fixed[id(p)]
        return self.mode.get(id(p))

    def user_precision(self, node: Node) -> Optional[str]:
        if node.qualified_op in SHAPE_ONLY:
            return None
        if id(node) in self.fixed:
            return self.fixed[id(node)]
        return self.mode.get(id(node))

    def _backward_ok(self, node: Node) -> bool:
        op = node.qualified_op
        if op in ELEMENTWISE or op in LAYOUT or op == "Cast":
            return True
        return op == "MatMul" and not any(v is not None and v.is_const for v in node.inputs)

    def solve(self) -> None:
        nodes = [n for n in self.graph.nodes if id(n) in self.mode]
        changed, rounds = True, 0
        while changed and rounds < 64:
            changed, rounds = False, rounds + 1
            for node in reversed(nodes):                       # backward: all users float32
                if self.mode[id(node)] == FP32 or not self._backward_ok(node):
                    continue
                outs = [o for o in node.outputs if self._is_float(o)]
                if not outs or any(id(o) in self._outputs for o in outs):
                    continue
                users = [self.user_precision(u) for o in outs for u in o.users
                         if u.qualified_op not in FOLLOW_INPUTS]
                users = [u for u in users if u is not None]
                if users and all(u == FP32 for u in users):
                    self.mode[id(node)] = FP32
                    changed = True
            for node in nodes:                                 # forward: all inputs float32
                op = node.qualified_op
                if self.mode[id(node)] == FP32 or not (op in ELEMENTWISE or op in LAYOUT or op in FOLLOW_INPUTS):
                    continue
                srcs = [self.precision_of(v) for v in node.inputs if self._is_float(v) and v.const is None]
                if srcs and all(s == FP32 for s in srcs):
                    self.mode[id(node)] = FP32
                    changed = True


@register_pass
class ToLowPrecision(Pass):
    """Convert float32 weights and compute to float16, keeping norms/softmax/reductions in float32."""

    name = "to-fp16"
    #: not value-exact: I/O dtypes change and results round (tests/test_passes.py skips it)
    exact: ClassVar[bool] = False
    dtype: str = "float16"
    keep_io: bool = False       # keep float32 graph inputs/outputs (Casts at the edges)
    keep_ops: str = ""          # more ops to run in float32, '+'-separated, e.g. "Attention+Gelu"
    half_attention: bool = False   # fused Attention in half precision (softmax_precision=1), see above

    def run(self, graph: Graph) -> Dict[str, int]:
        low = target_dtype(self.dtype)
        wide = set(ALWAYS_FP32) | _split_ops(self.keep_ops) | (set() if self.half_attention else {"Attention"})
        plan = _Plan(graph, low, wide)
        plan.solve()
        rw = _Rewriter(graph, low, plan)
        rw.constants()
        if not self.keep_io:
            for v in graph.inputs:
                if v.dtype is DType.float32:
                    v.type = v.type.with_dtype(low)
                    rw.counts["retyped_io"] += 1
        for node in list(graph.nodes):
            rw.node(node)
        rw.finish_outputs(low if not self.keep_io else DType.float32)
        if rw.clamped:
            warn(f"{self.name}: " + clamp_summary(rw.clamped, low.name, float(_finfo(low).max)))
            rw.counts["clamped_weights"] = sum(n for _, n in rw.clamped)
        return dict(rw.counts)


@register_pass
class ToBFloat16(ToLowPrecision):
    """Convert float32 weights and compute to bfloat16, keeping norms/softmax/reductions in float32."""

    name = "to-bf16"
    dtype: str = "bfloat16"


class _Rewriter:
    """Applies a `_Plan`: converts constants, retypes node outputs, inserts Casts."""

    def __init__(self, graph: Graph, low: DType, plan: _Plan):
        self.graph, self.low, self.plan = graph, low, plan
        self.casts: Dict[Tuple[int, DType], Value] = {}
        self.counts = {"half_nodes": 0, "float32_nodes": 0, "casts": 0, "converted_constants": 0, "retyped_io": 0}
        self.clamped: List[Tuple[str, int]] = []     # (parameter, how many finite values were out of range)

    def _dtype_for(self, mode: str) -> DType:
        return self.low if mode == LOW else DType.float32

    def constants(self) -> None:
        """float32 constants follow their users: converted in place when every user runs in
        half precision; with users of both kinds, a constant gets a half-precision copy.
        Parameters are always stored in half precision under their own names (the model
        halves in size), with a Cast back up for float32 users."""
        for v in list(self.graph.constants.values()):
            if v.dtype is not DType.float32:
                continue
            uses = [(u, i) for u, i in v.uses if u.qualified_op not in SHAPE_ONLY and id(u) in self.plan.mode]
            low_uses = [(u, i) for u, i in uses if self.plan.mode[id(u)] == LOW and not self._is_cast(u)]
            wide_uses = [(u, i) for u, i in uses if self.plan.mode[id(u)] == FP32 and not self._is_cast(u)]
            if not low_uses and not (v.is_param and wide_uses):
                continue                       # parameters are always stored in half precision
            if not wide_uses:
                self._convert_in_place(v)
            elif v.is_param:
                self._convert_in_place(v)
                out = self._cast_node(v, DType.float32, self.graph.nodes[0] if self.graph.nodes else None)
                for u, i in wide_uses:
                    u.replace_input_with(i, out)
            else:
                copy = self.graph.add_constant(convert_array(v.const, self.low), hint=v.name)
                self.counts["converted_constants"] += 1
                for u, i in low_uses:
                    u.replace_input_with(i, copy)

    @staticmethod
    def _is_cast(node: Node) -> bool:
        return node.op == "Cast" and not node.domain

    def _convert_in_place(self, v: Value) -> None:
        if v.is_param:
            beyond = out_of_range(v.const, self.low)
            if beyond:
                self.clamped.append((v.name, beyond))
        v.const = convert_array(v.const, self.low)
        v.type = TensorType.of_array(v.const)
        self.counts["converted_constants"] += 1

    def _cast_node(self, v: Value, want: DType, before: Optional[Node]) -> Value:
        out = self.graph.new_value(v.type.with_dtype(want), hint=f"{v.name}_{want.name}")
        cast = Node("Cast", [v], [out], {"to": want})
        if before is None:
            self.graph.append(cast)
        else:
            self.graph.insert_before(before, cast)
        self.counts["casts"] += 1
        return out

    def node(self, node: Node) -> None:
        mode = self.plan.mode.get(id(node))
        if mode is None:
            return
        want = self._dtype_for(mode)
        if self._is_cast(node):
            if DType.of(node.attrs["to"]) is not want:   # Cast(int -> float32) in a half region
                node.attrs["to"] = want
                node.outputs[0].type = node.outputs[0].type.with_dtype(want)
                self.counts["half_nodes"] += 1
            return
        changed = False
        if node.qualified_op not in SHAPE_ONLY:
            for i, v in enumerate(node.inputs):
                if v is None or v.dtype not in (DType.float32, self.low) or v.dtype is want:
                    continue
                key = (id(v), want)
                if key not in self.casts:
                    self.casts[key] = self._cast_node(v, want, node)
                node.replace_input_with(i, self.casts[key])
                changed = True
        for out in node.outputs:
            if out.dtype is DType.float32 and want is not DType.float32:
                out.type = out.type.with_dtype(want)
                changed = True
        if mode == LOW:
            changed |= self._low_attrs(node)
        if changed:
            self.counts["half_nodes" if mode == LOW else "float32_nodes"] += 1

    def _low_attrs(self, node: Node) -> bool:
        """Attributes that carry a dtype or a float32 value, adapted to a half-precision node."""
        op, changed = node.qualified_op, False
        if op == "Attention" and node.attrs.get("softmax_precision") is None:
            node.attrs["softmax_precision"] = DType.float32.onnx     # scores + softmax in float32
            changed = True
        if op in ("LayerNormalization", "RMSNormalization") and node.attrs.get("stash_type", 1) != 1:
            node.attrs["stash_type"] = 1
            changed = True
        value = node.attrs.get("value")
        if op == "ConstantOfShape" and value is not None and np.asarray(value).dtype == np.float32:
            node.attrs["value"] = convert_array(value, self.low)
            changed = True
        return changed

    def finish_outputs(self, want: DType) -> None:
        """Give every float graph output dtype `want`, keeping its name (a Cast takes it over)."""
        for i, v in enumerate(list(self.graph.outputs)):
            if v.dtype not in (DType.float32, self.low) or v.dtype is want:
                continue
            name = v.name
            inner = self.graph.names.fresh(f"{name}_{v.dtype.name}")
            if v.const is not None:
                self.graph.constants[inner] = self.graph.constants.pop(name)
            v.name = inner
            out = Value(name, v.type.with_dtype(want))
            cast = Node("Cast", [v], [out], {"to": want})
            self.graph.append(cast)
            self.graph.outputs[i] = out
            self.counts["casts"] += 1
            self.counts["retyped_io"] += 1


def convert_precision(graph: Graph, dtype="float16", *, keep_io: bool = False,
                      keep_ops: Iterable[str] = ()) -> Dict[str, int]:
    """Run the pass on `graph` in place (a function form of `to-fp16` / `to-bf16`)."""
    return ToLowPrecision(dtype=target_dtype(dtype).name, keep_io=keep_io, keep_ops="+".join(keep_ops)).run(graph)


def precision_report(graph: Graph) -> Dict[str, List[str]]:
    """``{"float32": [...], "<low>": [...]}``: the qualified ops computing in each float dtype."""
    out: Dict[str, List[str]] = {}
    for node in graph.nodes:
        if node.op == "Cast" and not node.domain:
            continue
        floats = [v.dtype.name for v in node.outputs if v.dtype.is_float]
        for name in set(floats):
            out.setdefault(name, [])
            if node.qualified_op not in out[name]:
                out[name].append(node.qualified_op)
    return out


def precision_pipeline(dtype) -> List[Pass]:
    """The passes that turn a float32 graph into `dtype`: none for float32, else `to-fp16`/`to-bf16`."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() in ("float32", "fp32")) or dtype is DType.float32:
        return []
    low = target_dtype(dtype)
    return [ToLowPrecision() if low is DType.float16 else ToBFloat16()]
