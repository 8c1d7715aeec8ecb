"""More of ONNX's default domain: ops that Transformer graphs from other exporters carry
but tgraph never emits itself (registered into the same `OPS` table on import).

They exist so that `import_onnx` can read what PyTorch's exporters, Hugging Face Optimum,
onnxruntime's transformer optimizer and quantizers write (ArgMax for greedy decoding,
TopK for sampling, CastLike and Size in function bodies, Clip/Min/Max in masks,
Einsum in attention, Quantize/DequantizeLinear in quantized models, the activation zoo),
run them in the NumPy backend and write them back unchanged. Semantics are ONNX's, in the
reference kernels of `tgraph.ir.kernels`.

Attributes that a later opset added are `None` by default (unset), so that the lowering
writes them only when a model set them, and a model of an older opset stays valid.
Some existing entries gain such attributes here (Cast's `saturate`) through
`dataclasses.replace`, which keeps every other field of the entry as its owner wrote it.
"""
from __future__ import annotations

import dataclasses
import re
import numpy as np

from ..errors import ShapeError
from . import kernels
from .opdefs import (OPS, REQUIRED, AttrInput, OnnxInterface, OpDef, _need_rank, _norm_axis, _same_dtype,
                     _static_ints, broadcast_shapes, infer_compare, infer_elementwise, infer_float_unary,
                     infer_reduce, infer_softmax, register)
from .types import DType, TensorType

VARIADIC = (1, 1 << 16)


def _def(name, infer, kernel, inputs=(1, 1), **kw):
    return register(OpDef(name, infer, kernel, inputs, **kw))


# ---------------------------------------------------------------- inference rules
def infer_numeric_unary(ins, attrs, consts):
    if ins[0].dtype is DType.bool:
        raise ShapeError("expected a numeric tensor, got bool")
    return [ins[0]]


def infer_bool_binary(ins, attrs, consts):
    for t in ins:
        if t.dtype is not DType.bool:
            raise ShapeError(f"expected bool tensors, got {t.dtype.name}")
    return infer_compare(ins, attrs, consts)


def infer_isinf(ins, attrs, consts):
    if not ins[0].dtype.is_float:
        raise ShapeError(f"IsInf: expected a float tensor, got {ins[0].dtype.name}")
    return [TensorType(DType.bool, ins[0].shape)]


def infer_clip(ins, attrs, consts):
    bounds = [t for t in ins[1:] if t is not None]
    _same_dtype([ins[0], *bounds], "Clip")
    for t in bounds:
        if t.shape is not None and len(t.shape) != 0 and tuple(t.shape) != (1,):
            raise ShapeError(f"Clip: min and max must be scalars, got {t}")
    return [ins[0]]


def infer_cast_like(ins, attrs, consts):
    return [ins[0].with_dtype(ins[1].dtype)]


def infer_size(ins, attrs, consts):
    return [TensorType(DType.int64, ())]


def infer_arg(ins, attrs, consts):
    shape = _need_rank(ins[0], "ArgMax/ArgMin")
    axis = _norm_axis(attrs.get("axis", 0), len(shape), "ArgMax/ArgMin")
    keep = attrs.get("keepdims", 1)
    out = [1 if i == axis else d for i, d in enumerate(shape)] if keep else [d for i, d in enumerate(shape) if i != axis]
    return [TensorType(DType.int64, tuple(out))]


def infer_dropout(ins, attrs, consts):
    if len(ins) > 1 and ins[1] is not None and not ins[1].dtype.is_float:
        raise ShapeError(f"Dropout: ratio must be a float scalar, got {ins[1]}")
    if len(ins) > 2 and ins[2] is not None and ins[2].dtype is not DType.bool:
        raise ShapeError(f"Dropout: training_mode must be a bool scalar, got {ins[2]}")
    return [ins[0], TensorType(DType.bool, ins[0].shape)]


