"""IR types and arrays as ONNX protos: dtypes, shapes, value infos, tensors, attributes.

Kept apart from the lowering rules so both the rules and the exporter write types the
same way: an `int` dim becomes ``dim_value``, a `str` dim a ``dim_param`` and `None`
an unknown dim; an unknown rank leaves the shape out altogether.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from onnx import AttributeProto, TensorProto, ValueInfoProto, helper, numpy_helper

from tgraph.ir.types import Dim, DType, TensorType


def onnx_dtype(dtype: Any) -> int:
    """The ``TensorProto`` element type of a DType, its name, or a NumPy dtype."""
    return DType.of(dtype).onnx


def onnx_shape(shape: Optional[Sequence[Dim]]) -> Optional[list]:
    """IR dims in the form `helper.make_tensor_value_info` takes (None = unknown dim)."""
    if shape is None:
        return None
    out = []
    for d in shape:
        if d is None or isinstance(d, (int, str)):
            out.append(d)
        else:
            out.append(int(d))
    return out


def value_info(name: str, type: TensorType) -> ValueInfoProto:
    vi = helper.make_tensor_value_info(name, onnx_dtype(type.dtype), onnx_shape(type.shape))
    if type.shape is not None and len(type.shape) == 0:
        # make_tensor_value_info leaves the shape out for []; a scalar needs an empty shape.
        vi.type.tensor_type.shape.SetInParent()
    return vi


def tensor_proto(array: np.ndarray, name: str) -> TensorProto:
    """A tensor initializer; `numpy_helper` stores numeric data (bfloat16 included) as raw bytes."""
    return numpy_helper.from_array(np.asarray(array, order="C"), name)


_RAW_KINDS = frozenset("fiub")


def fill_tensor(t: TensorProto, array: np.ndarray, name: str) -> None:
    """Write `array` into the (empty) initializer `t` in place: one copy of the data, where
    building a TensorProto and then appending it to a graph would make three."""
    array = np.asarray(array)
    if array.dtype.kind not in _RAW_KINDS or array.dtype.byteorder == ">" or array.dtype.isbuiltin != 1:
        t.CopyFrom(tensor_proto(array, name))      # bfloat16, big-endian, strings: numpy_helper knows
        return
    t.name = name
    t.data_type = DType.of(array.dtype).onnx
    t.dims.extend(array.shape)
    t.raw_data = np.ascontiguousarray(array).tobytes()


def finfo_min(dtype: DType) -> float:
    """The lowest finite value of a float dtype (bfloat16 through ml_dtypes)."""
    if dtype is DType.bfloat16:
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    return float(np.finfo(dtype.numpy).min)


def attribute_value(value: Any) -> Any:
    """Convert an IR attribute value into something `helper.make_attribute` accepts."""
    if isinstance(value, DType):
        return value.onnx
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return tensor_proto(value, "value")
    if isinstance(value, (list, tuple)):
        return [attribute_value(v) for v in value]
    return value


def make_attribute(key: str, value: Any) -> AttributeProto:
    value = attribute_value(value)
    if isinstance(value, list) and not value:
        return helper.make_attribute(key, value, attr_type=AttributeProto.INTS)
    return helper.make_attribute(key, value)
