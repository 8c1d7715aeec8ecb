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

import numpy as np

from ..errors import ShapeError
from .opdefs import OnnxInterface, OpDef, _need_rank, _same_dtype, register

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
