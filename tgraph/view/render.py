"""networkx graph -> Graphviz: modules as nested clusters, fused ops highlighted, SVG out.

Graphviz (`dot`, Debian's `graphviz` package, driven through the `graphviz` Python
package) does the layout; this module only decides what each vertex, edge and cluster
looks like. Names from a graph reach `dot` as quoted strings with backslashes doubled,
so a node called ``\\N`` or ``"];`` is drawn as written and never changes the picture's
structure; `dot` escapes them again for SVG.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import networkx as nx

from tgraph.errors import TgraphError

from .graph import scope_levels

FUSED_FILL = "#ffd54f"        # amber: an op a fusion made
OP_FILL = "#eceff1"
IO_FILL = "#bbdefb"
LAYER_FILL = "#e8f5e9"
REMOVED_COLOR = "#c62828"      # before/after: ops the optimisation removed ...
CREATED_COLOR = "#2e7d32"      # ... and ops it created

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


class ViewError(TgraphError):
    """The picture cannot be made (no Graphviz, a bad output path)."""


def safe_id(text: str) -> str:
    """An SVG element id / CSS-safe token for `text`."""
    return _UNSAFE_ID.sub("_", text)


def _text(s: str) -> str:
    """A label drawn as plain text: backslashes escaped, and never taken for a Graphviz HTML
    label (which a name written ``<...>`` would otherwise become)."""
    import graphviz
    return graphviz.nohtml(str(s).replace("\\", "\\\\"))


def _vertex_style(d: dict, mark: Optional[str]) -> Dict[str, str]:
    kind = d["kind"]
    if kind in ("input", "output"):
        attrs = {"shape": "ellipse", "style": "filled", "fillcolor": IO_FILL,
                 "label": _text(f"{d['label']}\n{d.get('type', '')}"), "class": kind}
    elif kind == "layer":
        fused = ", ".join(d.get("fused_ops", [])[:4])
        label = f"{d['label']}\n{d['ops']} ops" + (f"\n{fused}" if fused else "")
        attrs = {"shape": "box3d", "style": "filled", "fillcolor": LAYER_FILL, "label": _text(label),
                 "class": "layer", "tooltip": _text(", ".join(f"{k} {v}" for k, v in d["histogram"].items()))}
    else:
        label = d["label"] + (f"\n({d['created_by']})" if d["fused"] and d["created_by"] else "")
        tip = f"{d['name']}\nop {d['op']}\nscope {d['scope'] or '-'}\nconstant inputs {d['consts']}"
        if d["created_by"]:
            tip += f"\ncreated by {d['created_by']}"
        attrs = {"shape": "box", "style": "filled,rounded", "label": _text(label), "tooltip": _text(tip),
                 "fillcolor": FUSED_FILL if d["fused"] else OP_FILL,
                 "class": "op fused" if d["fused"] else "op"}
        if d["fused"]:
            attrs["penwidth"] = "2"
    if mark == "removed":
        attrs.update(color=REMOVED_COLOR, penwidth="2.5", style=attrs["style"] + ",dashed")
        attrs["class"] += " removed"
    elif mark == "created":
        attrs.update(color=CREATED_COLOR, penwidth="2.5")
        attrs["class"] += " created"
    return attrs


def _name(key: str) -> str:
    """A Graphviz node name: `dot` reads ``a:b`` as node `a`, port `b`."""
    return key.replace(":", "%3A")


def add_graph(parent, g: nx.DiGraph, prefix: str = "", marks: Optional[Dict[str, str]] = None,
              shapes: bool = True) -> None:
    """Draw `g` into `parent` (a `graphviz.Digraph` or cluster), its vertices' scopes as
    nested clusters; vertex ids are `prefix` + key, so two graphs can share one picture."""
    marks = marks or {}
    tree: Dict[Tuple[str, ...], List[str]] = {}
    for key, d in g.nodes(data=True):
        tree.setdefault(scope_levels(d["scope"]), []).append(key)

    def emit(container, path: Tuple[str, ...]) -> None:
        for key in tree.get(path, []):
            container.node(_name(prefix + key), id=safe_id(prefix + key), **_vertex_style(g.nodes[key], marks.get(key)))
        children = sorted({p[:len(path) + 1] for p in tree if len(p) > len(path) and p[:len(path)] == path})
        for child in children:
            name = child[-1]
            with container.subgraph(name="cluster_" + safe_id(prefix + name)) as c:
                own = name[len(path[-1]) + 1:] if path else name      # "h.0.attn" inside "h.0": "attn"
                c.attr(label=_text(own), style="rounded", color="#90a4ae", fontcolor="#455a64",
                       id="cluster-" + safe_id(prefix + name))
                emit(c, child)

    emit(parent, ())
    for u, w, d in g.edges(data=True):
        attrs = {"label": _text(d.get("label", "")), "fontsize": "9", "fontcolor": "#607d8b"} if shapes else {}
        parent.edge(_name(prefix + u), _name(prefix + w), **attrs)


def new_digraph(title: str):
    try:
        import graphviz
    except ImportError:
        raise ViewError("tgraph view needs the graphviz Python package: pip install graphviz") from None
    dot = graphviz.Digraph(name="tgraph", graph_attr={"rankdir": "TB", "label": _text(title), "labelloc": "t",
                                                      "fontname": "Helvetica", "newrank": "true"},
                           node_attr={"fontname": "Helvetica", "fontsize": "11"},
                           edge_attr={"fontname": "Helvetica", "arrowsize": "0.6"})
    return dot


def to_svg(dot) -> str:
    """Lay `dot` out with Graphviz and return the SVG text."""
    import graphviz

    try:
        return dot.pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        raise ViewError("Graphviz's `dot` program is not installed (Debian/Ubuntu: apt-get install graphviz)") from None
    except graphviz.CalledProcessError as e:
        first = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise ViewError(f"Graphviz failed: {first[0] if first else e}") from None


def render_graph(g: nx.DiGraph, title: str, marks: Optional[Dict[str, str]] = None, shapes: bool = True) -> str:
    dot = new_digraph(title)
    add_graph(dot, g, marks=marks, shapes=shapes)
    return to_svg(dot)


def render_side_by_side(parts: List[Tuple[str, nx.DiGraph, Dict[str, str]]], title: str, shapes: bool = True) -> str:
    """Several graphs in one picture, each in a top-level cluster (before | after)."""
    dot = new_digraph(title)
    for i, (label, g, marks) in enumerate(parts):
        with dot.subgraph(name=f"cluster_part{i}") as c:
            c.attr(label=_text(label), style="bold", color="#37474f", fontsize="16", id=f"part-{i}")
            add_graph(c, g, prefix=f"p{i}/", marks=marks, shapes=shapes)
    return to_svg(dot)
