"""`verify(graph)`: the IR's invariants, checked after every pass.

Topological order (every input defined before use, hence no cycles), use lists that
match the inputs exactly, unique value names, known ops with valid arity, and output
types that agree with re-running type inference.
"""
from __future__ import annotations

from ..errors import ShapeError, VerifyError
from .builder import infer_node
from .core import Graph
from .opdefs import get_op


def _compatible(declared, inferred) -> bool:
    if declared.dtype != inferred.dtype:
        return False
    if declared.shape is None or inferred.shape is None:
        return True
    if len(declared.shape) != len(inferred.shape):
        return False
    return all(a == b or a is None or b is None or not (isinstance(a, int) and isinstance(b, int))
               for a, b in zip(declared.shape, inferred.shape))


def verify(graph: Graph) -> None:
    defined = set()
    names = set()
    expected_uses = {}

    def define(v, what):
        if v.name in names:
            raise VerifyError(f"value name {v.name!r} is defined twice ({what})")
        names.add(v.name)
        defined.add(id(v))
        expected_uses[id(v)] = (v, [])

    for v in graph.inputs:
        if v.producer is not None:
            raise VerifyError(f"graph input {v.name} has a producer")
        define(v, "input")
    for name, v in graph.constants.items():
        if v.const is None or v.name != name:
            raise VerifyError(f"constant {name} has no data or a mismatched name")
        define(v, "constant")
    node_names = set()
    for node in graph.nodes:
        if node.graph is not graph:
            raise VerifyError(f"node {node.name} does not belong to this graph")
        if node.name in node_names:
            raise VerifyError(f"node name {node.name!r} is used twice")
        node_names.add(node.name)
        try:
            opdef = get_op(node.op, node.domain)
        except ShapeError as e:
            raise VerifyError(f"node {node.name}: {e}") from None
        lo, hi = opdef.inputs
        if not lo <= len(node.inputs) <= hi:
            raise VerifyError(f"node {node.name} ({node.op}) has {len(node.inputs)} inputs, expects {lo}..{hi}")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                raise VerifyError(f"node {node.name} ({node.op}) uses {v.name} before it is defined "
                                  "(not in topological order, a cycle, or a value from another graph)")
            expected_uses[id(v)][1].append((node, i))
        try:
            inferred = infer_node(node)
        except ShapeError as e:
            raise VerifyError(f"node {node.name} ({node.op}): {e}") from None
        if len(inferred) != len(node.outputs):
            raise VerifyError(f"node {node.name} ({node.op}) has {len(node.outputs)} outputs, inference gives {len(inferred)}")
        for out, t in zip(node.outputs, inferred):
            if out.producer is not node:
                raise VerifyError(f"output {out.name} of {node.name} does not point back to it")
            if not _compatible(out.type, t):
                raise VerifyError(f"node {node.name} ({node.op}): output {out.name} is {out.type}, inference gives {t}")
            define(out, f"output of {node.name}")
    for v, uses in expected_uses.values():
        actual = sorted((id(n), i) for n, i in v.uses)
        if actual != sorted((id(n), i) for n, i in uses):
            raise VerifyError(f"use list of {v.name} is out of date")
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerifyError(f"graph output {v.name} is not defined in the graph")
