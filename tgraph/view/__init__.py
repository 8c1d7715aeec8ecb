"""Pictures of a model's IR: `tgraph view MODEL_OR_ONNX -o graph.svg|graph.html`.

The IR becomes a networkx graph (`graph.py`: module clusters, collapsed layers, the
before/after diff), Graphviz lays it out (`render.py`), and an HTML page (`html.py`)
lets a reader open one layer at a time. Every picture is drawn from the same IR the
exporters see, after the same passes, so what it shows is what gets exported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

from tgraph.errors import ConfigError

from .graph import diff, ir_to_networkx, op_count
from .html import render_html
from .render import ViewError, render_graph, render_side_by_side

FORMATS = (".svg", ".html")


@dataclass
class ViewResult:
    path: Path
    ops_before: Optional[int]      # None unless --before-after
    ops: int
    fusions: Dict[str, int]


def load_graph(source: str, overrides: Optional[Mapping[str, str]] = None, seed: int = 0):
    """The unoptimised IR of a model (name, file.py:factory, checkpoint dir) or an .onnx file."""
    if source.endswith(".onnx"):
        if overrides:
            raise ConfigError("--set applies to models, not to an .onnx file")
        if not Path(source).is_file():
            raise ConfigError(f"ONNX file not found: {source}")
        from tgraph.onnx_import import import_onnx

        return import_onnx(source), Path(source).name
    from tgraph.api import build

    return build(source, overrides, seed=seed, level=0).graph, source


def view(source: str, output, *, level: int = 0, before_after: bool = False,
         overrides: Optional[Mapping[str, str]] = None, seed: int = 0, shapes: bool = True) -> ViewResult:
    """Draw `source` after -O`level` into `output` (.svg or .html); with `before_after`,
    the -O0 graph beside it with removed and created ops marked."""
    from tgraph.atomic import write_files
    from tgraph.passes import optimize

    out = Path(output)
    if out.suffix not in FORMATS:
        raise ConfigError(f"output must end in .svg or .html: {out}")
    if before_after and level == 0:
        raise ConfigError("--before-after compares -O0 with an optimisation level: give -O 1, 2 or 3")
    graph, name = load_graph(source, overrides, seed)
    before = ir_to_networkx(graph) if before_after else None
    fusions: Dict[str, int] = {}
    if level > 0:
        fusions = optimize(graph, level=level).fusions()
    after = ir_to_networkx(graph)
    title = f"{name} at -O{level}" + (" (before | after)" if before_after else "")
    facts = f"{op_count(after)} ops" + (f" (from {op_count(before)})" if before is not None else "") + \
        " · fusions: " + (" ".join(f"{k}={v}" for k, v in fusions.items()) or "none")
    d = diff(before, after) if before is not None else None
    if out.suffix == ".svg":
        if d is None:
            text = render_graph(after, f"{title}: {facts}", shapes=shapes)
        else:
            text = render_side_by_side([("before: -O0", before, dict.fromkeys(d.removed, "removed")),
                                        (f"after: -O{level}", after, dict.fromkeys(d.created, "created"))],
                                       f"{title}: {facts}", shapes=shapes)
    else:
        text = render_html(after, title, facts, before=before, diff=d, shapes=shapes)
    data = text.encode("utf-8")
    write_files(out, lambda f, _companion: f.write(data))
    return ViewResult(out, op_count(before) if before is not None else None, op_count(after), fusions)


__all__ = ["ViewError", "ViewResult", "load_graph", "view"]
