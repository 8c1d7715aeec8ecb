"""The op table: one declarative entry per op.

An `OpDef` gives an op's attributes (with defaults), its arity, its type inference
and its reference kernel (`tgraph.ir.kernels`). The builder, the verifier, constant
folding and both backends read this table; the completeness test checks that every
entry also has an ONNX lowering and a NumPy emitter.

Static parameters that ONNX moved from attributes to inputs over the opsets (the
axes of reductions, Squeeze/Unsqueeze, Split sizes, CumSum's axis) are attributes here:
passes can read them without chasing constants. Each op's `OnnxInterface` says where
ONNX keeps them at a given opset (and where its outputs sit); the ONNX lowering and the
ONNX importer both read that one description, so export -> import -> export is an
identity. Data-dependent ones (Reshape's shape, Slice bounds, Expand's shape) stay
inputs, as in ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ShapeError
from . import kernels
from .types import Dim, DType, TensorType, broadcast_dims, dim_add, dim_div, dim_mul

REQUIRED = object()

#: The op traits passes may rely on; `tgraph.ir.traits` says what each one means.
TRAITS = frozenset({"commutative", "elementwise", "comparison", "conversion", "layout", "shape_only", "fused"})

InferFn = Callable[[List[Optional[TensorType]], Dict[str, Any], List[Optional[np.ndarray]]], List[TensorType]]


@dataclass(frozen=True)
class AttrInput:
    """An IR attribute that ONNX takes as a constant int64 input from opset `since` on
    (before that, as an attribute of the same name)."""

    attr: str
    index: int                 # its position among the ONNX node's inputs
    since: int                 # first standard-domain opset with the input form
    rank: int = 1              # 1: a 1-D tensor of ints (axes, sizes); 0: a scalar (an axis)

    def to_array(self, value) -> np.ndarray:
        return np.array(int(value) if self.rank == 0 else [int(v) for v in value], dtype=np.int64)

    def from_array(self, array: np.ndarray, where: str):
        array = np.asarray(array)
        if self.rank == 0 and array.shape == (1,):
            array = array.reshape(())          # onnxruntime also takes a one-element axis
        if array.dtype.kind not in "iu" or array.ndim != self.rank:
            raise ShapeError(f"{where}: {self.attr} must be a {self.rank}-D integer tensor, got "
                             f"{array.dtype.name}{list(array.shape)}")
        return int(array) if self.rank == 0 else [int(v) for v in array.reshape(-1)]


@dataclass(frozen=True)
class OnnxInterface:
    """How an op's IR attributes, inputs and outputs map to its ONNX node."""

    attr_inputs: Tuple[AttrInput, ...] = ()
    # ONNX output position of each IR output (None: the same order); positions not listed
    # are ONNX outputs the IR does not keep (written as "" by the lowering)
    outputs: Optional[Tuple[int, ...]] = None

    def attr_input(self, attr: str) -> Optional[AttrInput]:
        return next((a for a in self.attr_inputs if a.attr == attr), None)

    def as_inputs(self, opset: int) -> Tuple[AttrInput, ...]:
        """The attributes that are ONNX inputs at `opset`, by input position."""
        return tuple(sorted((a for a in self.attr_inputs if opset >= a.since), key=lambda a: a.index))

    def onnx_outputs(self, names: Sequence[str]) -> List[str]:
        """The ONNX node's output list for the IR outputs `names` ("" where the IR keeps none)."""
        if self.outputs is None:
            return list(names)
        out = [""] * (max(self.outputs) + 1)
        for name, pos in zip(names, self.outputs):
            out[pos] = name
        while out and not out[-1]:
            out.pop()
        return out

    def ir_outputs(self, onnx_outputs: Sequence[str], where: str) -> List[str]:
        """The IR's outputs from an ONNX node's list; refuses an output the IR does not keep."""
        if self.outputs is None:
            return list(onnx_outputs)
        dropped = [n for i, n in enumerate(onnx_outputs) if n and i not in self.outputs]
        if dropped:
            raise ShapeError(f"{where}: output {dropped[0]!r} (a training output) is not supported")
        return [onnx_outputs[p] if p < len(onnx_outputs) else "" for p in self.outputs]


