"""`to_onnx` and `save_onnx`: an IR graph as an ONNX model, and that model on disk.

The model is the same bytes for the same graph: names come from the IR, extra
constants and nodes are named in emission order, and protobuf is serialised
deterministically. `ir_version` is the lowest one that carries the opset (capped at
13, which onnxruntime 1.31 still reads; onnx 1.23 would write 14).

Saving is atomic: everything is written to temporary files in the destination
directory and moved into place with `os.replace`, so a failure leaves no partial
model and no partial ``.data`` file behind. Weights go to one sibling
``<name>.onnx.data`` file when asked to, or when they would push the model near
protobuf's 2 GiB limit.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import List, Optional, Tuple, Union

from onnx import ModelProto, TensorProto, helper
from onnx.external_data_helper import set_external_data

import tgraph
from tgraph.errors import ExportError
from tgraph.ir.core import Graph
from tgraph.ir.types import DType

from .lowering import LoweringContext
from .protos import tensor_proto, value_info

DEFAULT_OPSET = 23
SUPPORTED_OPSETS = range(17, 26)
MAX_IR_VERSION = 13                        # onnxruntime 1.31 refuses IR 14
AUTO_EXTERNAL_BYTES = int(1.8 * 2**30)     # leave room under protobuf's 2 GiB for everything else
PROTOBUF_LIMIT = 2**31 - 1
ALIGN_THRESHOLD, ALIGNMENT = 1 << 20, 1 << 16   # big tensors start on 64 KiB boundaries (mmap-friendly)


def ir_version_for(opset: int) -> int:
    """The lowest IR version of an onnx release that knows `opset` (never above 13)."""
    versions = [row[1] for row in helper.VERSION_TABLE if row[2] >= opset]
    if not versions:
        raise ExportError(f"onnx {helper.VERSION_TABLE[-1][0]} does not know opset {opset}")
    return min(min(versions), MAX_IR_VERSION)


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or isinstance(opset, bool) or opset not in SUPPORTED_OPSETS:
        raise ExportError(f"unsupported opset {opset!r}: tgraph exports opsets "
                          f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET, *, model_name: Optional[str] = None) -> ModelProto:
    """Lower every node by its rule; parameters and constants become initializers."""
    _check_opset(opset)
    ctx = LoweringContext(opset, taken_names=(v.name for v in graph.values()))
    for node in graph.nodes:
        ctx.lower(node)
    initializers = []
    for name, v in graph.constants.items():
        if DType.of(v.const.dtype) is not v.type.dtype or tuple(v.const.shape) != v.type.shape:
            raise ExportError(f"constant {name}: data is {v.const.dtype}{list(v.const.shape)} but its type says {v.type}")
        initializers.append(tensor_proto(v.const, name))
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for v in values:
            if v.type.shape is None:
                raise ExportError(f"graph {kind} {v.name} has unknown rank; ONNX graph inputs and outputs need one")
    outputs = {id(v) for v in graph.outputs}
    intermediates = [value_info(o.name, o.type) for n in graph.nodes for o in n.outputs if id(o) not in outputs]
    proto_graph = helper.make_graph(
        ctx.nodes, model_name or graph.name,
        inputs=[value_info(v.name, v.type) for v in graph.inputs],
        outputs=[value_info(v.name, v.type) for v in graph.outputs],
        initializer=initializers + ctx.initializers,
        value_info=intermediates,
    )
    return helper.make_model(
        proto_graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(ctx.opset_imports.items())],
        producer_name="tgraph",
        producer_version=tgraph.__version__,
        ir_version=ir_version_for(opset),
    )


# ------------------------------------------------------------------------------ saving
def _tensor_nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return t.ByteSize()


def _open_temp(directory: Path, name: str):
    """A new file next to its destination (same filesystem, so os.replace is atomic)."""
    tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb")


def _close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _externalize(model: ModelProto, f, location: str, size_threshold: int,
                 moved: List[Tuple[TensorProto, Optional[bytes]]], keep: bool = True) -> None:
    """Move raw tensor data of at least `size_threshold` bytes into `f`, noting each move in `moved`
    as it happens so a failure half-way can be undone (`keep=False`: a throwaway model, keep no copy)."""
    offset = 0
    for t in model.graph.initializer:
        if not t.HasField("raw_data") or len(t.raw_data) < size_threshold:
            continue
        data = t.raw_data
        if len(data) >= ALIGN_THRESHOLD and offset % ALIGNMENT:
            pad = ALIGNMENT - offset % ALIGNMENT
            f.write(b"\0" * pad)
            offset += pad
        f.write(data)
        moved.append((t, data if keep else None))
        set_external_data(t, location, offset=offset, length=len(data))
        t.ClearField("raw_data")
        offset += len(data)


def _restore(moved: List[Tuple[TensorProto, Optional[bytes]]]) -> None:
    for t, data in moved:
        if data is None:
            continue
        del t.external_data[:]
        t.ClearField("data_location")
        t.raw_data = data


def save_onnx(graph_or_model: Union[Graph, ModelProto], path: Union[str, os.PathLike], *,
              opset: int = DEFAULT_OPSET, external_data: Optional[bool] = None,
              size_threshold: int = 1024) -> Path:
    """Write a graph (exported at `opset`) or a ModelProto to `path`, atomically.

    `external_data`: True puts every initializer of at least `size_threshold` bytes into
    ``<path>.data``; None does so only when the weights exceed ~1.8 GiB; False never does.
    A given ModelProto is left as it was.
    """
    path = Path(path)
    owned = isinstance(graph_or_model, Graph)          # a model we built ourselves need not be restored
    if owned:
        model = to_onnx(graph_or_model, opset)
    elif isinstance(graph_or_model, ModelProto):
        model = graph_or_model
    else:
        raise ExportError(f"save_onnx: expected a Graph or onnx.ModelProto, got {type(graph_or_model).__name__}")
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise ExportError(f"save_onnx: initializer {t.name} is stored externally; "
                              "load the model with its external data first")
    total = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    external = total > AUTO_EXTERNAL_BYTES if external_data is None else bool(external_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + ".data")
    temps: List[Path] = []
    moved: List[Tuple[TensorProto, Optional[bytes]]] = []
    try:
        if external:
            tmp, f = _open_temp(path.parent, data_path.name)
            temps.append(tmp)
            try:
                _externalize(model, f, data_path.name, size_threshold, moved, keep=not owned)
            finally:
                _close(f)
        size = model.ByteSize()
        if size > PROTOBUF_LIMIT:
            raise ExportError(f"save_onnx: {path.name} would be {size} bytes, over protobuf's 2 GiB limit; "
                              "pass external_data=True")
        payload = model.SerializeToString(deterministic=True)
        tmp, f = _open_temp(path.parent, path.name)
        temps.append(tmp)
        try:
            f.write(payload)
        finally:
            _close(f)
        if moved:
            os.replace(temps[0], data_path)
        try:
            os.replace(temps[-1], path)
        except BaseException:
            if moved:
                data_path.unlink(missing_ok=True)
            raise
    finally:
        _restore(moved)
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return path
