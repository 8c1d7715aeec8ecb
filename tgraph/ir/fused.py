"""Fused ops: what the fusion passes produce (standard ONNX ops of opsets 17-23).

Each entry follows its ONNX operator's semantics (LayerNormalization-17, Gelu-20,
RMSNormalization-23, Attention-23 with 4-D [batch, heads, seq, head_dim] inputs,
RotaryEmbedding-23) so
that the ONNX lowering is the default one-to-one rule. The kernels are the reference
semantics, like `kernels.py`, and follow the same self-containment rules.
"""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from . import kernels as k
from .opdefs import OpDef, _need_rank, _norm_axis, _same_dtype, broadcast_shapes, register
from .types import DType, TensorType


# ---------------------------------------------------------------- kernels
def layer_normalization(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    axes = tuple(range(axis % x.ndim, x.ndim))
    xf = x.astype(np.float32) if stash_type == 1 and x.dtype != np.float64 else x
    mean = np.mean(xf, axis=axes, keepdims=True)
    d = xf - mean
    var = np.mean(d * d, axis=axes, keepdims=True)
    y = (d / np.sqrt(var + np.asarray(epsilon, dtype=xf.dtype))).astype(x.dtype) * scale
    return y if bias is None else y + bias


def rms_normalization(x, scale, axis=-1, epsilon=1e-5, stash_type=1):
    axes = tuple(range(axis % x.ndim, x.ndim))
    xf = x.astype(np.float32) if stash_type == 1 and x.dtype != np.float64 else x
    ms = np.mean(xf * xf, axis=axes, keepdims=True)
    return (xf / np.sqrt(ms + np.asarray(epsilon, dtype=xf.dtype))).astype(x.dtype) * scale


def gelu(x, approximate="none"):
    half = np.asarray(0.5, x.dtype)
    if approximate == "tanh":
        c = np.asarray(np.sqrt(2.0 / np.pi), dtype=x.dtype)
        return x * half * (np.tanh(c * (x + np.asarray(0.044715, x.dtype) * x * x * x)) + 1)
    return x * half * (k.erf(x * np.asarray(1.0 / np.sqrt(2.0), x.dtype)) + 1)


def attention(q, k, v, attn_mask=None, is_causal=0, scale=None, q_num_heads=None, kv_num_heads=None,
              softmax_precision=None):
    # q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]. Hkv divides Hq (grouped-query attention).
    # Or 3-D [B, T, H*D] with q_num_heads / kv_num_heads: heads are split here and merged
    # back into [B, Tq, Hq*Dv], as the ONNX op does.
    # softmax_precision (an ONNX dtype number, e.g. 1 = float32): scores and softmax are
    # computed in that dtype, then the result is cast back (half-precision models use 1).
    merged = q.ndim == 3
    if merged:                                   # [B, T, H*D] -> [B, H, T, D]
        q = np.transpose(np.reshape(q, (q.shape[0], q.shape[1], q_num_heads, -1)), (0, 2, 1, 3))
        k = np.transpose(np.reshape(k, (k.shape[0], k.shape[1], kv_num_heads, -1)), (0, 2, 1, 3))
        v = np.transpose(np.reshape(v, (v.shape[0], v.shape[1], kv_num_heads, -1)), (0, 2, 1, 3))
    out_dtype = q.dtype
    if softmax_precision is not None:
        wide = {1: np.float32, 10: np.float16, 11: np.float64}[int(softmax_precision)]
        q, k, v = q.astype(wide), k.astype(wide), v.astype(wide)
        if attn_mask is not None and attn_mask.dtype != np.bool_:
            attn_mask = attn_mask.astype(wide)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * np.asarray(scale, dtype=q.dtype)
    # Which keys each query may see: a bool mask's True entries, a float mask's entries
    # above -inf, and, with is_causal, keys j <= i (upper-left aligned, as ONNX has it).
    tq, tk = scores.shape[-2], scores.shape[-1]
    allowed = np.ones((tq, tk), dtype=bool)
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            allowed = allowed & attn_mask
        else:
            allowed = allowed & ~np.isneginf(attn_mask)
            scores = scores + np.where(np.isneginf(attn_mask), np.zeros((), attn_mask.dtype), attn_mask)
    if is_causal:
        allowed = allowed & np.tril(np.ones((tq, tk), dtype=bool))
    scores = np.where(allowed, scores, np.array(np.finfo(q.dtype).min, dtype=q.dtype))
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    p = e / np.sum(e, axis=-1, keepdims=True)
    # A fully masked row (no allowed key) gives a zero output row, not the mean of the
    # values: the Attention-23 spec's fully-masked-row guard.
    p = np.where(np.any(allowed, axis=-1, keepdims=True), p, np.zeros((), p.dtype))
    y = (p @ v).astype(out_dtype, copy=False)
    if merged:                                   # [B, H, T, D] -> [B, T, H*D]
        y = np.reshape(np.transpose(y, (0, 2, 1, 3)), (y.shape[0], y.shape[2], -1))
    return y


def rotary_embedding(x, cos_cache, sin_cache, position_ids=None, interleaved=0, rotary_embedding_dim=0,
                     num_heads=None):
    # x: [B, H, S, D], or [B, S, H*D] with num_heads. With position_ids [B, S] the caches are
    # tables [max_pos, R/2] indexed by them; without, they are [B, S, R/2]. The first R dims
    # of each head rotate (pairs (i, i + R/2), or (2i, 2i+1) when interleaved); the rest pass.
    shape = x.shape
    if x.ndim == 3:
        x = x.reshape(shape[0], shape[1], num_heads, shape[2] // num_heads)
    else:
        x = np.transpose(x, (0, 2, 1, 3))                       # [B, S, H, D]
    r = rotary_embedding_dim or x.shape[-1]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    cos, sin = cos_cache[:, :, None, :], sin_cache[:, :, None, :]   # [B, S, 1, R/2]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :r // 2], rot[..., r // 2:])
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        rot = np.stack([real, imag], axis=-1).reshape(rot.shape)
    else:
        rot = np.concatenate([real, imag], axis=-1)
    y = np.concatenate([rot, rest], axis=-1)
    return y.reshape(shape) if len(shape) == 3 else np.transpose(y, (0, 2, 1, 3))


# ---------------------------------------------------------------- inference
def _infer_norm(ins, attrs, consts):
    shape = _need_rank(ins[0], "normalization")
    _norm_axis(attrs.get("axis", -1), len(shape), "normalization")
    if not ins[0].dtype.is_float:
        raise ShapeError(f"normalization of a {ins[0].dtype.name} tensor")
    _same_dtype([t for t in ins if t is not None], "normalization")
    return [ins[0]]


def _infer_gelu(ins, attrs, consts):
    if attrs.get("approximate", "none") not in ("none", "tanh"):
        raise ShapeError(f"Gelu: approximate must be 'none' or 'tanh', got {attrs.get('approximate')!r}")
    return [ins[0]]


def _infer_attention(ins, attrs, consts):
    q, k, v = (_need_rank(t, "Attention") for t in ins[:3])
    if len(q) == len(k) == len(v) == 3:
        return _infer_attention_3d(ins, attrs, q, k, v)
    if not (len(q) == len(k) == len(v) == 4):
        raise ShapeError("Attention: inputs must all be 4-D [batch, heads, seq, head_dim] or 3-D [batch, seq, hidden]")
    _same_dtype(ins[:3], "Attention")
    hq, hk = q[1], k[1]
    if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
        raise ShapeError(f"Attention: {hq} query heads are not a multiple of {hk} key/value heads")
    if len(ins) > 3 and ins[3] is not None:
        m = ins[3]
        if m.dtype is not DType.bool and m.dtype is not ins[0].dtype:
            raise ShapeError(f"Attention: mask must be bool or {ins[0].dtype.name}, got {m.dtype.name}")
        broadcast_shapes(m.shape, (q[0], hq, q[2], k[2]))
    return [TensorType(ins[0].dtype, (q[0], hq, q[2], v[3]))]


def _infer_attention_3d(ins, attrs, q, k, v):
    """[B, T, H*D] inputs: the head counts come from q_num_heads / kv_num_heads."""
    hq, hk = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
    if not hq or not hk:
        raise ShapeError("Attention: 3-D inputs need q_num_heads and kv_num_heads")
    if hq % hk:
        raise ShapeError(f"Attention: {hq} query heads are not a multiple of {hk} key/value heads")
    for name, dims, n in (("query", q, hq), ("key", k, hk), ("value", v, hk)):
        if isinstance(dims[2], int) and dims[2] % n:
            raise ShapeError(f"Attention: {name} hidden size {dims[2]} is not a multiple of {n} heads")
    _same_dtype(ins[:3], "Attention")
    if len(ins) > 3 and ins[3] is not None:
        broadcast_shapes(ins[3].shape, (q[0], hq, q[1], k[1]))
    hidden = hq * (v[2] // hk) if isinstance(v[2], int) else None
    return [TensorType(ins[0].dtype, (q[0], q[1], hidden))]


def _infer_rotary(ins, attrs, consts):
    x, cos, sin = ins[:3]
    shape = _need_rank(x, "RotaryEmbedding")
    if not x.dtype.is_float:
        raise ShapeError(f"RotaryEmbedding of a {x.dtype.name} tensor")
    _same_dtype([x, cos, sin], "RotaryEmbedding")
    heads = attrs.get("num_heads")
    if len(shape) == 3:
        if not heads:
            raise ShapeError("RotaryEmbedding: a 3-D input [batch, seq, hidden] needs num_heads")
        if isinstance(shape[2], int) and shape[2] % heads:
            raise ShapeError(f"RotaryEmbedding: hidden size {shape[2]} is not a multiple of num_heads={heads}")
        head = shape[2] // heads if isinstance(shape[2], int) else None
    elif len(shape) == 4:
        head = shape[3]
    else:
        raise ShapeError(f"RotaryEmbedding: input must be [batch, heads, seq, head_dim] or [batch, seq, hidden], "
                         f"got rank {len(shape)}")
    r = attrs.get("rotary_embedding_dim") or head
    if isinstance(r, int) and (r % 2 or (isinstance(head, int) and r > head)):
        raise ShapeError(f"RotaryEmbedding: rotary_embedding_dim {r} must be even and at most head size {head}")
    pos = ins[3] if len(ins) > 3 else None
    want_rank = 2 if pos is not None else 3
    for name, t in (("cos_cache", cos), ("sin_cache", sin)):
        if t.shape is not None and len(t.shape) != want_rank:
            raise ShapeError(f"RotaryEmbedding: {name} must have rank {want_rank} "
                             f"{'with' if pos is not None else 'without'} position_ids, got {t}")
        half = None if t.shape is None else t.shape[-1]
        if isinstance(half, int) and isinstance(r, int) and half != r // 2:
            raise ShapeError(f"RotaryEmbedding: {name} last dim {half} is not rotary_embedding_dim/2 = {r // 2}")
    if pos is not None and pos.dtype is not DType.int64:
        raise ShapeError(f"RotaryEmbedding: position_ids must be int64, got {pos.dtype.name}")
    return [x]


register(OpDef("LayerNormalization", _infer_norm, layer_normalization, (2, 3),
               attrs={"axis": -1, "epsilon": 1e-5, "stash_type": 1}, traits=frozenset({"fused"})))
register(OpDef("RMSNormalization", _infer_norm, rms_normalization, (2, 2),
               attrs={"axis": -1, "epsilon": 1e-5, "stash_type": 1}, traits=frozenset({"fused"})))
register(OpDef("Gelu", _infer_gelu, gelu, (1, 1), attrs={"approximate": "none"}, traits=frozenset({"elementwise", "fused"})))
register(OpDef("Attention", _infer_attention, attention, (3, 4),
               attrs={"is_causal": 0, "scale": None, "q_num_heads": None, "kv_num_heads": None,
                      "softmax_precision": None}, traits=frozenset({"fused"})))
register(OpDef("RotaryEmbedding", _infer_rotary, rotary_embedding, (3, 4),
               attrs={"interleaved": 0, "rotary_embedding_dim": 0, "num_heads": None}, traits=frozenset({"fused"})))
