"""onnxruntime contrib ops (domain ``com.microsoft``) that the -O3 fusions produce.

Only onnxruntime runs these, so they are worth emitting only where a benchmark shows
onnxruntime runs them faster than the standard ops they replace (see
`tgraph.passes.ort_fusions`). Semantics follow onnxruntime's ContribOperators.md:

* ``SkipLayerNormalization(input, skip, gamma, beta?, bias?)``: ``s = input + skip (+ bias)``,
  ``LayerNorm(s) * gamma (+ beta)`` over the last axis. Its default epsilon is 1e-12,
  not LayerNormalization's 1e-5, so tgraph always writes epsilon explicitly.
* ``SkipSimplifiedLayerNormalization(input, skip, gamma, bias?)``: the same with RMSNorm.

The ONNX ops have four outputs (output, mean, inv_std_var, input_skip_bias_sum); the
middle two exist for training, so the IR keeps two outputs, ``(output, sum)``, and the
ONNX lowering places the sum at index 3. Inputs are 2-D or 3-D, as onnxruntime's
kernels require; skip has the input's shape; gamma, beta and bias are vectors over the
last axis.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from .opdefs import REQUIRED, OnnxInterface, OpDef, _need_rank, _same_dtype, register
from .types import DType, TensorType

DOMAIN = "com.microsoft"
ORT_SKIP_NORM_EPSILON = 1e-12        # onnxruntime's default for both skip norms


# ---------------------------------------------------------------- kernels
def skip_layer_normalization(x, skip, gamma, beta=None, bias=None, epsilon=1e-12):
    s = x + skip if bias is None else x + skip + bias
    sf = s.astype(np.float32) if s.dtype != np.float64 else s
    mean = np.mean(sf, axis=-1, keepdims=True)
    d = sf - mean
    var = np.mean(d * d, axis=-1, keepdims=True)
    y = (d / np.sqrt(var + np.asarray(epsilon, sf.dtype))).astype(s.dtype) * gamma
    return (y if beta is None else y + beta), s


def skip_simplified_layer_normalization(x, skip, gamma, bias=None, epsilon=1e-12):
    s = x + skip if bias is None else x + skip + bias
    sf = s.astype(np.float32) if s.dtype != np.float64 else s
    ms = np.mean(sf * sf, axis=-1, keepdims=True)
    return (sf / np.sqrt(ms + np.asarray(epsilon, sf.dtype))).astype(s.dtype) * gamma, s


# ---------------------------------------------------------------- inference
def _infer_skip_norm(op: str, vector_inputs: tuple):
    def infer(ins, attrs, consts):
        x, skip = ins[0], ins[1]
        shape = _need_rank(x, op)
        if len(shape) not in (2, 3):
            raise ShapeError(f"{op}: input must be 2-D or 3-D (onnxruntime's kernel), got {x}")
        if not x.dtype.is_float:
            raise ShapeError(f"{op} of a {x.dtype.name} tensor")
        present = [t for t in ins if t is not None]
        _same_dtype(present, op)
        if skip.shape is not None and tuple(skip.shape) != tuple(shape):
            raise ShapeError(f"{op}: skip {skip} must have the input's shape {x}")
        for name, t in zip(vector_inputs, ins[2:]):
            if t is None:
                continue
            if t.shape is None or len(t.shape) != 1 or t.shape[0] != shape[-1]:
                raise ShapeError(f"{op}: {name} must be a vector of the last dim {shape[-1]}, got {t}")
        return [x, x]
    return infer


# ONNX outputs: (output, mean, inv_std_var, input_skip_bias_sum); the IR keeps 0 and 3
_SKIP_NORM_ONNX = OnnxInterface(outputs=(0, 3))


register(OpDef("SkipLayerNormalization", _infer_skip_norm("SkipLayerNormalization", ("gamma", "beta", "bias")),
               skip_layer_normalization, (3, 5), attrs={"epsilon": ORT_SKIP_NORM_EPSILON}, domain=DOMAIN,
               num_outputs=2, onnx=_SKIP_NORM_ONNX, doc="input + skip (+ bias), then LayerNorm; outputs (normalised, sum)"))
register(OpDef("SkipSimplifiedLayerNormalization",
               _infer_skip_norm("SkipSimplifiedLayerNormalization", ("gamma", "bias")),
               skip_simplified_layer_normalization, (3, 4), attrs={"epsilon": ORT_SKIP_NORM_EPSILON},
               domain=DOMAIN, num_outputs=2, onnx=_SKIP_NORM_ONNX,
               doc="input + skip (+ bias), then RMSNorm; outputs (normalised, sum)"))


# ---------------------------------------------------------------- GroupQueryAttention
# ``GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
# cos_cache?, sin_cache?, position_ids?, attention_bias?) -> (output, present_key, present_value)``:
# the static-KV-cache attention (see `tgraph.dsl.cache`). query [B, S, Hq*D], key/value
# [B, S, Hkv*D]; past and present [B, Hkv, M, D], one buffer per layer that onnxruntime writes
# in place when past and present are bound to the same OrtValue (M = max(total_sequence_length,
# past's M)).
# Rows are right-padded: row b holds L_b = seqlens_k[b] + 1 valid positions after this call.
# When S == total_sequence_length (the first prompt) the new tokens sit at 0..S-1 and query
# i sees keys j <= min(i, L_b - 1); otherwise they sit at L_b - S .. L_b - 1 and query i sees
# keys j <= L_b - S + i. do_rotary rotates q and k at those positions (rotate_half layout
# unless rotary_interleaved) with cos/sin tables [max_pos, R/2]; the first R dims of each head.
# attention_bias [B|1, H|1, S, total_sequence_length] is added to the scores of key positions
# 0..total-1 (T5's relative position bias over the buffer); position_ids is not read.
def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                          cos_cache=None, sin_cache=None, position_ids=None, attention_bias=None,
                          num_heads=1, kv_num_heads=1, scale=None,
                          do_rotary=0, rotary_interleaved=0, softcap=0.0, local_window_size=-1):
    b, s, _ = query.shape
    d = past_key.shape[3]
    total = int(np.asarray(total_sequence_length).reshape(-1)[0])
    m = max(total, past_key.shape[2])
    lengths = np.asarray(seqlens_k).astype(np.int64).reshape(-1) + 1            # L_b
    starts = np.zeros_like(lengths) if s == total else lengths - s              # where the new tokens go
    q = query.reshape(b, s, num_heads, d)
    k = key.reshape(b, s, kv_num_heads, d)
    v = value.reshape(b, s, kv_num_heads, d)
    if do_rotary:
        pos = starts[:, None] + np.arange(s)[None, :]                           # [B, S]
        half = cos_cache.shape[1]
        r = 2 * half
        cos = cos_cache[np.clip(pos, 0, cos_cache.shape[0] - 1)][:, :, None, :]  # [B, S, 1, R/2]
        sin = sin_cache[np.clip(pos, 0, sin_cache.shape[0] - 1)][:, :, None, :]
        rotated = []
        for x in (q, k):                          # (no nested function: the kernel is copied as source)
            rot, rest = x[..., :r], x[..., r:]
            if rotary_interleaved:
                x1, x2 = rot[..., 0::2], rot[..., 1::2]
            else:
                x1, x2 = rot[..., :half], rot[..., half:]
            re, im = cos * x1 - sin * x2, sin * x1 + cos * x2
            rot = np.stack([re, im], axis=-1).reshape(rot.shape) if rotary_interleaved \
                else np.concatenate([re, im], axis=-1)
            rotated.append(np.concatenate([rot, rest], axis=-1).astype(x.dtype))
        q, k = rotated
    present_key = np.zeros((b, kv_num_heads, m, d), past_key.dtype)
    present_value = np.zeros((b, kv_num_heads, m, d), past_value.dtype)
    present_key[:, :, :past_key.shape[2]] = past_key
    present_value[:, :, :past_value.shape[2]] = past_value
    for row in range(b):
        present_key[row, :, starts[row]:starts[row] + s] = np.transpose(k[row], (1, 0, 2))
        present_value[row, :, starts[row]:starts[row] + s] = np.transpose(v[row], (1, 0, 2))
    wide = np.float64 if query.dtype == np.float64 else np.float32             # scores and softmax in fp32
    group = num_heads // kv_num_heads
    keys = np.repeat(present_key.astype(wide), group, axis=1)                  # [B, Hq, M, D]
    values = np.repeat(present_value.astype(wide), group, axis=1)
    qh = np.transpose(q.astype(wide), (0, 2, 1, 3))                            # [B, Hq, S, D]
    scale = 1.0 / np.sqrt(d) if not scale else scale
    scores = (qh @ np.swapaxes(keys, -1, -2)) * np.asarray(scale, wide)        # [B, Hq, S, M]
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    if attention_bias is not None:
        scores[..., :total] += np.asarray(attention_bias, wide)
    j = np.arange(m)[None, None, :]                                            # key positions
    last = np.minimum(starts[:, None] + np.arange(s)[None, :], lengths[:, None] - 1)[:, :, None]  # [B, S, 1]
    allowed = j <= last
    if local_window_size is not None and local_window_size > 0:
        allowed = allowed & (j > last - local_window_size)
    scores = np.where(allowed[:, None], scores, -np.inf)
    e = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    y = (e / np.sum(e, axis=-1, keepdims=True)) @ values                       # [B, Hq, S, D]
    y = np.reshape(np.transpose(y, (0, 2, 1, 3)), (b, s, num_heads * d)).astype(query.dtype)
    return y, present_key, present_value


def _infer_gqa(ins, attrs, consts):
    op = "GroupQueryAttention"
    q, k, v, pk, pv, seqlens, total = ins[:7]
    hq, hk = attrs.get("num_heads"), attrs.get("kv_num_heads")
    if not hq or not hk or hq % hk:
        raise ShapeError(f"{op}: num_heads ({hq}) must be a positive multiple of kv_num_heads ({hk})")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if len(_need_rank(t, op)) != 3:
            raise ShapeError(f"{op}: {name} must be 3-D [batch, seq, heads*head_size], got {t}")
    for name, t in (("past_key", pk), ("past_value", pv)):
        if len(_need_rank(t, op)) != 4:
            raise ShapeError(f"{op}: {name} must be 4-D [batch, kv_heads, max_length, head_size], got {t}")
    if not q.dtype.is_float:
        raise ShapeError(f"{op} of a {q.dtype.name} tensor")
    _same_dtype([q, k, v, pk, pv] + [t for i, t in enumerate(ins[7:], 7) if t is not None and i != 9], op)
    head = pk.shape[3]
    if isinstance(pk.shape[1], int) and pk.shape[1] != hk:
        raise ShapeError(f"{op}: past_key has {pk.shape[1]} heads, kv_num_heads is {hk}")
    if isinstance(head, int):
        if head % 8:
            raise ShapeError(f"{op}: head size {head} must be a multiple of 8 (onnxruntime's kernel)")
        for name, t, n in (("query", q, hq), ("key", k, hk), ("value", v, hk)):
            if isinstance(t.shape[2], int) and t.shape[2] != n * head:
                raise ShapeError(f"{op}: {name} hidden size {t.shape[2]} is not {n} heads x {head}")
    if seqlens.dtype is not DType.int32 or total.dtype is not DType.int32:
        raise ShapeError(f"{op}: seqlens_k and total_sequence_length must be int32")
    if attrs.get("do_rotary"):
        if len(ins) < 9 or ins[7] is None or ins[8] is None:
            raise ShapeError(f"{op}: do_rotary=1 needs cos_cache and sin_cache")
        half = ins[7].shape[1] if ins[7].shape is not None and len(ins[7].shape) == 2 else None
        if not isinstance(half, int) or half % 8 or (isinstance(head, int) and 2 * half > head):
            raise ShapeError(f"{op}: cos_cache must be [max_positions, R/2] with R/2 a multiple of 8 and "
                             f"R <= head size, got {ins[7]}")
    out = TensorType(q.dtype, (q.shape[0], q.shape[1], hq * head if isinstance(head, int) else None))
    total_value = consts[6] if len(consts) > 6 else None
    m = pk.shape[2]                # present holds max(total, M) positions: the past buffer when M >= total
    if isinstance(total_value, np.ndarray) and isinstance(m, int):
        m = max(m, int(total_value.reshape(-1)[0]))
    elif m == 0:
        m = None
    present = TensorType(pk.dtype, (pk.shape[0], pk.shape[1], m, head))
    return [out, present, present]


register(OpDef("GroupQueryAttention", _infer_gqa, group_query_attention, (7, 11),
               attrs={"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": 0,
                      "rotary_interleaved": 0, "softcap": 0.0, "local_window_size": -1},
               domain=DOMAIN, num_outputs=3,
               doc="causal attention over a static KV cache written in place, per-row valid lengths"))


# ============================================================ MatMulNBits (weight-only quantization)
# ``MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?)`` with attributes K, N, bits,
# block_size, accuracy_level (ContribOperators.md): ``Y = A @ W (+ bias)`` where the [K, N]
# weight W is stored transposed and block-quantized along K:
#
# * B: uint8 [N, n_blocks, blob_size], n_blocks = ceil(K / block_size),
#   blob_size = block_size * bits / 8. Within a byte the first value sits in the low bits
#   (4-bit: element 2i in the low nibble of byte i, 2i+1 in the high nibble).
# * scales: A's dtype, N * n_blocks values (row n, block j at n * n_blocks + j).
# * zero_points: packed uint8, each row n padded to ceil(n_blocks * bits / 8) bytes and packed
#   like B; or unpacked in A's dtype, N * n_blocks values. Absent: 2^(bits - 1).
# * W[k, n] = (q[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]; values of the
#   last block past K are padding and ignored.
MATMUL_NBITS_BITS = (2, 4, 8)


def matmul_nbits(a, b, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None, bits=4,
                 block_size=None, accuracy_level=0):
    # Reference semantics: dequantize the weight to A's dtype, then a plain MatMul. g_idx is
    # deprecated in onnxruntime and never written by tgraph; accuracy_level only allows
    # onnxruntime to compute at a lower precision, so the reference ignores it.
    n_blocks = (K + block_size - 1) // block_size
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    packed = np.asarray(b, dtype=np.uint8).reshape(N, -1)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    q = ((packed[:, :, None] >> shifts) & mask).reshape(N, -1)[:, :n_blocks * block_size]
    q = q.reshape(N, n_blocks, block_size).astype(np.float32)
    scale = np.asarray(scales).astype(np.float32).reshape(N, n_blocks, 1)
    if zero_points is None:
        zero = np.float32(1 << (bits - 1))
    elif zero_points.dtype == np.uint8:
        zp = np.asarray(zero_points).reshape(N, -1)
        zero = ((zp[:, :, None] >> shifts) & mask).reshape(N, -1)[:, :n_blocks]
        zero = zero.astype(np.float32).reshape(N, n_blocks, 1)
    else:
        zero = np.asarray(zero_points).astype(np.float32).reshape(N, n_blocks, 1)
    w = ((q - zero) * scale).reshape(N, n_blocks * block_size)[:, :K]
    y = np.matmul(a.astype(np.float32), np.ascontiguousarray(w.T)).astype(a.dtype)
    return y if bias is None else y + bias.astype(a.dtype)


def _infer_matmul_nbits(ins, attrs, consts):
    op = "MatMulNBits"
    a, b, scales = ins[0], ins[1], ins[2]
    K, N, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    if bits not in MATMUL_NBITS_BITS:
        raise ShapeError(f"{op}: bits must be one of {MATMUL_NBITS_BITS}, got {bits}")
    if block < 16 or block & (block - 1):
        raise ShapeError(f"{op}: block_size must be a power of two >= 16, got {block}")
    if not 0 <= attrs.get("accuracy_level", 0) <= 4:
        raise ShapeError(f"{op}: accuracy_level must be 0..4, got {attrs.get('accuracy_level')}")
    if a.dtype not in (DType.float32, DType.float16, DType.bfloat16):
        raise ShapeError(f"{op}: A must be float32, float16 or bfloat16, got {a.dtype.name}")
    shape = _need_rank(a, op)
    if not shape or (isinstance(shape[-1], int) and shape[-1] != K):
        raise ShapeError(f"{op}: A {a} must have last dim K={K}")
    n_blocks = -(-K // block)
    if b.dtype is not DType.uint8 or (b.shape is not None and tuple(b.shape) != (N, n_blocks, block * bits // 8)):
        raise ShapeError(f"{op}: B must be uint8 [{N}, {n_blocks}, {block * bits // 8}], got {b}")
    if scales.dtype is not a.dtype or (scales.shape is not None and math.prod(scales.shape) != N * n_blocks):
        raise ShapeError(f"{op}: scales must be {a.dtype.name} with N*n_blocks = {N * n_blocks} values, got {scales}")
    zp = ins[3] if len(ins) > 3 else None
    if zp is not None and zp.shape is not None:
        want = N * -(-n_blocks * bits // 8) if zp.dtype is DType.uint8 else N * n_blocks
        if (zp.dtype is not DType.uint8 and zp.dtype is not a.dtype) or math.prod(zp.shape) != want:
            raise ShapeError(f"{op}: zero_points must be packed uint8 ({want} bytes) or {a.dtype.name} "
                             f"with {N * n_blocks} values, got {zp}")
    if len(ins) > 4 and ins[4] is not None:
        raise ShapeError(f"{op}: g_idx is deprecated in onnxruntime and not supported")
    bias = ins[5] if len(ins) > 5 else None
    if bias is not None and (bias.dtype is not a.dtype or tuple(bias.shape or ()) != (N,)):
        raise ShapeError(f"{op}: bias must be {a.dtype.name}[{N}], got {bias}")
    return [TensorType(a.dtype, tuple(shape[:-1]) + (N,))]


register(OpDef("MatMulNBits", _infer_matmul_nbits, matmul_nbits, (3, 6),
               attrs={"K": REQUIRED, "N": REQUIRED, "bits": 4, "block_size": REQUIRED, "accuracy_level": 0},
               domain=DOMAIN, doc="A @ dequantize(B, scales, zero_points) (+ bias): block-wise N-bit weights"))
