"""How passes change the graph: replacing values without renaming graph outputs, and
`replace_match`, the one way a pattern rewrite touches the graph.

A graph output's name is part of the model's interface (it becomes the ONNX output
name), so when a pass forwards a graph output to an equivalent value, the surviving
value takes over the output's name. That is only possible when the survivor is a plain
node output; inputs, constants and other outputs already have names of their own.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from tgraph.ir import Builder, Graph, Node, Value


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


def builder_at(graph: Graph, node: Node) -> Builder:
    """A Builder that inserts before `node`, in `node`'s module scope: where a rewrite of a
    match rooted at `node` puts its replacement (every user of the root comes later)."""
    b = Builder(graph)
    b.insert_before = node
    scope = node.meta.get("scope", "")
    b.scope = scope.split(".") if scope else []
    return b


def replace_match(graph: Graph, olds: Sequence[Value], news: Sequence[Value], nodes: Iterable[Node],
                  who: str = "a rewrite") -> None:
    """The one way a rewrite changes the graph: point every use of each old value (graph
    outputs included, keeping their names) at its replacement, then remove the matched
    nodes, which the caller has checked have no other users."""
    if len(olds) != len(news):
        raise ValueError(f"{who} returned {len(news)} values for {len(olds)} outputs")
    for old, new in zip(olds, news):
        if new.type.dtype != old.type.dtype:
            raise TypeError(f"{who} changed dtype of {old.name}: {old.type} -> {new.type}")
        replace_value(graph, old, new)
    graph.remove_nodes(list(nodes))
