"""The IR as a networkx graph for drawing: one vertex per op, graph input and output.

networkx carries the analysis the pictures need: the module tree that becomes nested
clusters, collapsing a layer into one box, and the before/after diff of an optimisation.
Constants and weights are not vertices (a 12-layer model has hundreds); each op counts
the constant inputs it reads instead.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import networkx as nx

from tgraph.ir import Graph, Node, Value
from tgraph.ir.traits import ops_with

#: Ops that only a fusion produces (or a foreign exporter that already fused them).
FUSED_OPS = ops_with("fused")


def type_label(v: Optional[Value]) -> str:
    """`float32[batch,seq,768]`: the edge label of a value."""
    if v is None or v.type is None:
        return ""
    shape = v.type.shape
    dims = "?" if shape is None else ",".join(str(d) for d in shape)
    return f"{v.type.dtype.name}[{dims}]"


def scope_of(node: Node) -> str:
    """The module path of a node: the DSL's scope (the importer keeps torch.onnx's)."""
    return node.meta.get("scope") or ""


def scope_levels(scope: str) -> Tuple[str, ...]:
    """``"h.0.attn"`` -> ``("h.0", "h.0.attn")``: nested cluster paths, an index staying with
    its container (``h.0`` is one level, not ``h`` then ``0``)."""
    parts: List[str] = []
    for token in (t for t in scope.split(".") if t):
        if token.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{token}"
        else:
            parts.append(token)
    return tuple(".".join(parts[:i + 1]) for i in range(len(parts)))


def is_fused(node: Node) -> bool:
    created = node.meta.get("created_by", "")
    return created.startswith("fuse-") or node.qualified_op in FUSED_OPS


def ir_to_networkx(graph: Graph) -> nx.DiGraph:
    """Vertices ``in/NAME`` / ``op/NAME`` / ``out/NAME`` with `kind`, `label`, `op`, `scope`,
    `fused`, `created_by`, `consts`; edges carry `label` (the value's type)."""
    g = nx.DiGraph(name=graph.name)
    source: Dict[int, str] = {}
    for v in graph.inputs:
        g.add_node(f"in/{v.name}", kind="input", label=v.name, op="", scope="", fused=False,
                   created_by="", consts=0, type=type_label(v))
        source[id(v)] = f"in/{v.name}"
    for n in graph.nodes:
        key = f"op/{n.name}"
        consts = sum(1 for v in n.inputs if v is not None and v.producer is None and id(v) not in source)
        g.add_node(key, kind="op", label=n.op, name=n.name, op=n.qualified_op, scope=scope_of(n), fused=is_fused(n),
                   created_by=n.meta.get("created_by", ""), consts=consts)
        for v in n.inputs:
            if v is not None and id(v) in source:
                _add_edge(g, source[id(v)], key, type_label(v))
        for v in n.outputs:
            source[id(v)] = key
    for v in graph.outputs:
        key = f"out/{v.name}"
        g.add_node(key, kind="output", label=v.name, op="", scope="", fused=False, created_by="", consts=0,
                   type=type_label(v))
        if id(v) in source:
            _add_edge(g, source[id(v)], key, type_label(v))
    return g


def _add_edge(g: nx.DiGraph, u: str, w: str, label: str) -> None:
    if g.has_edge(u, w):            # one op reading a value twice (x * x): one edge
        return
    g.add_edge(u, w, label=label)


def op_count(g: nx.DiGraph) -> int:
    return sum(1 for _, d in g.nodes(data=True) if d["kind"] == "op")


def layers(g: nx.DiGraph) -> List[str]:
    """The repeated top-level modules (``h.0``, ``h.1`` ...; ``encoder.layer.0`` ...): the
    clusters an overview collapses, in graph order."""
    seen: Dict[str, None] = {}
    for _, d in g.nodes(data=True):
        for level in scope_levels(d["scope"]):
            if re.search(r"\.\d+$", level):
                seen.setdefault(level, None)
                break
    return list(seen)


def layer_of(scope: str, layer_names: Iterable[str]) -> Optional[str]:
    names = set(layer_names)
    return next((lv for lv in scope_levels(scope) if lv in names), None)


def collapse(g: nx.DiGraph, keep_open: Iterable[str] = ()) -> nx.DiGraph:
    """Every layer not in `keep_open` contracted to one vertex ``layer/NAME`` whose label says
    what it holds (op count and its fused ops); edges between blocks survive, once each."""
    names = layers(g)
    open_ = set(keep_open)
    block: Dict[str, str] = {}
    for key, d in g.nodes(data=True):
        layer = layer_of(d["scope"], names)
        block[key] = f"layer/{layer}" if layer is not None and layer not in open_ else key
    out = nx.DiGraph(name=g.graph.get("name", ""))
    members: Dict[str, List[str]] = {}
    for key, b in block.items():
        members.setdefault(b, []).append(key)
    for b, keys in members.items():
        if b.startswith("layer/"):
            ops = Counter(g.nodes[k]["op"] for k in keys)
            fused = sorted({g.nodes[k]["op"] for k in keys if g.nodes[k]["fused"]})
            name = b[len("layer/"):]
            levels = scope_levels(name)
            out.add_node(b, kind="layer", label=name, op="", scope=levels[-2] if len(levels) > 1 else "",
                         fused=bool(fused), created_by="", consts=0, ops=len(keys), fused_ops=fused,
                         histogram=dict(ops.most_common()))
        else:
            out.add_node(b, **g.nodes[b])
    for u, w, d in g.edges(data=True):
        bu, bw = block[u], block[w]
        if bu != bw and not out.has_edge(bu, bw):
            out.add_edge(bu, bw, **d)
    return out


@dataclass
class Diff:
    """What an optimisation did, by node name: ops it removed and ops it created."""

    removed: List[str] = field(default_factory=list)
    created: List[str] = field(default_factory=list)
    kept: int = 0

    def histogram(self, g: nx.DiGraph, keys: List[str]) -> Dict[str, int]:
        return dict(Counter(g.nodes[k]["op"] for k in keys).most_common())


def diff(before: nx.DiGraph, after: nx.DiGraph) -> Diff:
    ops_b = {k for k, d in before.nodes(data=True) if d["kind"] == "op"}
    ops_a = {k for k, d in after.nodes(data=True) if d["kind"] == "op"}
    return Diff(removed=[k for k in before if k in ops_b - ops_a],
                created=[k for k in after if k in ops_a - ops_b], kept=len(ops_a & ops_b))