NO_ONNX_CHANGES = OnnxInterface()


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    kernel: Callable
    inputs: Tuple[int, int] = (1, 1)          # (min, max) number of inputs
    attrs: Dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    num_outputs: Optional[int] = 1            # None: decided by attributes (Split)
    doc: str = ""
    # Symbolic contents of the output for shape arithmetic: (contents of inputs, attrs, input types)
    # -> tuple of dims or None. Only ops that move shape values around define it.
    sym: Optional[Callable] = None
    onnx: OnnxInterface = NO_ONNX_CHANGES
    # What passes may assume about the op (see tgraph.ir.traits): "commutative", "elementwise", ...
    traits: FrozenSet[str] = frozenset()

    @property
    def qualified(self) -> str:
        return f"{self.domain}.{self.name}" if self.domain else self.name

    def resolve_attrs(self, given: Dict[str, Any]) -> Dict[str, Any]:
        unknown = set(given) - set(self.attrs)
        if unknown:
            raise ShapeError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = {}
        for name, default in self.attrs.items():
            if name in given and given[name] is not None:
                out[name] = given[name]
            elif default is REQUIRED:
                raise ShapeError(f"{self.name}: attribute {name!r} is required")
            elif default is not None:
                out[name] = default
        return out


OPS: Dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    unknown = set(opdef.traits) - TRAITS
    if unknown:
        raise ValueError(f"op {opdef.qualified}: unknown trait(s) {sorted(unknown)}")
    OPS[opdef.qualified] = opdef
    return opdef


def get_op(name: str, domain: str = "") -> OpDef:
    key = f"{domain}.{name}" if domain else name
    try:
        return OPS[key]
    except KeyError:
        raise ShapeError(f"unknown op {key!r}") from None


# ---------------------------------------------------------------- inference helpers
def _need_rank(t: TensorType, op: str) -> Tuple[Dim, ...]:
    if t.shape is None:
        raise ShapeError(f"{op}: input rank must be known")
    return t.shape


def broadcast_shapes(*shapes: Optional[Tuple[Dim, ...]]) -> Optional[Tuple[Dim, ...]]:
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out: List[Dim] = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j >= 0:
                try:
                    dim = broadcast_dims(dim, s[j])
                except ValueError:
                    raise ShapeError(f"shapes {[tuple(x) for x in shapes]} do not broadcast") from None
        out.append(dim)
    return tuple(out)


def _same_dtype(ts: Sequence[TensorType], op: str) -> DType:
    dtypes = {t.dtype for t in ts}
    if len(dtypes) != 1:
        raise ShapeError(f"{op}: input dtypes differ ({', '.join(sorted(d.name for d in dtypes))})")
    return ts[0].dtype


def _norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


MAX_SHAPE_ELEMENTS = 64


