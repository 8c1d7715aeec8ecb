"""`cse`: common subexpression elimination.

Before::

    const %c: float32[2] = [1.,2.]
    const %c_1: float32[2] = [1.,2.]
    %a: float32[2] = Add(%x, %c)
    %a_1: float32[2] = Add(%c_1, %x)
    %m: float32[2] = Mul(%a, %a_1)

After::

    const %c: float32[2] = [1.,2.]
    %a: float32[2] = Add(%x, %c)
    %m: float32[2] = Mul(%a, %a)

Identical non-parameter constants (same dtype, shape and bytes) are merged first; then
one forward sweep keys every node by (op, inputs, attributes, output types) and
replaces a node equal to an earlier one. A `Shape` whose selected dims are all known
statically is keyed by those dims instead of its input (see `static_shape_key`). Because the sweep is in topological order,
merging a node makes its users mergeable in the same sweep, so one run reaches the
fixed point. Parameters are never merged: each is a named checkpoint tensor.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional

import numpy as np

from tgraph.ir import DType, Graph, Node, Value
from tgraph.ir.opdefs import OPS
from tgraph.ir.traits import ops_with

from .base import Pass, register_pass
from .rewrite import can_replace, is_output, replace_value

#: Standard ops whose result does not depend on the order of their two inputs.
COMMUTATIVE = ops_with("commutative")


def attr_key(value: Any) -> Hashable:
    """A hashable key that is equal exactly when two attribute values mean the same.

    Types are part of the key (``1`` and ``1.0`` lower to different ONNX attributes);
    floats compare by bit pattern, so NaN equals NaN and 0.0 differs from -0.0.
    """
    if value is None or isinstance(value, (str, bool)):
        return (type(value).__name__, value)
    if isinstance(value, DType):
        return ("dtype", value.name)
    if isinstance(value, (int, np.integer)):
        return ("int", int(value))
    if isinstance(value, (float, np.floating)):
        return ("float", float(value).hex())
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(attr_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, attr_key(v)) for k, v in value.items())))
    if isinstance(value, np.dtype):
        return ("npdtype", value.str)
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return (type(value).__qualname__, value)


def static_shape_key(node: Node, attrs: Dict[str, Any]) -> Optional[Hashable]:
    """The dims a standard `Shape` reads, when its input's type knows them all (ints or symbols).

    A symbolic dim names one size throughout the graph (ONNX dim_param semantics), so two Shapes
    reading equal dims compute equal values whatever their inputs: e.g. every layer's
    Shape(present.{i}.key) of a KV-cached decoder reads ``past_seq + seq``, and merging them lets
    the mask each layer derives from it be built once.
    """
    if node.domain or node.op != "Shape" or not node.inputs or node.inputs[0] is None:
        return None
    shape = node.inputs[0].type.shape
    if shape is None:
        return None
    start, end = attrs.get("start"), attrs.get("end")
    dims = tuple(shape[slice(0 if start is None else int(start), None if end is None else int(end))])
    if any(d is None or (isinstance(d, str) and not d) for d in dims):
        return None
    return ("Shape", dims, tuple(o.type for o in node.outputs))


def node_key(node: Node) -> Hashable:
    opdef = OPS.get(node.qualified_op)
    attrs = opdef.resolve_attrs(node.attrs) if opdef is not None else node.attrs
    static = static_shape_key(node, attrs)
    if static is not None:
        return static
    ins: List[Optional[int]] = [None if v is None else id(v) for v in node.inputs]
    if not node.domain and node.op in COMMUTATIVE:
        ins.sort(key=lambda i: -1 if i is None else i)
    return (node.domain, node.op, tuple(ins), attr_key(attrs), tuple(o.type for o in node.outputs))


def merge_constants(graph: Graph) -> int:
    """Merge identical non-parameter constants; a graph-output constant survives its twins."""
    groups: Dict[Hashable, List[Value]] = {}
    for v in graph.constants.values():
        if not v.is_param:
            groups.setdefault((v.const.dtype.str, v.const.shape), []).append(v)
    merged = 0
    for candidates in groups.values():
        if len(candidates) < 2:
            continue
        by_bytes: Dict[bytes, List[Value]] = {}
        for v in candidates:
            by_bytes.setdefault(v.const.tobytes(), []).append(v)
        for same in by_bytes.values():
            keep = next((v for v in same if is_output(graph, v)), same[0])
            for v in same:
                if v is keep or is_output(graph, v):
                    continue
                graph.replace_all_uses_with(v, keep)
                del graph.constants[v.name]
                graph.names.release(v.name)
                merged += 1
    return merged


@register_pass
class CommonSubexpressionElimination(Pass):
    """Merge identical constants and nodes that compute the same value."""

    name = "cse"

    def run(self, graph: Graph) -> Dict[str, int]:
        merged_constants = merge_constants(graph)
        seen: Dict[Hashable, Node] = {}
        merged = 0
        for node in list(graph.nodes):
            key = node_key(node)
            first = seen.setdefault(key, node)
            if first is node:
                continue
            if not all(can_replace(graph, old, new) for old, new in zip(node.outputs, first.outputs)):
                continue
            for old, new in zip(node.outputs, first.outputs):
                replace_value(graph, old, new)
            graph.remove_node(node)
            merged += 1
        return {"merged_nodes": merged, "merged_constants": merged_constants}