def infer_topk(ins, attrs, consts):
    shape = _need_rank(ins[0], "TopK")
    axis = _norm_axis(attrs.get("axis", -1), len(shape), "TopK")
    k = _static_ints(consts[1])
    if ins[1].dtype is not DType.int64:
        raise ShapeError(f"TopK: K must be int64, got {ins[1].dtype.name}")
    n = k[0] if k is not None and len(k) == 1 else None
    if isinstance(n, int) and isinstance(shape[axis], int) and not 0 <= n <= shape[axis]:
        raise ShapeError(f"TopK: K={n} is outside 0..{shape[axis]} (the axis' length)")
    out = tuple(n if i == axis else d for i, d in enumerate(shape))
    return [ins[0].with_shape(out), TensorType(DType.int64, out)]


def infer_pad(ins, attrs, consts):
    shape = _need_rank(ins[0], "Pad")
    if attrs.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        raise ShapeError(f"Pad: mode {attrs.get('mode')!r} is not one of constant, reflect, edge, wrap")
    pads = _static_ints(consts[1])
    axes = _static_ints(consts[3]) if len(consts) > 3 and ins[3] is not None else list(range(len(shape)))
    if len(consts) > 3 and ins[3] is not None and axes is None:
        return [ins[0].with_shape([None] * len(shape))]
    if pads is None:
        return [ins[0].with_shape([None if i in [a % len(shape) for a in axes] else d for i, d in enumerate(shape)])]
    if len(pads) != 2 * len(axes):
        raise ShapeError(f"Pad: {len(pads)} pads for {len(axes)} axes")
    out = list(shape)
    for i, a in enumerate(axes):
        a = _norm_axis(a, len(shape), "Pad")
        out[a] = shape[a] + pads[i] + pads[i + len(axes)] if isinstance(shape[a], int) else None
    return [ins[0].with_shape(out)]


def infer_tile(ins, attrs, consts):
    shape = _need_rank(ins[0], "Tile")
    reps = _static_ints(consts[1])
    if reps is None:
        return [ins[0].with_shape([None] * len(shape))]
    if len(reps) != len(shape):
        raise ShapeError(f"Tile: {len(reps)} repeats for rank {len(shape)}")
    return [ins[0].with_shape([d * r if isinstance(d, int) else (d if r == 1 else None) for d, r in zip(shape, reps)])]


def infer_einsum(ins, attrs, consts):
    eq = attrs["equation"].replace(" ", "")
    dtype = _same_dtype(ins, "Einsum")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ins):
        raise ShapeError(f"Einsum: equation {eq!r} has {len(terms)} operands, got {len(ins)} inputs")
    if not re.fullmatch(r"[A-Za-z.,\->]*", eq):
        raise ShapeError(f"Einsum: invalid equation {eq!r}")
    sizes: dict = {}
    ell: tuple = ()
    for term, t in zip(terms, ins):
        shape = _need_rank(t, "Einsum")
        letters = term.replace("...", "")
        n_ell = len(shape) - len(letters)
        if n_ell < 0 or (n_ell and "..." not in term):
            raise ShapeError(f"Einsum: operand {term!r} does not fit shape {t}")
        pos = term.find("...")
        dims = list(shape)
        if pos >= 0:
            ell_dims = tuple(dims[pos:pos + n_ell])
            ell = tuple(broadcast_shapes(ell, ell_dims)) if ell else ell_dims
            dims = dims[:pos] + dims[pos + n_ell:]
        for c, d in zip(letters, dims):
            if c in sizes and isinstance(d, int) and isinstance(sizes[c], int) and d != sizes[c] and 1 not in (d, sizes[c]):
                raise ShapeError(f"Einsum: {c!r} is {sizes[c]} and {d}")
            sizes[c] = d if c not in sizes or sizes[c] == 1 else sizes[c]
    if not arrow:
        once = sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1)
        rhs = ("..." if "..." in lhs else "") + "".join(once)
    out = []
    for part in re.findall(r"\.\.\.|[A-Za-z]", rhs):
        out.extend(ell if part == "..." else [sizes.get(part)])
    return [TensorType(dtype, tuple(out))]


def infer_scatter(ins, attrs, consts):
    data, indices, updates = ins
    if not indices.dtype.is_int:
        raise ShapeError(f"Scatter: indices must be integers, got {indices.dtype.name}")
    _same_dtype([data, updates], "Scatter")
    if attrs.get("reduction", "none") not in ("none", "add", "mul", "max", "min"):
        raise ShapeError(f"Scatter: unknown reduction {attrs.get('reduction')!r}")
    return [data]


