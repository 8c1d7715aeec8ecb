"""The ONNX backend: per-op lowering rules and the exporter.

`to_onnx(graph)` builds an `onnx.ModelProto`; `save_onnx(graph, path)` writes it
atomically (with external data for big models). `LOWERINGS` is the rule table the
completeness test checks against the op table.
"""
from .export import DEFAULT_OPSET, SUPPORTED_OPSETS, ir_version_for, save_onnx, to_onnx
from .lowering import LOWERINGS, LoweringContext, lowering
from .protos import onnx_dtype, onnx_shape, value_info

__all__ = ["DEFAULT_OPSET", "LOWERINGS", "LoweringContext", "SUPPORTED_OPSETS", "ir_version_for", "lowering",
           "onnx_dtype", "onnx_shape", "save_onnx", "to_onnx", "value_info"]
