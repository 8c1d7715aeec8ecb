"""`to_onnx` and `save_onnx`: an IR graph as an ONNX model, and that model on disk.

The model is the same bytes for the same graph: names come from the IR, extra
constants and nodes are named in emission order, and protobuf is serialised
deterministically. `ir_version` is the lowest one that carries the opset (capped at
13, which onnxruntime 1.31 still reads; onnx 1.23 would write 14).

Saving is all-or-nothing (`tgraph.atomic.write_files`): the model and its
``.data`` file are replaced as a pair, writers of one path take turns, and the file
passes `onnx.checker` with ``full_check`` before it is moved into place, so a failure
or an invalid model leaves the previous pair as it was and no new file. Weights go to
one sibling ``<name>.onnx.data`` file when asked to, or when they would push the model
near protobuf's 2 GiB limit.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

import tgraph
from tgraph.atomic import write_files
from tgraph.errors import ExportError, ResourceError
from tgraph.ir.core import Graph
from tgraph.ir.lazy import ArrayLike, is_lazy, materialize
from tgraph.ir.types import DType

from .lowering import LoweringContext
from .protos import fill_tensor, value_info

DEFAULT_OPSET = 23
SUPPORTED_OPSETS = range(17, 26)
MAX_IR_VERSION = 13                        # onnxruntime 1.31 refuses IR 14
AUTO_EXTERNAL_BYTES = int(1.8 * 2**30)     # leave room under protobuf's 2 GiB for everything else
PROTOBUF_LIMIT = 2**31 - 1
ALIGN_THRESHOLD, ALIGNMENT = 1 << 20, 1 << 16   # big tensors start on 64 KiB boundaries (mmap-friendly)
STREAM_MIN_BYTES = 1 << 16                 # save_onnx writes constants this big straight from NumPy memory


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
    inline = sum(v.const.nbytes for v in graph.constants.values())
    if inline > PROTOBUF_LIMIT:            # protobuf cannot hold (or parse) more than 2 GiB in one message
        raise ExportError(f"graph {graph.name}: {inline / 2**30:.2f} GiB of weights do not fit in one ONNX "
                          "protobuf (2 GiB limit); save it with external data (save_onnx, tgraph export)")
    from tgraph.progress import phase

    with phase("lower to ONNX"):           # copies every weight into the protobuf: seconds for big models
        return _to_onnx(graph, opset, model_name)[0]


def _to_onnx(graph: Graph, opset: int, model_name: Optional[str] = None, defer_bytes: Optional[int] = None,
             placeholders: bool = False) -> Tuple[ModelProto, List[Tuple[str, ArrayLike]]]:
    """`to_onnx`; with `defer_bytes`, constants of at least that size are not copied into the model
    but returned as (name, array) to be streamed to the file one by one (`_write_deferred` after
    the model, or `_externalize` into the data file). With `placeholders` each keeps its place
    among the initializers as a TensorProto without data, for `_externalize` to fill in."""
    _check_opset(opset)
    ctx = LoweringContext(opset, taken_names=(v.name for v in graph.values()))
    for node in graph.nodes:
        ctx.lower(node)
    for name, v in graph.constants.items():
        if DType.of(v.const.dtype) is not v.type.dtype or tuple(v.const.shape) != v.type.shape:
            raise ExportError(f"constant {name}: data is {v.const.dtype}{list(v.const.shape)} but its type says {v.type}")
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for v in values:
            if v.type.shape is None:
                raise ExportError(f"graph {kind} {v.name} has unknown rank; ONNX graph inputs and outputs need one")
    outputs = {id(v) for v in graph.outputs}
    intermediates = [value_info(o.name, o.type) for n in graph.nodes for o in n.outputs if id(o) not in outputs]
    # Filled in place rather than through helper.make_graph/make_model, which copy every
    # initializer twice more (for GPT-2 124M that was ~1 s of a 4 s export).
    model = ModelProto()
    model.ir_version = ir_version_for(opset)
    model.producer_name, model.producer_version = "tgraph", tgraph.__version__
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(ctx.opset_imports.items()))
    g = model.graph
    g.name = model_name or graph.name
    g.node.extend(ctx.nodes)
    deferred: List[Tuple[str, ArrayLike]] = []
    for name, v in graph.constants.items():
        if defer_bytes is not None and v.const.nbytes >= defer_bytes and v.const.dtype.isbuiltin == 1 \
                and v.const.dtype.kind in "fiub" and v.const.dtype.byteorder != ">":
            deferred.append((name, v.const))
            if placeholders:
                t = g.initializer.add()
                t.name, t.data_type = name, DType.of(v.const.dtype).onnx
                t.dims.extend(v.const.shape)
        else:
            fill_tensor(g.initializer.add(), materialize(v.const), name)
    g.initializer.extend(ctx.initializers)
    g.input.extend(value_info(v.name, v.type) for v in graph.inputs)
    g.output.extend(value_info(v.name, v.type) for v in graph.outputs)
    g.value_info.extend(intermediates)
    return model, deferred


# ------------------------------------------------------------------------------ streaming
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_GRAPH_TAG, _INITIALIZER_TAG, _RAW_DATA_TAG = b"\x3a", b"\x2a", b"\x4a"   # ModelProto.graph=7, .initializer=5, raw_data=9


def _write_array(f, array: ArrayLike) -> None:
    """An array's bytes in C order, from its own buffer (no `tobytes` copy); a lazy tensor is
    computed block by block, so at most one block of it is in memory at a time."""
    blocks = array.blocks() if is_lazy(array) else (np.ascontiguousarray(array),)
    for block in blocks:
        try:
            f.write(memoryview(block.reshape(-1)).cast("B"))
        finally:
            del block


def _check_disk(f, nbytes: int) -> None:
    """A one-line error before writing `nbytes` to a disk that lacks them."""
    try:
        st = os.fstatvfs(f.fileno())
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise ResourceError(f"not enough disk space for {nbytes / 2**20:,.1f} MiB of weights "
                            f"({free / 2**20:,.1f} MiB free)")


def _write_deferred(f, deferred: List[Tuple[str, ArrayLike]]) -> int:
    """Append the deferred initializers as a second ``ModelProto.graph`` field holding only them.

    Protobuf parsers merge repeated occurrences of a message field (repeated fields
    concatenate), so the file reads as one model whose initializers are the inline ones
    followed by these. Each array is written straight from its buffer (a lazy one block by
    block): no ``tobytes`` copy, no protobuf copy, no serialisation pass over the weights.
    """
    pieces = []
    for name, array in deferred:
        meta = TensorProto(name=name, data_type=DType.of(array.dtype).onnx, dims=array.shape)
        head = meta.SerializeToString(deterministic=True) + _RAW_DATA_TAG + _varint(array.nbytes)
        pieces.append((head, array, len(head) + array.nbytes))
    graph_len = sum(len(_INITIALIZER_TAG) + len(_varint(n)) + n for _, _, n in pieces)
    _check_disk(f, graph_len)
    f.write(_GRAPH_TAG + _varint(graph_len))
    for head, array, n in pieces:
        f.write(_INITIALIZER_TAG + _varint(n) + head)
        _write_array(f, array)
    return len(_GRAPH_TAG) + len(_varint(graph_len)) + graph_len


# ------------------------------------------------------------------------------ saving
def _tensor_nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return t.ByteSize()


def _externalize(model: ModelProto, f, location: str, size_threshold: int,
                 moved: List[Tuple[TensorProto, Optional[bytes]]], keep: bool = True,
                 pending: Optional[Dict[str, ArrayLike]] = None) -> None:
    """Move raw tensor data of at least `size_threshold` bytes into `f`, noting each move in `moved`
    as it happens so a failure half-way can be undone (`keep=False`: a throwaway model, keep no copy).
    `pending` holds the arrays of data-less placeholders (`_to_onnx(placeholders=True)`): they are
    written straight from the arrays, one at a time, and never enter protobuf."""
    pending = pending or {}

    def size(t: TensorProto) -> int:
        if t.name in pending and not t.HasField("raw_data"):
            return pending[t.name].nbytes
        return len(t.raw_data) if t.HasField("raw_data") and len(t.raw_data) >= size_threshold else 0

    _check_disk(f, sum(size(t) for t in model.graph.initializer))
    offset = 0
    for t in model.graph.initializer:
        array = pending.get(t.name) if not t.HasField("raw_data") else None
        if array is None and (not t.HasField("raw_data") or len(t.raw_data) < size_threshold):
            continue
        data = t.raw_data if array is None else None
        length = array.nbytes if array is not None else len(data)
        if length >= ALIGN_THRESHOLD and offset % ALIGNMENT:
            pad = ALIGNMENT - offset % ALIGNMENT
            f.write(b"\0" * pad)
            offset += pad
        if array is not None:
            _write_array(f, array)
        else:
            f.write(data)
        moved.append((t, data if keep else None))
        _set_external(t, location, offset, length)
        offset += length


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    """What onnx's `set_external_data` writes (it insists on raw_data being there first)."""
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)


