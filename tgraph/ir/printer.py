"""A stable, readable text form of a graph (jaxpr-like), used in tests and `--print-ir`.

    graph main(%x: float32[batch,seq,64]) {
      %h: float32[batch,seq,64] = MatMul(%x, %w)          # enc.fc
      return %h
    }

Parameters and constants are listed once at the top with their type; small
constants also show their value, so rewrites of shape arithmetic stay visible.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .core import Graph, Node
from .types import DType


def format_attr(value: Any) -> str:
    if isinstance(value, DType):
        return value.name
    if isinstance(value, np.ndarray):
        return f"array({value.tolist()!r}, {value.dtype})" if value.size <= 8 else f"array<{value.dtype}{list(value.shape)}>"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return repr(value)


def _const_summary(array: np.ndarray) -> str:
    if array.size <= 8:
        return " = " + np.array2string(array.reshape(-1), separator=",", threshold=8).replace("\n", "")
    return ""


def _is_default(node: Node, key: str, value: Any) -> bool:
    """Attributes left at their schema default are noise in a printout."""
    from .opdefs import OPS

    opdef = OPS.get(node.qualified_op)
    if opdef is None or key not in opdef.attrs:
        return False
    default = opdef.attrs[key]
    return not isinstance(value, np.ndarray) and type(default) is type(value) and default == value


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ins = ", ".join("None" if v is None else f"%{v.name}" for v in node.inputs)
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(node.attrs.items()) if not _is_default(node, k, v))
    text = f"{outs} = {node.qualified_op}({ins})"
    if attrs:
        text += f" {{{attrs}}}"
    return text


def format_graph(graph: Graph, show_constants: bool = True) -> str:
    sig = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines = [f"graph {graph.name}({sig}) {{"]
    if show_constants:
        for v in graph.constants.values():
            kind = "param" if v.is_param else "const"
            lines.append(f"  {kind} %{v.name}: {v.type}{_const_summary(v.const) if not v.is_param else ''}")
    for node in graph.nodes:
        line = "  " + format_node(node)
        scope = node.meta.get("scope")
        lines.append(f"{line:<100}  # {scope}" if scope else line)
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
