"""Reference semantics of every op, in plain NumPy.

These functions are the op table's meaning: constant folding evaluates them, the
op tests compare them with onnxruntime and `onnx.reference`, and the NumPy backend
copies the source of the ones a model uses into the generated module. Hence the
rules: each function is self-contained (it may use only `np`), takes inputs
positionally and attributes by keyword, and follows the ONNX operator's semantics.
"""
import numpy as np

import tgraph.ir.kernels as k   # kernels may call one another as k.<name> (the NumPy backend copies them)


def gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.T if transA else a
    b = b.T if transB else b
    y = alpha * (a @ b)
    if c is not None:
        y = y + beta * c
    return y.astype(a.dtype, copy=False)


def div(a, b):
    # ONNX Div: true division for floats, truncation toward zero for integers
    # (C semantics; Python's // floors). a - fmod(a, b) is an exact multiple of b.
    if np.issubdtype(np.asarray(a).dtype, np.integer):
        return (a - np.fmod(a, b)) // b
    return np.divide(a, b)


def erf(x):
    # Abramowitz-Stegun 7.1.26 is too coarse; use a high-precision series/continued
    # fraction split so fp32 results match onnxruntime to ~1e-7.
    x64 = np.asarray(x, dtype=np.float64)
    a = np.abs(x64)
    t = 1.0 / (1.0 + 0.5 * a)
    tau = t * np.exp(-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    y = np.where(x64 >= 0, 1.0 - tau, tau - 1.0)
    return y.astype(np.asarray(x).dtype)


def sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype, copy=False)


