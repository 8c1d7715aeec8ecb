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
               num_outputs=2, onnx=_SKIP_NORM_ONNX, doc="input + skip (+ bias), then LayerNorm; outputs (normalised, sum)", traits=frozenset({"fused"})))
register(OpDef("SkipSimplifiedLayerNormalization",
               _infer_skip_norm("SkipSimplifiedLayerNormalization", ("gamma", "bias")),
               skip_simplified_layer_normalization, (3, 4), attrs={"epsilon": ORT_SKIP_NORM_EPSILON},
               domain=DOMAIN, num_outputs=2, onnx=_SKIP_NORM_ONNX,
               doc="input + skip (+ bias), then RMSNorm; outputs (normalised, sum)", traits=frozenset({"fused"})))


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
    d = past_key.shape[3]
    if key is None:                              # packed QKV: query holds [q | k | v] on its last axis
        query, key, value = np.split(query, [num_heads * d, (num_heads + kv_num_heads) * d], axis=-1)
    b, s, _ = query.shape
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
    packed = k is None and v is None             # query holds [q | k | v] (onnxruntime-genai writes it so)
    if (k is None) != (v is None):
        raise ShapeError(f"{op}: key and value are given together (or both packed into query)")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t is not None and len(_need_rank(t, op)) != 3:
            raise ShapeError(f"{op}: {name} must be 3-D [batch, seq, heads*head_size], got {t}")
    for name, t in (("past_key", pk), ("past_value", pv)):
        if len(_need_rank(t, op)) != 4:
            raise ShapeError(f"{op}: {name} must be 4-D [batch, kv_heads, max_length, head_size], got {t}")
    if not q.dtype.is_float:
        raise ShapeError(f"{op} of a {q.dtype.name} tensor")
    _same_dtype([t for t in (q, k, v, pk, pv) if t is not None]
                + [t for i, t in enumerate(ins[7:], 7) if t is not None and i != 9], op)   # 9: int position_ids
    head = pk.shape[3]
    if isinstance(pk.shape[1], int) and pk.shape[1] != hk:
        raise ShapeError(f"{op}: past_key has {pk.shape[1]} heads, kv_num_heads is {hk}")
    if isinstance(head, int):
        if head % 8:
            raise ShapeError(f"{op}: head size {head} must be a multiple of 8 (onnxruntime's kernel)")
        sizes = (("query", q, hq + 2 * hk),) if packed else (("query", q, hq), ("key", k, hk), ("value", v, hk))
        for name, t, n in sizes:
            if isinstance(t.shape[2], int) and t.shape[2] != n * head:
                raise ShapeError(f"{op}: {name} hidden size {t.shape[2]} is not {n} heads x {head}"
                                 + (" (packed q, k, v)" if packed else ""))
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
               doc="causal attention over a static KV cache written in place, per-row valid lengths", traits=frozenset({"fused"})))


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
               domain=DOMAIN, doc="A @ dequantize(B, scales, zero_points) (+ bias): block-wise N-bit weights", traits=frozenset({"fused"})))


# ============================================================ more contrib ops exported LLMs carry
# What onnxruntime's transformer optimizer and onnxruntime-genai's builder write besides the
# ops above, so that such a graph can be inspected, run in NumPy and re-optimized:
#
# * ``FastGelu(X, bias?)``: tanh-approximated GELU of X (+ bias).
# * ``BiasGelu(A, B)``: exact (erf) GELU of A + B.
# * ``RotaryEmbedding(input, position_ids, cos_cache, sin_cache)``: input [B, S, N*H] or
#   [B, N, S, H]; position_ids [B, S], or [1] holding the offset of position 0; caches
#   [max_pos, R/2]; rotate_half pairs (i, i + R/2), or (2i, 2i + 1) when interleaved; the
#   first R = rotary_embedding_dim (default: the head size) dims of each head rotate.
# * ``EmbedLayerNormalization(input_ids, segment_ids?, word_emb, pos_emb, seg_emb?, gamma,
#   beta, mask?, position_ids?) -> (output, mask_index, embedding_sum?)``: BERT's embedding
#   sum then LayerNorm; mask_index [B] int32 counts each row's mask ones (the sequence length
#   without a mask).
def fast_gelu(x, bias=None):
    if bias is not None:
        x = x + bias
    xf = x.astype(np.float32) if x.dtype != np.float64 else x
    c = np.asarray(0.7978845608028654, xf.dtype)
    y = np.asarray(0.5, xf.dtype) * xf * (1 + np.tanh(c * (xf + np.asarray(0.044715, xf.dtype) * xf * xf * xf)))
    return y.astype(x.dtype)