def infer_eye_like(ins, attrs, consts):
    shape = _need_rank(ins[0], "EyeLike")
    if len(shape) != 2:
        raise ShapeError(f"EyeLike: input must be 2-D, got {ins[0]}")
    dtype = attrs.get("dtype")
    return [TensorType(ins[0].dtype if dtype is None else DType.of(dtype), shape)]


def infer_one_hot(ins, attrs, consts):
    shape = _need_rank(ins[0], "OneHot")
    depth = consts[1]
    d = int(np.asarray(depth).reshape(-1)[0]) if isinstance(depth, np.ndarray) else None
    rank = len(shape) + 1
    axis = _norm_axis(attrs.get("axis", -1), rank, "OneHot")
    out = list(shape)
    out.insert(axis, d)
    return [TensorType(ins[2].dtype, tuple(out))]


def infer_non_zero(ins, attrs, consts):
    return [TensorType(DType.int64, (len(_need_rank(ins[0], "NonZero")), None))]


def infer_prelu(ins, attrs, consts):
    dtype = _same_dtype(ins, "PRelu")
    return [TensorType(dtype, broadcast_shapes(ins[0].shape, ins[1].shape))]


def infer_dequantize(ins, attrs, consts):
    out = attrs.get("output_dtype") or 0
    dtype = DType.of(out) if out else ins[1].dtype
    return [TensorType(dtype, ins[0].shape)]


def infer_quantize(ins, attrs, consts):
    out = attrs.get("output_dtype") or 0
    if len(ins) > 2 and ins[2] is not None:
        dtype = ins[2].dtype
    else:
        dtype = DType.of(out) if out else DType.uint8
    return [TensorType(dtype, ins[0].shape)]


def infer_dynamic_quantize(ins, attrs, consts):
    if ins[0].dtype is not DType.float32:
        raise ShapeError(f"DynamicQuantizeLinear: input must be float32, got {ins[0].dtype.name}")
    return [TensorType(DType.uint8, ins[0].shape), TensorType(DType.float32, ()), TensorType(DType.uint8, ())]


def infer_matmul_integer(ins, attrs, consts):
    from .opdefs import infer_matmul

    a, b = ins[0], ins[1]
    (t,) = infer_matmul([a.with_dtype(DType.int32), b.with_dtype(DType.int32)], attrs, consts)
    return [t]


def infer_variadic(ins, attrs, consts):
    return infer_elementwise(ins, attrs, consts)


# ---------------------------------------------------------------- the table
k = kernels
_def("Abs", infer_numeric_unary, k.abs_, traits=frozenset({"elementwise"}))
_def("Ceil", infer_float_unary, k.ceil, traits=frozenset({"elementwise"}))
_def("Floor", infer_float_unary, k.floor, traits=frozenset({"elementwise"}))
_def("Round", infer_float_unary, k.round_, traits=frozenset({"elementwise"}))
_def("Sign", infer_numeric_unary, k.sign, traits=frozenset({"elementwise"}))
_def("IsInf", infer_isinf, k.isinf, attrs={"detect_negative": 1, "detect_positive": 1}, traits=frozenset({"elementwise", "comparison"}))
_def("Mod", infer_elementwise, k.mod, (2, 2), attrs={"fmod": 0}, traits=frozenset({"elementwise"}))
_def("Xor", infer_bool_binary, k.xor, (2, 2), traits=frozenset({"commutative", "elementwise", "comparison"}))
_def("Min", infer_variadic, k.minimum, VARIADIC, traits=frozenset({"commutative", "elementwise"}))
_def("Sum", infer_variadic, k.sum_, VARIADIC, traits=frozenset({"commutative", "elementwise"}))
_def("Mean", infer_variadic, k.mean, VARIADIC, traits=frozenset({"commutative", "elementwise"}))
_def("Clip", infer_clip, k.clip, (1, 3), traits=frozenset({"elementwise"}))
_def("Size", infer_size, k.size, traits=frozenset({"shape_only"}))
_def("CastLike", infer_cast_like, k.cast_like, (2, 2), attrs={"saturate": None}, traits=frozenset({"elementwise", "conversion"}))
_def("ArgMax", infer_arg, k.arg_max, attrs={"axis": 0, "keepdims": 1, "select_last_index": 0})
_def("ArgMin", infer_arg, k.arg_min, attrs={"axis": 0, "keepdims": 1, "select_last_index": 0})
for _name, _kernel in (("ReduceMin", k.reduce_min), ("ReduceProd", k.reduce_prod), ("ReduceL1", k.reduce_l1),
                       ("ReduceL2", k.reduce_l2), ("ReduceSumSquare", k.reduce_sum_square),
                       ("ReduceLogSum", k.reduce_log_sum), ("ReduceLogSumExp", k.reduce_log_sum_exp)):
    _def(_name, infer_reduce, _kernel, attrs={"axes": None, "keepdims": 1},
         onnx=OnnxInterface((AttrInput("axes", 1, since=18),)))
