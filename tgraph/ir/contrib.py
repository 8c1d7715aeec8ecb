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
from .opdefs import REQUIRED, OpDef, _need_rank, _same_dtype, register
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


register(OpDef("SkipLayerNormalization", _infer_skip_norm("SkipLayerNormalization", ("gamma", "beta", "bias")),
               skip_layer_normalization, (3, 5), attrs={"epsilon": ORT_SKIP_NORM_EPSILON}, domain=DOMAIN,
               num_outputs=2, doc="input + skip (+ bias), then LayerNorm; outputs (normalised, sum)"))
register(OpDef("SkipSimplifiedLayerNormalization",
               _infer_skip_norm("SkipSimplifiedLayerNormalization", ("gamma", "bias")),
               skip_simplified_layer_normalization, (3, 4), attrs={"epsilon": ORT_SKIP_NORM_EPSILON},
               domain=DOMAIN, num_outputs=2, doc="input + skip (+ bias), then RMSNorm; outputs (normalised, sum)"))


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
