"""Reference semantics of every op, in plain NumPy.

These functions are the op table's meaning: constant folding evaluates them, the
op tests compare them with onnxruntime and `onnx.reference`, and the NumPy backend
copies the source of the ones a model uses into the generated module. Hence the
rules: each function is self-contained (it may use only `np`), takes inputs
positionally and attributes by keyword, and follows the ONNX operator's semantics.
"""
import numpy as np


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


def reduce_mean(x, axes=None, keepdims=1):
    return np.mean(x, axis=None if axes is None else tuple(axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_sum(x, axes=None, keepdims=1):
    return np.sum(x, axis=None if axes is None else tuple(axes), keepdims=bool(keepdims)).astype(x.dtype, copy=False)


def reduce_max(x, axes=None, keepdims=1):
    return np.max(x, axis=None if axes is None else tuple(axes), keepdims=bool(keepdims))


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


def split(x, axis=0, split=None, num_outputs=None):
    if split is None:
        n = num_outputs
        size = -(-x.shape[axis] // n)
        split = [size] * (n - 1) + [x.shape[axis] - size * (n - 1)]
    bounds = np.cumsum(split)[:-1]
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


def cast(x, to):
    return x.astype(getattr(to, "numpy", to))  # `to` is a tgraph DType (or a NumPy dtype)


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
