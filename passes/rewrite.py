"""Helpers passes share for replacing one value by another without renaming graph outputs.

A graph output's name is part of the model's interface (it becomes the ONNX output
name), so when a pass forwards a graph output to an equivalent value, the surviving
value takes over the output's name. That is only possible when the survivor is a plain
node output; inputs, constants and other outputs already have names of their own.
"""
from __future__ import annotations

from tgraph.ir import Graph, Value


def is_output(graph: Graph, v: Value) -> bool:
    return any(o is v for o in graph.outputs)


def can_replace(graph: Graph, old: Value, new: Value) -> bool:
    """Whether `replace_value(graph, old, new)` keeps every graph output's name."""
    if old is new or not is_output(graph, old):
        return True
    return new.producer is not None and not is_output(graph, new)


def replace_value(graph: Graph, old: Value, new: Value) -> None:
    """Point every use of `old` (graph outputs included) at `new`; `new` inherits an output name."""
    if old is new:
        return
    if not is_output(graph, old):
        graph.replace_all_uses_with(old, new)
        return
    if not can_replace(graph, old, new):
        raise ValueError(f"cannot replace graph output {old.name} by {new.name} without renaming an output")
    graph.replace_all_uses_with(old, new, replace_graph_outputs=True)
    # `old` dies with its producer; `new` carries its name from now on.
    graph.names.release(new.name)
    new.name = old.name