def bias_gelu(a, b):
    x = (a + b).astype(np.float64)
    t = 1.0 / (1.0 + 0.5 * np.abs(x / np.sqrt(2.0)))
    z = np.abs(x / np.sqrt(2.0))
    tau = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    erf = np.where(x >= 0, 1.0 - tau, tau - 1.0)
    return (0.5 * x * (1.0 + erf)).astype(a.dtype)


def ms_rotary_embedding(x, position_ids, cos_cache, sin_cache, interleaved=0, is_packed_batching=0, num_heads=0,
                        rotary_embedding_dim=0, scale=1.0):
    shape = x.shape
    r = rotary_embedding_dim or 2 * cos_cache.shape[1]
    if x.ndim == 3:
        heads = num_heads or shape[2] // r
        x = x.reshape(shape[0], shape[1], heads, shape[2] // heads)            # [B, S, N, H]
    else:
        x = np.transpose(x, (0, 2, 1, 3))                                      # [B, S, N, H]
    b, s = x.shape[0], x.shape[1]
    pos = np.asarray(position_ids).astype(np.int64)
    if pos.ndim == 1:                                                          # [1]: the offset of position 0
        pos = np.broadcast_to(pos.reshape(1, 1) + np.arange(s)[None, :], (b, s))
    cos, sin = cos_cache[pos][:, :, None, :r // 2], sin_cache[pos][:, :, None, :r // 2]   # [B, S, 1, R/2]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :r // 2], rot[..., r // 2:])
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    rot = np.stack([real, imag], axis=-1).reshape(rot.shape) if interleaved else np.concatenate([real, imag], axis=-1)
    y = np.concatenate([rot, rest], axis=-1).astype(x.dtype)
    return y.reshape(shape) if len(shape) == 3 else np.transpose(y, (0, 2, 1, 3))


def embed_layer_normalization(input_ids, segment_ids, word_embedding, position_embedding, segment_embedding=None,
                              gamma=None, beta=None, mask=None, position_ids=None, epsilon=1e-12,
                              mask_index_type=1):
    b, s = input_ids.shape
    pos = np.arange(s)[None, :] if position_ids is None else np.asarray(position_ids).astype(np.int64)
    e = word_embedding[input_ids.astype(np.int64)] + position_embedding[np.broadcast_to(pos, (b, s))]
    if segment_ids is not None and segment_embedding is not None:
        e = e + segment_embedding[segment_ids.astype(np.int64)]
    ef = e.astype(np.float32) if e.dtype != np.float64 else e
    mean = np.mean(ef, axis=-1, keepdims=True)
    d = ef - mean
    var = np.mean(d * d, axis=-1, keepdims=True)
    y = (d / np.sqrt(var + np.asarray(epsilon, ef.dtype))).astype(e.dtype) * gamma + beta
    if mask is None:
        index = np.full((b,), s, dtype=np.int32)
    else:
        index = np.sum(mask != 0, axis=1).astype(np.int32)
    return y, index, e


def _infer_fast_gelu(ins, attrs, consts):
    x = ins[0]
    if not x.dtype.is_float:
        raise ShapeError(f"FastGelu of a {x.dtype.name} tensor")
    if len(ins) > 1 and ins[1] is not None:
        _same_dtype([x, ins[1]], "FastGelu")
        if ins[1].shape is not None and (len(ins[1].shape) != 1 or ins[1].shape[0] != (x.shape or (None,))[-1]):
            raise ShapeError(f"FastGelu: bias must be a vector over the last dim of {x}, got {ins[1]}")
    return [x]


def _infer_bias_gelu(ins, attrs, consts):
    from .opdefs import broadcast_shapes

    if not ins[0].dtype.is_float:
        raise ShapeError(f"BiasGelu of a {ins[0].dtype.name} tensor")
    return [TensorType(_same_dtype(ins, "BiasGelu"), broadcast_shapes(ins[0].shape, ins[1].shape))]


def _infer_ms_rotary(ins, attrs, consts):
    op = "com.microsoft.RotaryEmbedding"
    x, pos, cos, sin = ins
    shape = _need_rank(x, op)
    if len(shape) not in (3, 4):
        raise ShapeError(f"{op}: input must be [batch, seq, hidden] or [batch, heads, seq, head], got {x}")
    if not x.dtype.is_float:
        raise ShapeError(f"{op} of a {x.dtype.name} tensor")
    _same_dtype([x, cos, sin], op)
    if pos.dtype is not DType.int64:
        raise ShapeError(f"{op}: position_ids must be int64, got {pos.dtype.name}")
    if attrs.get("is_packed_batching"):
        raise ShapeError(f"{op}: is_packed_batching=1 is not supported")
    if attrs.get("scale", 1.0) != 1.0:
        raise ShapeError(f"{op}: scale other than 1.0 is not supported")
    half = cos.shape[1] if cos.shape is not None and len(cos.shape) == 2 else None
    r = attrs.get("rotary_embedding_dim") or (2 * half if isinstance(half, int) else None)
    if attrs.get("rotary_embedding_dim") and len(shape) == 3 and not attrs.get("num_heads"):
        raise ShapeError(f"{op}: rotary_embedding_dim with a 3-D input needs num_heads")
    head = shape[3] if len(shape) == 4 else (shape[2] // attrs["num_heads"] if attrs.get("num_heads") and
                                              isinstance(shape[2], int) else r)
    if isinstance(r, int) and isinstance(head, int) and (r % 2 or r > head):
        raise ShapeError(f"{op}: rotary dim {r} must be even and at most the head size {head}")
    return [x]


def _infer_embed_layer_norm(ins, attrs, consts):
    op = "EmbedLayerNormalization"
    ids, seg, word, posemb = ins[0], ins[1], ins[2], ins[3]
    gamma, beta = ins[5], ins[6]
    if gamma is None or beta is None:
        raise ShapeError(f"{op}: gamma and beta are required")
    shape = _need_rank(ids, op)
    if len(shape) != 2 or ids.dtype is not DType.int32:
        raise ShapeError(f"{op}: input_ids must be int32 [batch, seq], got {ids}")
    for name, t in (("segment_ids", seg), ("mask", ins[7] if len(ins) > 7 else None)):
        if t is not None and (t.dtype is not DType.int32 or t.shape is None or len(t.shape) != 2):
            raise ShapeError(f"{op}: {name} must be int32 [batch, seq], got {t}")
    present = [word, posemb, gamma, beta] + ([ins[4]] if ins[4] is not None else [])
    dtype = _same_dtype(present, op)
    hidden = word.shape[1] if word.shape is not None and len(word.shape) == 2 else None
    if attrs.get("mask_index_type", 1) != 1:
        raise ShapeError(f"{op}: mask_index_type {attrs.get('mask_index_type')} is not supported (only 1)")
    out = TensorType(dtype, (shape[0], shape[1], hidden))
    return [out, TensorType(DType.int32, (shape[0],)), out]


register(OpDef("FastGelu", _infer_fast_gelu, fast_gelu, (1, 2), domain=DOMAIN,
               doc="tanh-approximated GELU of X (+ bias)", traits=frozenset({"fused"})))
register(OpDef("BiasGelu", _infer_bias_gelu, bias_gelu, (2, 2), domain=DOMAIN, doc="erf GELU of A + B", traits=frozenset({"fused"})))
register(OpDef("RotaryEmbedding", _infer_ms_rotary, ms_rotary_embedding, (4, 4), domain=DOMAIN,
               attrs={"interleaved": 0, "is_packed_batching": 0, "num_heads": 0, "rotary_embedding_dim": 0,
                      "scale": 1.0},
               doc="rotary position embedding with position ids (or an offset) and cos/sin tables", traits=frozenset({"fused"})))
register(OpDef("EmbedLayerNormalization", _infer_embed_layer_norm, embed_layer_normalization, (7, 9),
               attrs={"epsilon": ORT_SKIP_NORM_EPSILON, "mask_index_type": 1}, domain=DOMAIN, num_outputs=3,
               doc="word + position (+ segment) embeddings, then LayerNorm; (output, mask_index, embedding_sum)", traits=frozenset({"fused"})))