_def("LogSoftmax", infer_softmax, k.log_softmax, attrs={"axis": -1})
_def("Hardmax", infer_softmax, k.hardmax, attrs={"axis": -1})
_def("Dropout", infer_dropout, k.dropout, (1, 3), attrs={"seed": None}, num_outputs=2,
     doc="the identity and an all-true mask, unless training_mode (random, seeded by `seed`)")
_def("TopK", infer_topk, k.top_k, (2, 2), attrs={"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
_def("Pad", infer_pad, k.pad, (2, 4), attrs={"mode": "constant"})
_def("Tile", infer_tile, k.tile, (2, 2), traits=frozenset({"layout"}))
_def("Einsum", infer_einsum, k.einsum, VARIADIC, attrs={"equation": REQUIRED})
_def("ScatterElements", infer_scatter, k.scatter_elements, (3, 3), attrs={"axis": 0, "reduction": None})
_def("ScatterND", infer_scatter, k.scatter_nd, (3, 3), attrs={"reduction": None})
_def("EyeLike", infer_eye_like, k.eye_like, attrs={"dtype": None, "k": 0})
_def("OneHot", infer_one_hot, k.one_hot, (3, 3), attrs={"axis": -1})
_def("NonZero", infer_non_zero, k.non_zero)
_def("LeakyRelu", infer_float_unary, k.leaky_relu, attrs={"alpha": 0.01}, traits=frozenset({"elementwise"}))
_def("PRelu", infer_prelu, k.prelu, (2, 2), traits=frozenset({"elementwise"}))
_def("Elu", infer_float_unary, k.elu, attrs={"alpha": 1.0}, traits=frozenset({"elementwise"}))
_def("Selu", infer_float_unary, k.selu, attrs={"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}, traits=frozenset({"elementwise"}))
_def("Celu", infer_float_unary, k.celu, attrs={"alpha": 1.0}, traits=frozenset({"elementwise"}))
_def("HardSigmoid", infer_float_unary, k.hard_sigmoid, attrs={"alpha": 0.2, "beta": 0.5}, traits=frozenset({"elementwise"}))
_def("HardSwish", infer_float_unary, k.hard_swish, traits=frozenset({"elementwise"}))
_def("Softplus", infer_float_unary, k.softplus, traits=frozenset({"elementwise"}))
_def("Softsign", infer_float_unary, k.softsign, traits=frozenset({"elementwise"}))
_def("ThresholdedRelu", infer_float_unary, k.thresholded_relu, attrs={"alpha": 1.0}, traits=frozenset({"elementwise"}))
_def("Mish", infer_float_unary, k.mish, traits=frozenset({"elementwise"}))
_def("Swish", infer_float_unary, k.swish, attrs={"alpha": 1.0}, traits=frozenset({"elementwise"}))
_def("DequantizeLinear", infer_dequantize, k.dequantize_linear, (2, 3),
     attrs={"axis": 1, "block_size": None, "output_dtype": None})
_def("QuantizeLinear", infer_quantize, k.quantize_linear, (2, 3),
     attrs={"axis": 1, "block_size": None, "output_dtype": None, "saturate": None, "precision": None})
_def("DynamicQuantizeLinear", infer_dynamic_quantize, k.dynamic_quantize_linear, num_outputs=3)
_def("MatMulInteger", infer_matmul_integer, k.matmul_integer, (2, 4))

def infer_pow(ins, attrs, consts):
    """ONNX Pow: base and exponent may have different numeric types; the result has the base's."""
    for t in ins:
        if t.dtype is DType.bool:
            raise ShapeError("Pow of a bool tensor")
    return [TensorType(ins[0].dtype, broadcast_shapes(ins[0].shape, ins[1].shape))]


def infer_split_uneven(ins, attrs, consts, _even=OPS["Split"].infer):
    """Split-18 `num_outputs` that does not divide the dim: every chunk ceil(dim / n), the last smaller."""
    shape = ins[0].shape
    n, sizes = attrs.get("num_outputs"), attrs.get("split")
    if shape is not None and sizes is None and n and (len(ins) < 2 or ins[1] is None):
        axis = _norm_axis(attrs.get("axis", 0), len(shape), "Split")
        dim = shape[axis]
        if isinstance(dim, int) and dim % n:
            size = -(-dim // n)
            if size * (n - 1) >= dim:
                raise ShapeError(f"Split: {n} outputs of {size} overrun dim {dim}")
            sizes = [size] * (n - 1) + [dim - size * (n - 1)]
            return [ins[0].with_shape([s if i == axis else d for i, d in enumerate(shape)]) for s in sizes]
    return _even(ins, attrs, consts)


OPS["MatMul"] = dataclasses.replace(OPS["MatMul"], kernel=k.matmul)
OPS["Pow"] = dataclasses.replace(OPS["Pow"], infer=infer_pow, kernel=k.pow_)
OPS["Split"] = dataclasses.replace(OPS["Split"], infer=infer_split_uneven)

# Cast keeps ONNX's `saturate` (float8 targets; Cast-19 and later)
OPS["Cast"] = dataclasses.replace(OPS["Cast"], attrs={**OPS["Cast"].attrs, "saturate": None})


# ---------------------------------------------------------------- attributes given at run time
# ONNX moved static parameters to inputs (Reduce* axes, Squeeze/Unsqueeze axes, Split sizes,
# CumSum's axis). The IR keeps a constant one as an attribute (passes read it); one computed
# at run time stays an input at its ONNX position, and the output shape is then only as
# known as these rules say. Each rule: (input types, attrs) -> output types.
def _runtime_reduce(ins, attrs):
    x = ins[0]
    return [x.with_shape(None if x.shape is None or not attrs.get("keepdims", 1) else [None] * len(x.shape))]


def _runtime_unsqueeze(ins, attrs):
    n = ins[1].shape[0] if ins[1].shape is not None and len(ins[1].shape) == 1 else None
    rank = ins[0].rank
    return [ins[0].with_shape(None if not isinstance(n, int) or rank is None else [None] * (rank + n))]


def _runtime_split(ins, attrs):
    shape = _need_rank(ins[0], "Split")
    axis = _norm_axis(attrs.get("axis", 0), len(shape), "Split")
    n = attrs.get("num_outputs")
    if not n:
        raise ShapeError("Split: with sizes given at run time the number of outputs must be known")
    return [ins[0].with_shape([None if i == axis else d for i, d in enumerate(shape)]) for _ in range(n)]


_RUNTIME_SHAPES = {
    "Squeeze": lambda ins, attrs: [ins[0].with_shape(None)],
    "Unsqueeze": _runtime_unsqueeze,
    "Split": _runtime_split,
    "CumSum": lambda ins, attrs: [ins[0]],
    **{op: _runtime_reduce for op in OPS if op.startswith("Reduce")},
}


def _with_runtime_form(opdef: OpDef) -> OpDef:
    specs = opdef.onnx.attr_inputs
    rule = _RUNTIME_SHAPES[opdef.name]
    static_infer, most = opdef.infer, opdef.inputs[1]

    def infer(ins, attrs, consts):
        given = [s for s in specs if s.index < len(ins) and ins[s.index] is not None]
        if not given:
            missing = [s.attr for s in specs if opdef.attrs.get(s.attr) is REQUIRED and s.attr not in attrs]
            if missing:
                raise ShapeError(f"{opdef.name}: {missing[0]!r} is required (as an attribute or an input)")
            return static_infer(ins[:most], attrs, consts[:most])
        for s in given:
            if s.attr in attrs:
                raise ShapeError(f"{opdef.name}: {s.attr!r} given both as an attribute and as input {s.index}")
            t = ins[s.index]
            if not t.dtype.is_int or (t.shape is not None and len(t.shape) not in (s.rank, 1)):
                raise ShapeError(f"{opdef.name}: {s.attr} (input {s.index}) must be a {s.rank}-D integer tensor, "
                                 f"got {t}")
        return rule(ins, attrs)

    attrs = {a: (None if v is REQUIRED and a in {s.attr for s in specs} else v) for a, v in opdef.attrs.items()}
    if opdef.name.startswith("Reduce"):
        attrs["noop_with_empty_axes"] = None     # ONNX's meaning of an empty runtime axes input
    return dataclasses.replace(opdef, infer=infer, attrs=attrs,
                               inputs=(opdef.inputs[0], max(most, max(s.index for s in specs) + 1)))


for _key in [key for key, d in OPS.items() if d.onnx.attr_inputs and d.name in _RUNTIME_SHAPES and not d.domain]:
    OPS[_key] = _with_runtime_form(OPS[_key])


def runtime_attr_input(opdef: OpDef, spec: AttrInput) -> bool:
    """Whether the op accepts `spec`'s parameter as a tensor computed at run time."""
    return opdef.inputs[1] > spec.index


# ---------------------------------------------------------------- Attention, all of ONNX's
# The fused Attention (tgraph.ir.fused) as ONNX defines it in opsets 23-25: past key/value
# (then the node also has the present outputs), nonpad_kv_seqlen (24), softcap, the
# qk_matmul_output output and its mode, the sliding window (25). A node has one output, or
# all four (Y, present_key, present_value, qk_matmul_output) when past_key is given or
# qk_matmul_output_mode is set; the lowering writes only those something reads.
def _infer_full_attention(ins, attrs, consts, _basic=OPS["Attention"].infer):
    extra = [t for t in ins[4:] if t is not None]
    if not extra and attrs.get("qk_matmul_output_mode") is None:
        return _basic(ins[:4], attrs, consts[:4])
    q, k, v = (_need_rank(t, "Attention") for t in ins[:3])
    dtype = _same_dtype(ins[:3], "Attention")
    past_key, past_value = (ins[i] if len(ins) > i else None for i in (4, 5))
    if (past_key is None) != (past_value is None):
        raise ShapeError("Attention: past_key and past_value go together")
    nonpad = ins[6] if len(ins) > 6 else None
    if nonpad is not None and past_key is not None:
        raise ShapeError("Attention: nonpad_kv_seqlen cannot be combined with past_key/past_value")
    if len(q) == 3:
        hq, hk = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
        if not hq or not hk:
            raise ShapeError("Attention: 3-D inputs need q_num_heads and kv_num_heads")
        split = lambda dims, n: (dims[0], n, dims[1], dims[2] // n if isinstance(dims[2], int) else None)
        q, k, v = split(q, hq), split(k, hk), split(v, hk)
        merged = True
    elif len(q) == 4:
        merged = False
    else:
        raise ShapeError("Attention: inputs must be 3-D or 4-D")
    if isinstance(q[1], int) and isinstance(k[1], int) and q[1] % k[1]:
        raise ShapeError(f"Attention: {q[1]} query heads are not a multiple of {k[1]} key/value heads")
    tk = k[2]
    if past_key is not None:
        pk = _need_rank(past_key, "Attention")
        tk = pk[2] + k[2] if isinstance(pk[2], int) and isinstance(k[2], int) else None
    present_k = TensorType(dtype, (k[0], k[1], tk, k[3]))
    present_v = TensorType(dtype, (v[0], v[1], tk, v[3]))
    y = TensorType(dtype, (q[0], q[2], q[1] * v[3] if isinstance(q[1], int) and isinstance(v[3], int) else None)
                   if merged else (q[0], q[1], q[2], v[3]))
    if past_key is None and attrs.get("qk_matmul_output_mode") is None:
        return [y]
    return [y, present_k, present_v, TensorType(dtype, (q[0], q[1], q[2], tk))]


OPS["Attention"] = dataclasses.replace(
    OPS["Attention"], infer=_infer_full_attention, kernel=k.onnx_attention, inputs=(3, 7), num_outputs=None,
    attrs={**OPS["Attention"].attrs, "softcap": None, "qk_matmul_output_mode": None, "left_window_size": None,
           "right_window_size": None})