def relu(x):
    return np.maximum(x, np.zeros((), dtype=x.dtype))


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def reduce_mean(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    return np.mean(x, axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_sum(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    return np.sum(x, axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_max(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    # an empty reduction gives the dtype's lowest value (-inf for floats), as ONNX has it
    axis = k._reduce_axes(axes, noop_with_empty_axes)
    if x.size == 0:
        low = False if x.dtype == np.bool_ else -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
        return np.max(x, axis=axis, keepdims=bool(keepdims), initial=low)
    return np.max(x, axis=axis, keepdims=bool(keepdims))


def transpose(x, perm=None):
    return np.transpose(x, None if perm is None else [int(p) for p in perm])


def reshape(x, shape, allowzero=0):
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return np.reshape(x, dims)


def squeeze(x, axes=None):
    return np.squeeze(x, axis=None if axes is None else tuple(axes))


def unsqueeze(x, axes):
    rank = x.ndim + len(axes)
    for a in sorted(int(a) % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def expand(x, shape):
    return x * np.ones([int(d) for d in shape], dtype=x.dtype)


def concat(*xs, axis=0):
    return np.concatenate(xs, axis=axis)


def split(x, split=None, axis=0, num_outputs=None):
    # (`split` comes second: ONNX's runtime sizes input arrives positionally)
    if split is None:
        n = num_outputs
        size = -(-x.shape[axis] // n)
        split = [size] * (n - 1) + [x.shape[axis] - size * (n - 1)]
    bounds = np.cumsum([int(n) for n in np.asarray(split).reshape(-1)])[:-1]
    return tuple(np.split(x, bounds, axis=axis))


def slice(x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [np.s_[:]] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        start, end = int(start), int(end)
        if step > 0:
            start = min(max(start + dim if start < 0 else start, 0), dim)
            end = min(max(end + dim if end < 0 else end, 0), dim)
        else:  # ONNX clamps a negative-step start to [0, dim-1] and its end to [-1, dim-1]
            start = min(max(start + dim if start < 0 else start, 0), dim - 1)
            end = min(max(end + dim if end < 0 else end, -1), dim - 1)
            end = None if end < 0 else end
        index[axis] = np.s_[start:end:step]
    return x[tuple(index)]


def gather(x, indices, axis=0):
    return np.take(x, indices.astype(np.int64), axis=axis)


def gather_elements(x, indices, axis=0):
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)     # ONNX allows negative indices
    return np.take_along_axis(x, idx, axis=axis)


def gather_nd(data, indices, batch_dims=0):
    # ONNX GatherND: the last axis of `indices` indexes the leading axes of `data` (after batch_dims).
    idx = indices.astype(np.int64)
    b, k = int(batch_dims), idx.shape[-1]
    n = int(np.prod(data.shape[:b], dtype=np.int64))
    d = data.reshape((n,) + data.shape[b:])
    i = idx.reshape((n, -1, k))
    i = np.where(i < 0, i + np.array(data.shape[b:b + k], dtype=np.int64), i)
    out = np.stack([d[j][tuple(i[j].T)] for j in range(n)]) if n else np.zeros((0,) + data.shape[b + k:], data.dtype)
    return out.reshape(idx.shape[:-1] + data.shape[b + k:])


def maximum(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = np.maximum(out, x)
    return out


def flatten(x, axis=1):
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64)))


def trilu(x, k=None, upper=1):
    k = 0 if k is None else int(k)
    return np.triu(x, k) if upper else np.tril(x, k)


def shape(x, start=0, end=None):
    return np.array(x.shape[start:end], dtype=np.int64)


def constant_of_shape(shape, value=None):
    value = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value)
    return np.full([int(d) for d in shape], value.reshape(-1)[0], dtype=value.dtype)


def range_(start, limit, delta):
    return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)


def cumsum(x, axis, exclusive=0, reverse=0):
    # ONNX CumSum: `exclusive` shifts the sums by one (the first is 0), `reverse` sums from the end.
    x = np.asarray(x)
    axis = int(axis) % x.ndim
    y = np.flip(x, axis) if reverse else x
    y = np.cumsum(y, axis=axis, dtype=x.dtype)
    if exclusive and y.shape[axis]:
        zero = np.zeros_like(np.take(y, [0], axis=axis))
        y = np.concatenate([zero, np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    return np.flip(y, axis) if reverse else y


def cast(x, to, saturate=None):
    # `to` is a tgraph DType (or a NumPy dtype). ONNX saturates float8 casts by default:
    # values beyond the type's largest finite value (and infinities) become that value.
    to = np.dtype(getattr(to, "numpy", to))
    if to.name.startswith(("float8_e", "float4_e")) and to.name != "float8_e8m0fnu" and saturate != 0:
        values = np.arange(256, dtype=np.uint8).view(to).astype(np.float32)
        top = float(np.max(values[np.isfinite(values)]))
        x = np.clip(x, -top, top)
    return x.astype(to)


def causal_mask(scores, window=0):
    # Query i (of the last Tq) may see key j when j <= i + (Tk - Tq): the key axis
    # holds past positions first, so the mask follows the past length. A window W > 0
    # also hides keys more than W - 1 behind the query: it sees the W keys
    # i + past - W < j <= i + past (itself included), as Mistral's and GPT-Neo's local layers do.
    tq, tk = scores.shape[-2], scores.shape[-1]
    keep = np.tril(np.ones((tq, tk), dtype=bool), tk - tq)
    if window > 0:
        keep &= ~np.tril(np.ones((tq, tk), dtype=bool), tk - tq - window)
    return np.where(keep, scores, np.array(np.finfo(scores.dtype).min, dtype=scores.dtype))


# ------------------------------------------------------------------ ops tgraph reads but never emits itself
def mod(a, b, fmod=0):
    # ONNX Mod: fmod=1 (required for floats) keeps the dividend's sign, as C's fmod;
    # fmod=0 takes the divisor's sign, as Python's %.
    return np.fmod(a, b) if fmod else np.mod(a, b)


def minimum(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = np.minimum(out, x)
    return out


def sum_(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def mean(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return (out / np.asarray(len(xs), dtype=out.dtype)).astype(out.dtype)


def clip(x, lo=None, hi=None):
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return x


def round_(x):
    return np.round(x)      # halves to even, as ONNX Round


def sign(x):
    return np.sign(x)


def isinf(x, detect_negative=1, detect_positive=1):
    return (np.isposinf(x) & bool(detect_positive)) | (np.isneginf(x) & bool(detect_negative))


def size(x):
    return np.array(np.size(x), dtype=np.int64)


def cast_like(x, like, saturate=None):
    return k.cast(x, like.dtype, saturate=saturate)


def arg_max(x, axis=0, keepdims=1, select_last_index=0):
    if select_last_index:
        n = x.shape[axis]
        out = n - 1 - np.argmax(np.flip(x, axis), axis=axis)
    else:
        out = np.argmax(x, axis=axis)
    out = out.astype(np.int64)
    return np.expand_dims(out, axis) if keepdims else out


def arg_min(x, axis=0, keepdims=1, select_last_index=0):
    if select_last_index:
        n = x.shape[axis]
        out = n - 1 - np.argmin(np.flip(x, axis), axis=axis)
    else:
        out = np.argmin(x, axis=axis)
    out = out.astype(np.int64)
    return np.expand_dims(out, axis) if keepdims else out


def _reduce_axes(axes, noop_with_empty_axes=None):
    # An attribute (a list) is the IR's: [] reduces nothing, None everything. An array is
    # ONNX's runtime `axes` input: empty reduces everything unless noop_with_empty_axes.
    if isinstance(axes, np.ndarray):
        if axes.size == 0:
            return () if noop_with_empty_axes else None
        return tuple(int(a) for a in axes.reshape(-1))
    return None if axes is None else tuple(int(a) for a in axes)


def reduce_min(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    # an empty reduction gives the dtype's highest value (inf for floats), as ONNX has it
    axis = k._reduce_axes(axes, noop_with_empty_axes)
    if x.size == 0:
        high = True if x.dtype == np.bool_ else np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).max
        return np.min(x, axis=axis, keepdims=bool(keepdims), initial=high)
    return np.min(x, axis=axis, keepdims=bool(keepdims))


def reduce_prod(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    return np.prod(x, axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_l1(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    return np.sum(np.abs(x), axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_l2(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    s = np.sum(np.square(x.astype(np.float64)), axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims))
    return np.sqrt(s).astype(x.dtype)


def reduce_sum_square(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    return np.sum(np.square(x), axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_log_sum(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    return np.log(np.sum(x, axis=k._reduce_axes(axes, noop_with_empty_axes), keepdims=bool(keepdims))).astype(x.dtype, copy=False)


def reduce_log_sum_exp(x, axes=None, keepdims=1, noop_with_empty_axes=None):
    # max-shifted, so large inputs do not overflow; an all -inf slice gives -inf
    axis = k._reduce_axes(axes, noop_with_empty_axes)
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, np.zeros((), x.dtype))
    s = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return (s if keepdims else np.squeeze(s, axis=axis)).astype(x.dtype, copy=False)


def log_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    d = x - m
    return d - np.log(np.sum(np.exp(d), axis=axis, keepdims=True))


def hardmax(x, axis=-1):
    first = np.expand_dims(np.argmax(x, axis=axis), axis)
    out = np.zeros_like(x)
    np.put_along_axis(out, first, np.ones((), x.dtype), axis=axis)
    return out


def dropout(x, ratio=None, training_mode=None, seed=None):
    # Inference (no training_mode, or false) is the identity. Training mode keeps each element
    # with probability 1 - ratio (uniform draws of NumPy's RandomState(seed)) and scales by
    # 1 / (1 - ratio); a seed-less draw differs from run to run, as in every runtime.
    ratio = 0.5 if ratio is None else float(np.asarray(ratio).reshape(-1)[0])
    if training_mode is None or not bool(np.asarray(training_mode).reshape(-1)[0]) or ratio == 0:
        return x, np.ones(x.shape, dtype=bool)
    keep = np.random.RandomState(seed).uniform(0, 1.0, x.shape) >= ratio
    return (keep * x * np.asarray(1.0 / (1.0 - ratio), x.dtype)).astype(x.dtype), keep


def pow_(a, b):
    # ONNX Pow: the result has the base's type, whatever the exponent's
    if a.dtype == b.dtype:
        return np.power(a, b)
    return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)


def top_k(x, kk, axis=-1, largest=1, sorted=1):
    # ONNX TopK: of equal values, the one with the lower index comes first.
    n = int(np.asarray(kk).reshape(-1)[0])
    axis = axis % x.ndim
    if largest:
        order = x.shape[axis] - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(n), axis=axis).astype(np.int64)
    return np.take_along_axis(x, idx, axis=axis), idx


def pad(x, pads, constant_value=None, axes=None, mode="constant"):
    # pads: [begin_0 .. begin_n, end_0 .. end_n] over `axes` (default all); negative pads crop.
    rank = x.ndim
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    p = [int(v) for v in np.asarray(pads).reshape(-1)]
    before, after = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        before[a], after[a] = p[i], p[i + len(axes)]
    crop = tuple(np.s_[max(-b, 0):x.shape[i] - max(-e, 0)] for i, (b, e) in enumerate(zip(before, after)))
    x = x[crop]
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(before, after)]
    if mode == "constant":
        value = np.zeros((), x.dtype) if constant_value is None else np.asarray(constant_value).reshape(())
        return np.pad(x, widths, mode="constant", constant_values=value)
    return np.pad(x, widths, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])


def tile(x, repeats):
    return np.tile(x, [int(r) for r in np.asarray(repeats).reshape(-1)])


def einsum(*xs, equation=""):
    if xs[0].dtype.kind == "V":          # bfloat16 and kin: NumPy's einsum takes only its own types
        return np.einsum(equation.replace(" ", ""), *[x.astype(np.float32) for x in xs]).astype(xs[0].dtype)
    return np.einsum(equation.replace(" ", ""), *xs)


def scatter_elements(data, indices, updates, axis=0, reduction="none"):
    out = np.array(data, copy=True)
    axis = axis % data.ndim
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    for pos in np.ndindex(*idx.shape):
        target = list(pos)
        target[axis] = idx[pos]
        target = tuple(target)
        u = updates[pos]
        if reduction == "add":
            out[target] = out[target] + u
        elif reduction == "mul":
            out[target] = out[target] * u
        elif reduction == "max":
            out[target] = max(out[target], u)
        elif reduction == "min":
            out[target] = min(out[target], u)
        else:
            out[target] = u
    return out


def scatter_nd(data, indices, updates, reduction="none"):
    out = np.array(data, copy=True)
    idx = indices.astype(np.int64)
    lead = idx.shape[:-1]
    for pos in np.ndindex(*lead):
        target = tuple(int(i) for i in idx[pos])
        u = updates[pos]
        if reduction == "add":
            out[target] = out[target] + u
        elif reduction == "mul":
            out[target] = out[target] * u
        elif reduction == "max":
            out[target] = np.maximum(out[target], u)
        elif reduction == "min":
            out[target] = np.minimum(out[target], u)
        else:
            out[target] = u
    return out


def eye_like(x, dtype=None, k=0):
    return np.eye(x.shape[0], x.shape[1], k=k, dtype=x.dtype if dtype is None else np.dtype(getattr(dtype, "numpy",
                                                                                                   dtype)))


def one_hot(indices, depth, values, axis=-1):
    d = int(np.asarray(depth).reshape(-1)[0])
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)
    rank = idx.ndim + 1
    axis = axis % rank
    hot = np.expand_dims(idx, axis) == np.arange(d).reshape([d if i == axis else 1 for i in range(rank)])
    return np.where(hot, values[1], values[0]).astype(values.dtype)


def non_zero(x):
    return np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)


def xor(a, b):
    return np.logical_xor(a, b)


def abs_(x):
    return np.abs(x)


def ceil(x):
    return np.ceil(x)


def floor(x):
    return np.floor(x)


def leaky_relu(x, alpha=0.01):
    return np.where(x >= 0, x, x * np.asarray(alpha, x.dtype)).astype(x.dtype)


def prelu(x, slope):
    return np.where(x >= 0, x, x * slope).astype(x.dtype)


def elu(x, alpha=1.0):
    return np.where(x >= 0, x, np.asarray(alpha, x.dtype) * (np.exp(x) - 1)).astype(x.dtype)


def selu(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    a, g = np.asarray(alpha, x.dtype), np.asarray(gamma, x.dtype)
    return (g * np.where(x > 0, x, a * (np.exp(x) - 1))).astype(x.dtype)


def celu(x, alpha=1.0):
    a = np.asarray(alpha, x.dtype)
    return (np.maximum(x, 0) + np.minimum(0, a * (np.exp(x / a) - 1))).astype(x.dtype)


def hard_sigmoid(x, alpha=0.2, beta=0.5):
    return np.clip(x * np.asarray(alpha, x.dtype) + np.asarray(beta, x.dtype), 0, 1).astype(x.dtype)


def hard_swish(x):
    return (x * np.clip(x / np.asarray(6, x.dtype) + np.asarray(0.5, x.dtype), 0, 1)).astype(x.dtype)


def softplus(x):
    return np.logaddexp(x, np.zeros((), x.dtype)).astype(x.dtype)


def softsign(x):
    return (x / (1 + np.abs(x))).astype(x.dtype)


def thresholded_relu(x, alpha=1.0):
    return np.where(x > np.asarray(alpha, x.dtype), x, np.zeros((), x.dtype))


def mish(x):
    return (x * np.tanh(np.logaddexp(x, np.zeros((), x.dtype)))).astype(x.dtype)


def swish(x, alpha=1.0):
    return (x / (1 + np.exp(-np.asarray(alpha, x.dtype) * x))).astype(x.dtype)


# ------------------------------------------------------------------ (de)quantization
def _per_axis(scale, x, axis, block_size):
    # a scale (or zero point) as x's shape: a scalar, one value per slice of `axis`, or
    # (block_size > 0) one per block of block_size along `axis`
    if scale.ndim == 0 or scale.size == 1 and block_size == 0:
        return scale.reshape(())
    axis = axis % x.ndim
    if block_size:
        return np.repeat(scale, block_size, axis=axis)[tuple(slice(0, n) for n in x.shape)]
    return scale.reshape([x.shape[axis] if i == axis else 1 for i in range(x.ndim)])


def dequantize_linear(x, x_scale, x_zero_point=None, axis=1, block_size=0, output_dtype=0):
    scale = k._per_axis(x_scale, x, axis, block_size).astype(np.float32)
    xf = x.astype(np.float32)
    if x_zero_point is not None:
        xf = xf - k._per_axis(x_zero_point, x, axis, block_size).astype(np.float32)
    return (xf * scale).astype(x_scale.dtype)


def quantize_linear(x, y_scale, y_zero_point=None, axis=1, block_size=0, output_dtype=0, saturate=1,
                    precision=0):
    # y = saturate(round_half_even(x / scale) + zero_point); float8 targets are not rounded to integers
    scale = k._per_axis(y_scale, x, axis, block_size).astype(np.float32)
    to = y_zero_point.dtype if y_zero_point is not None else np.dtype(output_dtype) if output_dtype else np.dtype(np.uint8)
    y = x.astype(np.float32) / scale
    zero = np.zeros((), np.float32) if y_zero_point is None else \
        k._per_axis(y_zero_point, x, axis, block_size).astype(np.float32)
    if to.name.startswith(("float8", "float4")):
        return k.cast(y + zero, to, saturate=saturate)
    bits = {"int2": 2, "uint2": 2, "int4": 4, "uint4": 4}.get(to.name, 8 * to.itemsize)
    signed = to.name.startswith("int")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return np.clip(np.round(y) + zero, lo, hi).astype(to)


def dynamic_quantize_linear(x):
    # uint8, asymmetric; the range always includes 0
    lo, hi = min(float(np.min(x)), 0.0), max(float(np.max(x)), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zero = np.uint8(np.clip(np.round(0 - lo / scale), 0, 255)) if scale else np.uint8(0)
    y = np.clip(np.round(x / scale) + zero, 0, 255).astype(np.uint8) if scale else np.zeros(x.shape, np.uint8)
    return y, np.array(scale, np.float32), np.array(zero, np.uint8)


def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    a32, b32 = a.astype(np.int32), b.astype(np.int32)
    if a_zero_point is not None:
        zp = a_zero_point.astype(np.int32)
        a32 = a32 - (zp.reshape(-1, 1) if zp.ndim == 1 and zp.size > 1 else zp.reshape(()))
    if b_zero_point is not None:
        b32 = b32 - b_zero_point.astype(np.int32).reshape(() if b_zero_point.size == 1 else (-1,))
    return np.matmul(a32, b32).astype(np.int32)


def onnx_attention(q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, is_causal=0,
                   scale=None, q_num_heads=None, kv_num_heads=None, softmax_precision=None, softcap=None,
                   qk_matmul_output_mode=None, left_window_size=None, right_window_size=None):
    # ONNX Attention (opsets 23-25). q: [B, Hq, Tq, D], k/v: [B, Hkv, Tk, D] (or 3-D [B, T, H*D]
    # with q_num_heads / kv_num_heads). past_key/past_value are concatenated before k/v (the
    # present outputs). The bias is built from attn_mask (bool: allowed; float: added; shorter
    # than the keys: padded as masked), is_causal (query i sees key j <= i + offset, offset =
    # the past length, or nonpad_kv_seqlen - Tq), the sliding window and nonpad_kv_seqlen's
    # padding. softcap caps q.k before the bias; a fully masked row gives a zero output.
    # Returns (y,), or (y, present_key, present_value, qk) when the node has those outputs
    # (past given, or qk_matmul_output_mode set).
    merged = q.ndim == 3
    full = past_key is not None or qk_matmul_output_mode is not None
    if merged:
        q = np.transpose(q.reshape(q.shape[0], q.shape[1], q_num_heads, -1), (0, 2, 1, 3))
        k = np.transpose(k.reshape(k.shape[0], k.shape[1], kv_num_heads, -1), (0, 2, 1, 3))
        v = np.transpose(v.reshape(v.shape[0], v.shape[1], kv_num_heads, -1), (0, 2, 1, 3))
    dtype = q.dtype
    if past_key is not None:
        k = np.concatenate([past_key, k], axis=2)
        v = np.concatenate([past_value, v], axis=2)
    present_key, present_value = k, v
    tq, tk = q.shape[2], k.shape[2]
    bias = np.zeros((tq, tk), dtype)
    neg = np.array(-np.inf, dtype)
    if attn_mask is not None:
        pad = tk - attn_mask.shape[-1]
        if pad > 0:
            fill = False if attn_mask.dtype == np.bool_ else -np.inf
            attn_mask = np.pad(attn_mask, [(0, 0)] * (attn_mask.ndim - 1) + [(0, pad)], constant_values=fill)
        bias = bias + (np.where(attn_mask, np.zeros((), dtype), neg) if attn_mask.dtype == np.bool_ else attn_mask)
    if nonpad_kv_seqlen is not None and past_key is None:
        offset = (nonpad_kv_seqlen.astype(np.int64) - tq).reshape(-1, 1, 1, 1)    # per batch
    else:
        offset = np.array(past_key.shape[2] if past_key is not None else 0).reshape(1, 1, 1, 1)
    i = np.arange(tq).reshape(tq, 1)
    j = np.arange(tk).reshape(1, tk)
    diff = i + offset - j                                                   # [B or 1, 1, Tq, Tk]
    allowed = np.ones(diff.shape, dtype=bool)
    if is_causal:
        allowed = allowed & (diff >= 0)
    if left_window_size is not None and left_window_size >= 0:
        allowed = allowed & (diff <= left_window_size)
    if right_window_size is not None and right_window_size >= 0:
        allowed = allowed & (-diff <= right_window_size)
    if nonpad_kv_seqlen is not None:
        allowed = allowed & (j.reshape(1, 1, 1, tk) < nonpad_kv_seqlen.astype(np.int64).reshape(-1, 1, 1, 1))
    bias = bias + np.where(allowed, np.zeros((), dtype), neg)
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, group, axis=1) if group > 1 else k
    vv = np.repeat(v, group, axis=1) if group > 1 else v
    # With softmax_precision the scores are computed in that type from the start (q and k cast
    # before q.k): a float16 model's q.k may overflow float16 (see passes/precision.py)
    wide = {1: np.float32, 10: np.float16, 11: np.float64}.get(int(softmax_precision), dtype) \
        if softmax_precision is not None else dtype
    s = np.asarray(np.sqrt(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale), wide)
    qk = (q.astype(wide) * s) @ np.swapaxes(kk.astype(wide) * s, -1, -2)
    bias = bias.astype(wide)
    if softcap:
        qk = (np.tanh(qk / np.asarray(softcap, wide)) * np.asarray(softcap, wide)).astype(wide)
    scores = qk + bias
    qk_out = scores if qk_matmul_output_mode == 2 else qk
    top = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isneginf(top), np.zeros((), scores.dtype), top))
    total = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(total == 0, np.ones((), total.dtype), total)
    p = np.where(np.isneginf(np.max(bias, axis=-1, keepdims=True)), np.zeros((), p.dtype), p)  # fully masked rows
    if qk_matmul_output_mode == 3:
        qk_out = p
    y = (p.astype(dtype) @ vv).astype(dtype)
    if merged:
        y = np.reshape(np.transpose(y, (0, 2, 1, 3)), (y.shape[0], y.shape[2], -1))
    if not full:
        return (y,)
    return y, present_key, present_value, np.asarray(qk_out).astype(dtype)


def matmul(a, b):
    # ml_dtypes' matmul of bfloat16 (and float8) arrays returns float32: back to the inputs' type
    return np.matmul(a, b).astype(a.dtype, copy=False)
