"""Fused ops: what the fusion passes produce (standard ONNX ops of opsets 17-23).

Each entry follows its ONNX operator's semantics (LayerNormalization-17, Gelu-20,
RMSNormalization-23, Attention-23 with 4-D [batch, heads, seq, head_dim] inputs) so
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


def attention(q, k, v, attn_mask=None, is_causal=0, scale=None, q_num_heads=None, kv_num_heads=None):
    # q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]. Hkv divides Hq (grouped-query attention).
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * np.asarray(scale, dtype=q.dtype)
    lowest = np.array(np.finfo(q.dtype).min, dtype=q.dtype)
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, lowest) if attn_mask.dtype == np.bool_ else scores + attn_mask
    if is_causal:
        tq, tk = scores.shape[-2], scores.shape[-1]
        scores = np.where(np.tril(np.ones((tq, tk), dtype=bool)), scores, lowest)  # upper-left aligned (ONNX)
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return (e / np.sum(e, axis=-1, keepdims=True)) @ v


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
    if not (len(q) == len(k) == len(v) == 4):
        raise ShapeError("Attention: tgraph uses 4-D [batch, heads, seq, head_dim] inputs")
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


register(OpDef("LayerNormalization", _infer_norm, layer_normalization, (2, 3),
               attrs={"axis": -1, "epsilon": 1e-5, "stash_type": 1}))
register(OpDef("RMSNormalization", _infer_norm, rms_normalization, (2, 2),
               attrs={"axis": -1, "epsilon": 1e-5, "stash_type": 1}))
register(OpDef("Gelu", _infer_gelu, gelu, (1, 1), attrs={"approximate": "none"}))
register(OpDef("Attention", _infer_attention, attention, (3, 4),
               attrs={"is_causal": 0, "scale": None, "q_num_heads": None, "kv_num_heads": None}))