def _relocate(model: ModelProto, location: str) -> None:
    """Point every externally stored initializer at `location` (the data file's final name)."""
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location


def check_file(file: Path, shown_as: Path) -> None:
    """`onnx.checker` with `full_check` on a written file; refuses it in one line naming `shown_as`."""
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        reason = " ".join(str(e).split())
        raise ExportError(f"{shown_as.name} would not be a valid ONNX model, so it was not written: {reason}") from None


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
    deferred: List[Tuple[str, ArrayLike]] = []
    if owned:
        total = sum(v.const.nbytes for v in graph_or_model.constants.values())
        to_data = total > AUTO_EXTERNAL_BYTES if external_data is None else bool(external_data)
        # weights are streamed from their arrays to the file, never copied into protobuf: after
        # the model (inline), or into the data file in initializer order (external)
        defer = (size_threshold if to_data else STREAM_MIN_BYTES) if sys.byteorder == "little" else None
        model, deferred = _to_onnx(graph_or_model, opset, None, defer, placeholders=to_data)
    elif isinstance(graph_or_model, ModelProto):
        model = graph_or_model
    else:
        raise ExportError(f"save_onnx: expected a Graph or onnx.ModelProto, got {type(graph_or_model).__name__}")
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise ExportError(f"save_onnx: initializer {t.name} is stored externally; "
                              "load the model with its external data first")
    # (reading t.raw_data copies it: for our own graph, count the arrays instead)
    total = sum(v.const.nbytes for v in graph_or_model.constants.values()) if owned else \
        sum(_tensor_nbytes(t) for t in model.graph.initializer)
    external = total > AUTO_EXTERNAL_BYTES if external_data is None else bool(external_data)
    after_model = [] if external else deferred     # external: the deferred arrays go to the data file
    path.parent.mkdir(parents=True, exist_ok=True)
    moved: List[Tuple[TensorProto, Optional[bytes]]] = []

    def write_data(f, location: str) -> None:
        _externalize(model, f, location, size_threshold, moved, keep=not owned,
                     pending=dict(deferred) if owned else None)

    def write_model(f, location: Optional[str]) -> None:
        if location is not None:
            _relocate(model, location)
        # ByteSize() serialises the whole model to count it: only pay for that near the limit
        inline = sum(_tensor_nbytes(t) for t in model.graph.initializer) if external else total
        near = inline > PROTOBUF_LIMIT // 2
        size = model.ByteSize() + sum(a.nbytes + 64 for _, a in after_model) if near else 0
        if size > PROTOBUF_LIMIT:
            raise ExportError(f"save_onnx: {path.name} would be {size} bytes, over protobuf's 2 GiB limit; "
                              "pass external_data=True")
        f.write(model.SerializeToString(deterministic=True))
        if after_model:
            _write_deferred(f, after_model)

    from tgraph.progress import phase

    try:
        with phase(f"write {path.name}"):          # serialise, stream the weights, full check
            write_files(path, write_model, companion=path.with_name(path.name + ".data"),
                        write_companion=write_data if external else None,
                        check=lambda tmp, _: check_file(tmp, path))
    finally:
        _restore(moved)
    return path