def _ints(a) -> Optional[List[Dim]]:
    """Contents of a shape-like input as dims: ints from a constant, dims from symbolic contents."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return list(a)
    a = a if hasattr(a, "dtype") else np.asarray(a)     # (a lazy weight is not read to learn it is not a shape)
    if a.dtype.kind not in "iu" or a.size > MAX_SHAPE_ELEMENTS:
        return None          # weights and float data are never shape contents
    return [int(x) for x in np.asarray(a).reshape(-1)]


def _static_ints(a) -> Optional[List[int]]:
    dims = _ints(a)
    return dims if dims is not None and all(isinstance(d, int) for d in dims) else None


def _sym_product(dims: Sequence[Dim]) -> Dim:
    """Product with the integer factors collected first: (8, "seq", 2) -> "16*seq"."""
    static = 1
    symbolic: List[Dim] = []
    for d in dims:
        if isinstance(d, int):
            static *= d
        else:
            symbolic.append(d)
    out: Dim = static
    for d in symbolic:
        out = dim_mul(out, d)
    return out


# ---------------------------------------------------------------- inference rules
def infer_elementwise(ins, attrs, consts):
    dtype = _same_dtype(ins, "elementwise")
    return [TensorType(dtype, broadcast_shapes(*(t.shape for t in ins)))]


def infer_compare(ins, attrs, consts):
    _same_dtype(ins, "compare")
    return [TensorType(DType.bool, broadcast_shapes(*(t.shape for t in ins)))]


def infer_unary(ins, attrs, consts):
    return [ins[0]]


def infer_float_unary(ins, attrs, consts):
    if not ins[0].dtype.is_float:
        raise ShapeError(f"expected a float tensor, got {ins[0].dtype.name}")
    return [ins[0]]


def infer_matmul(ins, attrs, consts):
    a, b = ins
    dtype = _same_dtype(ins, "MatMul")
    sa, sb = _need_rank(a, "MatMul"), _need_rank(b, "MatMul")
    if len(sa) == 0 or len(sb) == 0:
        raise ShapeError("MatMul: scalar inputs are not allowed")
    ka = sa[-1]
    kb = sb[-2] if len(sb) >= 2 else sb[0]
    if isinstance(ka, int) and isinstance(kb, int) and ka != kb:
        raise ShapeError(f"MatMul: contraction dims differ: {tuple(sa)} @ {tuple(sb)}")
    batch = broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    out = list(batch)
    if len(sa) >= 2:
        out.append(sa[-2])
    if len(sb) >= 2:
        out.append(sb[-1])
    return [TensorType(dtype, tuple(out))]


def infer_gemm(ins, attrs, consts):
    a, b = _need_rank(ins[0], "Gemm"), _need_rank(ins[1], "Gemm")
    if len(a) != 2 or len(b) != 2:
        raise ShapeError("Gemm: inputs must be 2-D")
    m, k1 = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
    k2, n = (b[1], b[0]) if attrs.get("transB") else (b[0], b[1])
    if isinstance(k1, int) and isinstance(k2, int) and k1 != k2:
        raise ShapeError(f"Gemm: contraction dims differ ({k1} vs {k2})")
    return [TensorType(_same_dtype(ins, "Gemm"), (m, n))]


def infer_reduce(ins, attrs, consts):
    shape = _need_rank(ins[0], "Reduce")
    axes = attrs.get("axes")
    axes = list(range(len(shape))) if axes is None else [_norm_axis(a, len(shape), "Reduce") for a in axes]
    keep = attrs.get("keepdims", 1)
    out = [1 if i in axes else d for i, d in enumerate(shape)] if keep else [d for i, d in enumerate(shape) if i not in axes]
    return [ins[0].with_shape(out)]


def infer_softmax(ins, attrs, consts):
    _norm_axis(attrs.get("axis", -1), len(_need_rank(ins[0], "Softmax")), "Softmax")
    return infer_float_unary(ins, attrs, consts)


def infer_transpose(ins, attrs, consts):
    shape = _need_rank(ins[0], "Transpose")
    perm = attrs.get("perm") or list(reversed(range(len(shape))))
    if sorted(perm) != list(range(len(shape))):
        raise ShapeError(f"Transpose: perm {list(perm)} is not a permutation of rank {len(shape)}")
    return [ins[0].with_shape([shape[p] for p in perm])]


def infer_reshape(ins, attrs, consts):
    x, target = ins[0], consts[1]
    if ins[1].shape is None or len(ins[1].shape) != 1:
        raise ShapeError("Reshape: shape must be a 1-D tensor")
    if target is None:
        n = ins[1].shape[0]
        return [x.with_shape(None if not isinstance(n, int) else [None] * n)]
    dims = _ints(target)
    src = list(x.shape) if x.shape is not None else None
    out: List[Dim] = []
    for i, d in enumerate(dims):
        if not isinstance(d, int):
            out.append(d)
        elif d == 0 and not attrs.get("allowzero"):
            if src is None or i >= len(src):
                raise ShapeError(f"Reshape: 0 at position {i} copies a dim the input does not have")
            out.append(src[i])
        elif d < -1:
            raise ShapeError(f"Reshape: invalid dim {d}")
        else:
            out.append(d)
    if out.count(-1) > 1:
        raise ShapeError("Reshape: more than one -1")
    if src is not None:
        # Cancel common factors so (batch, seq, 512) -> (0, 0, 8, -1) infers 64, not an expression.
        remaining = list(src)
        known = [d for d in out if d != -1]
        leftover = []
        for d in known:
            if d in remaining:
                remaining.remove(d)
            else:
                leftover.append(d)
        num_static = _sym_product([d for d in remaining if isinstance(d, int)])
        den_static = _sym_product([d for d in leftover if isinstance(d, int)])
        if isinstance(num_static, int) and isinstance(den_static, int) and den_static and num_static % den_static == 0:
            num_static, den_static = num_static // den_static, 1
        num = _sym_product([num_static] + [d for d in remaining if not isinstance(d, int)])
        den = _sym_product([den_static] + [d for d in leftover if not isinstance(d, int)])
        if -1 in out:
            if isinstance(num, int) and isinstance(den, int):
                if den == 0 or num % den:
                    raise ShapeError(f"Reshape: cannot reshape {tuple(src)} to {dims}")
                out[out.index(-1)] = num // den
            else:
                out[out.index(-1)] = dim_div(num, den)
        elif isinstance(num, int) and isinstance(den, int) and num != den:
            raise ShapeError(f"Reshape: cannot reshape {tuple(src)} ({num} elements left) to {dims}")
    elif -1 in out:
        out[out.index(-1)] = None
    return [x.with_shape(out)]


def infer_squeeze(ins, attrs, consts):
    shape = _need_rank(ins[0], "Squeeze")
    axes = attrs.get("axes")
    if axes is None:
        return [ins[0].with_shape([d for d in shape if d != 1])]
    axes = [_norm_axis(a, len(shape), "Squeeze") for a in axes]
    for a in axes:
        if isinstance(shape[a], int) and shape[a] != 1:
            raise ShapeError(f"Squeeze: dim {a} has size {shape[a]}, not 1")
    return [ins[0].with_shape([d for i, d in enumerate(shape) if i not in axes])]


def infer_unsqueeze(ins, attrs, consts):
    shape = list(_need_rank(ins[0], "Unsqueeze"))
    rank = len(shape) + len(attrs["axes"])
    for a in sorted(_norm_axis(a, rank, "Unsqueeze") for a in attrs["axes"]):
        shape.insert(a, 1)
    return [ins[0].with_shape(shape)]


def infer_expand(ins, attrs, consts):
    target = _ints(consts[1])
    if target is None:
        # Contents unknown, length known: each output dim is the input's where that is a
        # static size other than 1 (the target can only be 1 or equal there), else unknown.
        n = ins[1].shape[0] if ins[1].shape else None
        if not isinstance(n, int):
            return [ins[0].with_shape(None)]
        src = list(ins[0].shape) if ins[0].shape is not None else []
        rank = max(n, len(src))
        kept = [None] * (rank - len(src)) + [d if isinstance(d, int) and d != 1 else None for d in src]
        return [ins[0].with_shape(kept if ins[0].shape is not None else [None] * rank)]
    return [ins[0].with_shape(broadcast_shapes(ins[0].shape, tuple(target)))]


def infer_concat(ins, attrs, consts):
    dtype = _same_dtype(ins, "Concat")
    shapes = [_need_rank(t, "Concat") for t in ins]
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        raise ShapeError(f"Concat: ranks differ {[tuple(s) for s in shapes]}")
    axis = _norm_axis(attrs["axis"], rank, "Concat")
    out = list(shapes[0])
    for s in shapes[1:]:
        out[axis] = dim_add(out[axis], s[axis])
        for i in range(rank):
            if i != axis and isinstance(out[i], int) and isinstance(s[i], int) and out[i] != s[i]:
                raise ShapeError(f"Concat: dim {i} differs ({out[i]} vs {s[i]})")
    return [TensorType(dtype, tuple(out))]


def infer_split(ins, attrs, consts):
    shape = _need_rank(ins[0], "Split")
    axis = _norm_axis(attrs.get("axis", 0), len(shape), "Split")
    sizes = attrs.get("split")
    if sizes is None:
        n = attrs.get("num_outputs")
        if n is None or not isinstance(shape[axis], int) or shape[axis] % n:
            raise ShapeError("Split: give `split` sizes, or `num_outputs` dividing a static dim")
        sizes = [shape[axis] // n] * n
    if isinstance(shape[axis], int) and sum(sizes) != shape[axis]:
        raise ShapeError(f"Split: sizes {list(sizes)} do not add up to dim {shape[axis]}")
    return [ins[0].with_shape([s if i == axis else d for i, d in enumerate(shape)]) for s in sizes]


def _slice_len(start: int, end: int, step: int, dim: int) -> int:
    """Length of an ONNX slice; unlike Python, a negative-step start below -dim clamps to 0."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return max(0, -(-(end - start) // step))
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return max(0, -(-(start - end) // -step))


def infer_slice(ins, attrs, consts):
    shape = _need_rank(ins[0], "Slice")
    starts, ends = _ints(consts[1]), _ints(consts[2])
    axes = _static_ints(consts[3]) if len(consts) > 3 else None
    steps = _static_ints(consts[4]) if len(consts) > 4 else None
    if len(ins) > 3 and ins[3] is not None and axes is None:
        return [ins[0].with_shape([None] * len(shape))]
    if starts is None or ends is None:
        axes = axes if axes is not None else list(range(ins[1].shape[0] if ins[1].shape else 0))
        return [ins[0].with_shape([None if i in [a % len(shape) for a in axes] else d for i, d in enumerate(shape)])]
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    out = list(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _norm_axis(a, len(shape), "Slice")
        dim = shape[a]
        if not (isinstance(s, int) and isinstance(st, int)):
            out[a] = None
        elif not isinstance(e, int):
            # x[0:seq] keeps the symbol (ONNX clamps to the dim; the model asked for seq rows).
            out[a] = e if (s == 0 and st == 1) else None
        elif isinstance(dim, int):
            out[a] = _slice_len(s, e, st, dim)
        elif s == 0 and st == 1 and e >= 2**62:
            out[a] = dim
        elif s >= 0 and e >= 0 and st == 1 and e < 2**62:
            out[a] = e - s  # assumes the symbolic dim is long enough, as the user asked for it
        else:
            out[a] = None
    return [ins[0].with_shape(out)]


def infer_gather(ins, attrs, consts):
    shape = _need_rank(ins[0], "Gather")
    idx = _need_rank(ins[1], "Gather")
    if not ins[1].dtype.is_int:
        raise ShapeError(f"Gather: indices must be integers, got {ins[1].dtype.name}")
    axis = _norm_axis(attrs.get("axis", 0), len(shape), "Gather")
    return [ins[0].with_shape(tuple(shape[:axis]) + tuple(idx) + tuple(shape[axis + 1:]))]


def infer_where(ins, attrs, consts):
    if ins[0].dtype is not DType.bool:
        raise ShapeError(f"Where: condition must be bool, got {ins[0].dtype.name}")
    dtype = _same_dtype(ins[1:], "Where")
    return [TensorType(dtype, broadcast_shapes(*(t.shape for t in ins)))]


def infer_cast(ins, attrs, consts):
    return [ins[0].with_dtype(DType.of(attrs["to"]))]


def infer_shape(ins, attrs, consts):
    rank = ins[0].rank
    if rank is None:
        return [TensorType(DType.int64, (None,))]
    start, end = attrs.get("start", 0), attrs.get("end")
    return [TensorType(DType.int64, (len(range(rank)[start:end]),))]


def infer_constant_of_shape(ins, attrs, consts):
    value = attrs.get("value")
    dtype = DType.float32 if value is None else DType.of(np.asarray(value).dtype)
    target = _ints(consts[0])
    if target is not None:
        return [TensorType(dtype, tuple(target))]
    n = ins[0].shape[0] if ins[0].shape else None
    return [TensorType(dtype, None if not isinstance(n, int) else (None,) * n)]


def infer_range(ins, attrs, consts):
    dtype = _same_dtype(ins, "Range")
    if all(isinstance(c, np.ndarray) for c in consts):
        start, limit, delta = (np.asarray(c).item() for c in consts)
        return [TensorType(dtype, (len(np.arange(start, limit, delta)),))]
    start, limit, delta = (_ints(c) for c in consts)
    if start is not None and limit is not None and delta == [1]:
        return [TensorType(dtype, (dim_add(limit[0], -start[0]) if isinstance(start[0], int) else None,))]
    return [TensorType(dtype, (None,))]


def infer_trilu(ins, attrs, consts):
    shape = _need_rank(ins[0], "Trilu")
    if len(shape) < 2:
        raise ShapeError("Trilu: input must have rank >= 2")
    return [ins[0]]


def infer_cumsum(ins, attrs, consts):
    t = ins[0]
    if not (t.dtype.is_int or t.dtype.is_float):
        raise ShapeError(f"CumSum: expected a numeric tensor, got {t.dtype.name}")
    _norm_axis(attrs["axis"], len(_need_rank(t, "CumSum")), "CumSum")
    return [t]


def infer_isnan(ins, attrs, consts):
    if not ins[0].dtype.is_float:
        raise ShapeError(f"IsNaN: expected a float tensor, got {ins[0].dtype.name}")
    return [TensorType(DType.bool, ins[0].shape)]


def infer_flatten(ins, attrs, consts):
    shape = _need_rank(ins[0], "Flatten")
    axis = attrs.get("axis", 1)
    if not -len(shape) <= axis <= len(shape):
        raise ShapeError(f"Flatten: axis {axis} out of range for rank {len(shape)}")
    axis = axis + len(shape) if axis < 0 else axis
    return [ins[0].with_shape((_sym_product(shape[:axis]), _sym_product(shape[axis:])))]


def infer_gather_elements(ins, attrs, consts):
    shape, idx = _need_rank(ins[0], "GatherElements"), _need_rank(ins[1], "GatherElements")
    if not ins[1].dtype.is_int:
        raise ShapeError(f"GatherElements: indices must be integers, got {ins[1].dtype.name}")
    if len(shape) != len(idx):
        raise ShapeError(f"GatherElements: data rank {len(shape)} != indices rank {len(idx)}")
    _norm_axis(attrs.get("axis", 0), len(shape), "GatherElements")
    return [ins[0].with_shape(idx)]


def infer_gather_nd(ins, attrs, consts):
    shape, idx = _need_rank(ins[0], "GatherND"), _need_rank(ins[1], "GatherND")
    b, k = attrs.get("batch_dims", 0), idx[-1] if idx else None
    if ins[1].dtype is not DType.int64:
        raise ShapeError(f"GatherND: indices must be int64, got {ins[1].dtype.name}")
    if not isinstance(k, int) or not 1 <= k <= len(shape) - b:
        raise ShapeError(f"GatherND: the last indices dim ({k}) must be static and in 1..{len(shape) - b}")
    return [ins[0].with_shape(tuple(idx[:-1]) + tuple(shape[b + k:]))]


def infer_causal_mask(ins, attrs, consts):
    if len(_need_rank(ins[0], "CausalMask")) < 2:
        raise ShapeError("CausalMask: scores must have rank >= 2")
    window = attrs.get("window", 0)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ShapeError(f"CausalMask: window must be an integer >= 0 (0: no window), got {window!r}")
    return infer_float_unary(ins, attrs, consts)


# ---------------------------------------------------------------- the table
# ---------------------------------------------------------------- symbolic contents
def _sym_shape(c, attrs, ins):
    return None if ins[0].shape is None else ins[0].shape[attrs.get("start", 0):attrs.get("end")]


def _sym_gather(c, attrs, ins):
    data, idx = _ints(c[0]), c[1]
    if data is None or idx is None or isinstance(idx, tuple) or attrs.get("axis", 0) != 0:
        return None
    picked = [data[int(i)] for i in np.asarray(idx).reshape(-1)]
    return tuple(picked)


def _sym_concat(c, attrs, ins):
    parts = [_ints(x) for x in c]
    return None if any(p is None for p in parts) else tuple(d for p in parts for d in p)


def _sym_slice(c, attrs, ins):
    """A positive-step slice of a 1-D shape tensor (dynamo exports slice Shape outputs)."""
    data = _ints(c[0])
    starts, ends = _static_ints(c[1]), _static_ints(c[2])
    steps = _static_ints(c[4]) if len(c) > 4 and c[4] is not None else [1]
    axes = _static_ints(c[3]) if len(c) > 3 and c[3] is not None else [0]
    if data is None or starts is None or ends is None or steps is None or len(starts) != 1 \
            or len(ends) != 1 or axes not in ([0], [-1]) or steps[0] < 1:
        return None
    return tuple(data[starts[0]:ends[0]:steps[0]])   # Python slicing clamps like ONNX for steps > 0


def _sym_passthrough(c, attrs, ins):
    dims = _ints(c[0])
    return None if dims is None else tuple(dims)


def _sym_arith(fn):
    def sym(c, attrs, ins):
        a, b = _ints(c[0]), _ints(c[1])
        if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        n = max(len(a), len(b))
        a, b = a * (n if len(a) == 1 else 1), b * (n if len(b) == 1 else 1)
        return tuple(fn(x, y) for x, y in zip(a, b))
    return sym


def _sym_sub(x, y):
    return x - y if isinstance(x, int) and isinstance(y, int) else dim_add(x, f"-{y}") if isinstance(y, str) else dim_add(x, -y)


def _def(name, infer, kernel, inputs=(1, 1), **kw):
    return register(OpDef(name, infer, kernel, inputs, **kw))


_np = np
_def("Add", infer_elementwise, _np.add, (2, 2), sym=_sym_arith(dim_add), traits=frozenset({"commutative", "elementwise"}))
_def("Sub", infer_elementwise, _np.subtract, (2, 2), sym=_sym_arith(_sym_sub), traits=frozenset({"elementwise"}))
_def("Mul", infer_elementwise, _np.multiply, (2, 2), sym=_sym_arith(dim_mul), traits=frozenset({"commutative", "elementwise"}))
_def("Div", infer_elementwise, kernels.div, (2, 2), traits=frozenset({"elementwise"}))
_def("Pow", infer_elementwise, _np.power, (2, 2), traits=frozenset({"elementwise"}))
_def("MatMul", infer_matmul, _np.matmul, (2, 2))
_def("Gemm", infer_gemm, kernels.gemm, (2, 3), attrs={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0})
_def("Sqrt", infer_float_unary, _np.sqrt, traits=frozenset({"elementwise"}))
_def("Reciprocal", infer_float_unary, _np.reciprocal, traits=frozenset({"elementwise"}))
_def("Neg", infer_unary, _np.negative, traits=frozenset({"elementwise"}))
_def("Exp", infer_float_unary, _np.exp, traits=frozenset({"elementwise"}))
_def("Log", infer_float_unary, _np.log, traits=frozenset({"elementwise"}))
_def("Erf", infer_float_unary, kernels.erf, traits=frozenset({"elementwise"}))
_def("Tanh", infer_float_unary, _np.tanh, traits=frozenset({"elementwise"}))
_def("Sigmoid", infer_float_unary, kernels.sigmoid, traits=frozenset({"elementwise"}))
_def("Relu", infer_unary, kernels.relu, traits=frozenset({"elementwise"}))
_def("Cos", infer_float_unary, _np.cos, traits=frozenset({"elementwise"}))
_def("Sin", infer_float_unary, _np.sin, traits=frozenset({"elementwise"}))
_def("Identity", infer_unary, _np.asarray, sym=_sym_passthrough, traits=frozenset({"elementwise", "layout"}))
_def("Not", infer_unary, _np.logical_not, traits=frozenset({"elementwise", "comparison"}))
_def("And", infer_compare, _np.logical_and, (2, 2), traits=frozenset({"commutative", "elementwise", "comparison"}))
_def("Or", infer_compare, _np.logical_or, (2, 2), traits=frozenset({"commutative", "elementwise", "comparison"}))
_def("Equal", infer_compare, _np.equal, (2, 2), traits=frozenset({"commutative", "elementwise", "comparison"}))
_def("Less", infer_compare, _np.less, (2, 2), traits=frozenset({"elementwise", "comparison"}))
_def("Greater", infer_compare, _np.greater, (2, 2), traits=frozenset({"elementwise", "comparison"}))
_def("LessOrEqual", infer_compare, _np.less_equal, (2, 2), traits=frozenset({"elementwise", "comparison"}))
_def("GreaterOrEqual", infer_compare, _np.greater_equal, (2, 2), traits=frozenset({"elementwise", "comparison"}))
_def("IsNaN", infer_isnan, _np.isnan, traits=frozenset({"elementwise", "comparison"}))
_def("Softmax", infer_softmax, kernels.softmax, attrs={"axis": -1})
_def("ReduceMean", infer_reduce, kernels.reduce_mean, attrs={"axes": None, "keepdims": 1},
     onnx=OnnxInterface((AttrInput("axes", 1, since=18),)))
_def("ReduceSum", infer_reduce, kernels.reduce_sum, attrs={"axes": None, "keepdims": 1},
     onnx=OnnxInterface((AttrInput("axes", 1, since=13),)))
_def("ReduceMax", infer_reduce, kernels.reduce_max, attrs={"axes": None, "keepdims": 1},
     onnx=OnnxInterface((AttrInput("axes", 1, since=18),)))
_def("Transpose", infer_transpose, kernels.transpose, attrs={"perm": None}, traits=frozenset({"layout"}))
_def("Reshape", infer_reshape, kernels.reshape, (2, 2), attrs={"allowzero": 0}, traits=frozenset({"layout"}))
_def("Squeeze", infer_squeeze, kernels.squeeze, attrs={"axes": None}, sym=_sym_passthrough,
     onnx=OnnxInterface((AttrInput("axes", 1, since=13),)), traits=frozenset({"layout"}))
_def("Unsqueeze", infer_unsqueeze, kernels.unsqueeze, attrs={"axes": REQUIRED}, sym=_sym_passthrough,
     onnx=OnnxInterface((AttrInput("axes", 1, since=13),)), traits=frozenset({"layout"}))
_def("Expand", infer_expand, kernels.expand, (2, 2), traits=frozenset({"layout"}))
_def("Concat", infer_concat, kernels.concat, (1, 1 << 16), attrs={"axis": REQUIRED}, sym=_sym_concat, traits=frozenset({"layout"}))
_def("Split", infer_split, kernels.split, attrs={"axis": 0, "split": None, "num_outputs": None}, num_outputs=None,
     onnx=OnnxInterface((AttrInput("split", 1, since=13),)), traits=frozenset({"layout"}))
_def("Slice", infer_slice, kernels.slice, (3, 5), sym=_sym_slice, traits=frozenset({"layout"}))
_def("Gather", infer_gather, kernels.gather, (2, 2), attrs={"axis": 0}, sym=_sym_gather, traits=frozenset({"layout"}))
_def("GatherElements", infer_gather_elements, kernels.gather_elements, (2, 2), attrs={"axis": 0}, traits=frozenset({"layout"}))
_def("GatherND", infer_gather_nd, kernels.gather_nd, (2, 2), attrs={"batch_dims": 0}, traits=frozenset({"layout"}))
_def("Max", infer_elementwise, kernels.maximum, (1, 1 << 16), traits=frozenset({"commutative", "elementwise"}))
_def("Flatten", infer_flatten, kernels.flatten, attrs={"axis": 1}, traits=frozenset({"layout"}))
_def("Where", infer_where, _np.where, (3, 3), traits=frozenset({"elementwise"}))
_def("Cast", infer_cast, kernels.cast, attrs={"to": REQUIRED},
     sym=lambda c, a, i: _sym_passthrough(c, a, i) if DType.of(a["to"]) in (DType.int64, DType.int32) else None, traits=frozenset({"elementwise", "conversion"}))
_def("Trilu", infer_trilu, kernels.trilu, (1, 2), attrs={"upper": 1})
_def("Shape", infer_shape, kernels.shape, attrs={"start": 0, "end": None}, sym=_sym_shape, traits=frozenset({"shape_only"}))
_def("ConstantOfShape", infer_constant_of_shape, kernels.constant_of_shape, attrs={"value": None})
_def("Range", infer_range, kernels.range_, (3, 3))
_def("CumSum", infer_cumsum, kernels.cumsum, attrs={"axis": REQUIRED, "exclusive": 0, "reverse": 0},
     onnx=OnnxInterface((AttrInput("axis", 1, since=11, rank=0),)),
     doc="Running sum along `axis` (an attribute here; an input in ONNX).")
_def("CausalMask", infer_causal_mask, kernels.causal_mask, domain="tgraph", attrs={"window": 0},
     doc="Keep scores[..., i, j] where j <= i + (Tk - Tq) (and, with window W > 0, j > i + (Tk - Tq) - W), "
         "else the dtype's lowest value.", traits=frozenset({"elementwise"}))
