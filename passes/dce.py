"""`dce`: dead code elimination.

Before::

    %a: float32[4] = Relu(%x)
    %b: float32[4] = Exp(%a)          # nothing uses %b
    const %c: float32[4]              # nothing uses %c
    return %a

After::

    %a: float32[4] = Relu(%x)
    return %a

Mark and sweep: walking the nodes backwards from the graph outputs marks every node
that (transitively) feeds one; the rest go in one `remove_nodes` call, then constants
that nothing uses any more. Graph inputs are the interface and always stay.
"""
from __future__ import annotations

from typing import Dict

from tgraph.ir import Graph

from .base import Pass, register_pass


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes that do not feed a graph output, then unused constants."""

    name = "dce"
    keep_params: bool = False   # keep unused parameters (e.g. to save every checkpoint tensor)

    def run(self, graph: Graph) -> Dict[str, int]:
        live = {id(v) for v in graph.outputs}
        dead = []
        for node in reversed(graph.nodes):
            if any(id(o) in live for o in node.outputs):
                live.update(id(v) for v in node.inputs if v is not None)
            else:
                dead.append(node)
        if dead:
            graph.remove_nodes(dead)
        outputs = {id(v) for v in graph.outputs}
        unused = [name for name, v in graph.constants.items()
                  if not v.uses and id(v) not in outputs and not (self.keep_params and v.is_param)]
        for name in unused:
            del graph.constants[name]
            graph.names.release(name)
        return {"removed_nodes": len(dead), "removed_constants": len(unused)}
