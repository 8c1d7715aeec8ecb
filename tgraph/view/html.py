"""The HTML view: one page, pre-rendered SVGs, a reader opens one layer at a time.

Graphviz cannot re-lay out a graph in the browser, so each state a reader can pick is
laid out here: the overview (every repeated layer collapsed into one box), each layer
opened on its own, and the whole graph (below `FULL_VIEW_LIMIT` ops). Clicking a
collapsed layer shows that layer's view; ``page.html#view=layer-h.0`` opens it directly.
"""
from __future__ import annotations

from typing import List, Optional

import networkx as nx

from .graph import Diff, collapse, layers, op_count
from .render import render_graph, render_side_by_side

FULL_VIEW_LIMIT = 4000      # ops: beyond this `dot` takes minutes; the layer views still work


def _histogram_text(h) -> str:
    return ", ".join(f"{op} ×{n}" for op, n in h.items()) or "nothing"


def _svg(parts, title: str, shapes: bool) -> str:
    if len(parts) == 1:
        return render_graph(parts[0][1], title, marks=parts[0][2], shapes=shapes)
    return render_side_by_side(parts, title, shapes=shapes)


def render_html(after: nx.DiGraph, title: str, facts: str, *, before: Optional[nx.DiGraph] = None,
                diff: Optional[Diff] = None, shapes: bool = True) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    graphs = [("after" if before is not None else "", after, dict.fromkeys(diff.created, "created") if diff else {})]
    if before is not None:
        graphs.insert(0, ("before: -O0", before, dict.fromkeys(diff.removed, "removed") if diff else {}))
    names: List[str] = list(dict.fromkeys(n for _, g, _ in graphs for n in layers(g)))

    def state(keep_open) -> list:
        return [(label, collapse(g, keep_open), marks) for label, g, marks in graphs]

    views = []
    if names:
        views.append({"id": "overview", "label": "overview (layers collapsed)", "parts": state(())})
        views += [{"id": f"layer-{n}", "label": f"{n} open", "parts": state([n])} for n in names]
    if op_count(after) + (op_count(before) if before is not None else 0) <= FULL_VIEW_LIMIT or not names:
        views.append({"id": "all", "label": "all ops", "parts": graphs})
    for v in views:
        v["svg"] = _svg(v["parts"], f"{title}: {v['label']}", shapes)
        v["ops"] = sum(op_count(g) for _, g, _ in v["parts"])
    env = Environment(loader=PackageLoader("tgraph.view", "templates"), autoescape=select_autoescape(["html", "j2"]))
    diff_text = None
    if diff is not None and before is not None:
        diff_text = {"removed": _histogram_text(diff.histogram(before, diff.removed)),
                     "created": _histogram_text(diff.histogram(after, diff.created)), "kept": diff.kept}
    return env.get_template("view.html.j2").render(
        title=title, facts=facts, views=views, view_ids=[v["id"] for v in views], diff=diff_text,
        op_count=op_count(after))
