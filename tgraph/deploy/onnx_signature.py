"""The inputs and outputs of an ONNX graph as Triton sees them: name, Triton data type, dims.

One reading of the graph shared by the repository writer (`tgraph.deploy.triton`) and its
checker (`tgraph.deploy.triton_check`), so both agree on what "the model's signature" is:
graph inputs that are initializers are not inputs to Triton; a dim without a value
(symbolic or unknown) is -1.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
from typing import List, Optional, Tuple

import onnx

from ..errors import ConfigError

TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorSig:
    name: str
    data_type: str                  # TYPE_FP32 ...
    dims: Tuple[int, ...]           # full shape, -1 where the graph has no value
    dim_names: Tuple[Optional[str], ...]


def _sig(vi, kind: str, where: str) -> TensorSig:
    if not vi.type.HasField("tensor_type"):
        raise ConfigError(f"{where}: graph {kind} {vi.name!r} is not a tensor; Triton's onnxruntime backend "
                          "takes tensors only")
    t = vi.type.tensor_type
    if t.elem_type not in TRITON_TYPES:
        raise ConfigError(f"{where}: graph {kind} {vi.name!r} has element type "
                          f"{onnx.TensorProto.DataType.Name(t.elem_type)}, which Triton has no type for")
    if not t.HasField("shape"):
        raise ConfigError(f"{where}: graph {kind} {vi.name!r} has no shape (not even a rank); Triton needs dims")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    names = tuple(d.dim_param or None for d in t.shape.dim)
    return TensorSig(vi.name, TRITON_TYPES[t.elem_type], dims, names)


def onnx_signature(model: onnx.ModelProto, where: str) -> Tuple[List[TensorSig], List[TensorSig]]:
    """(inputs, outputs) of `model`; `where` names it in errors."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_sig(v, "input", where) for v in model.graph.input if v.name not in inits]
    outputs = [_sig(v, "output", where) for v in model.graph.output]
    return inputs, outputs


def batch_axis_problem(tensors: List[TensorSig]) -> Optional[str]:
    """Why Triton cannot batch along the first axis (None when it can): every input and
    output needs a first dim without a fixed size, the same one everywhere."""
    names = set()
    for t in tensors:
        if not t.dims:
            return f"{t.name!r} is a scalar (no batch axis)"
        if t.dims[0] != -1:
            return f"{t.name!r} has a fixed first dim {t.dims[0]}"
        names.add(t.dim_names[0])
    if len(names) > 1:
        return f"the first dims have different names ({', '.join(sorted(str(n) for n in names))})"
    return None


def external_files(model: onnx.ModelProto, where: str) -> List[str]:
    """The external-data files next to `model`, refusing any that is not a plain sibling file."""
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in init.external_data if e.key == "location"), "")
            if not location or os.path.isabs(location) or ".." in Path(location).parts or "/" in location:
                raise ConfigError(f"{where}: initializer {init.name!r} has external data at {location!r}; "
                                  "only a file next to the model can be copied into a repository")
            files.add(location)
    return sorted(files)
