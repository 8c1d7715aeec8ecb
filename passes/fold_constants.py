"""`fold-constants`: evaluate nodes whose inputs are all known.

Before::

    graph main(%x: float32[batch,8], %y: float32[2,3]) {
      const %k: float32[3,2] = [0.,1.,2.,3.,4.,5.]
      %kt: float32[2,3] = Transpose(%k) {perm=[1, 0]}
      %n: int64[1] = Shape(%x) {start=1}             # the dim is static: [8]
      %s: float32[2,3] = Add(%y, %kt)
      return %s, %n
    }

After::

    graph main(%x: float32[batch,8], %y: float32[2,3]) {
      const %k: float32[3,2] = [0.,1.,2.,3.,4.,5.]   # unused now: dce removes it
      const %kt: float32[2,3] = [0.,2.,4.,1.,3.,5.]
      const %n: int64[1] = [8]
      %s: float32[2,3] = Add(%y, %kt)
      return %s, %n
    }

A node folds when every input is a constant (it is run through the op table's kernel
with `tgraph.ir.evaluate.run_node`, which also checks the result against the node's
declared type) or when its output's symbolic contents (`Value.sym`, e.g. ``Shape`` of a
statically known dim) are all integers. The constant takes the output's name, so graph
outputs keep their names. Skipped: results over `max_elements` (folding would duplicate
weights), nodes reading parameters (unless `fold_params`: a parameter is a named
checkpoint tensor and must stay one), and nodes whose kernel fails or disagrees with
the declared type (left for the runtime to report). One sweep in topological order
folds whole constant subgraphs, so a second run finds nothing.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from tgraph.ir import Graph, Node, TensorType, Value
from tgraph.ir.evaluate import run_node

from .base import Pass, register_pass


@register_pass
class FoldConstants(Pass):
    """Replace nodes computable at compile time by constants."""

    name = "fold-constants"
    max_elements: int = 1 << 20
    fold_params: bool = False

    def __post_init__(self):
        self.skipped: List[str] = []   # why nodes with known inputs were left alone (for debugging)

    def _too_big(self, node: Node) -> bool:
        for v in node.outputs:
            shape = v.type.shape
            if shape is not None and all(isinstance(d, int) for d in shape) and math.prod(shape) > self.max_elements:
                return True
        return False

    def _from_sym(self, node: Node) -> Optional[Sequence[np.ndarray]]:
        if len(node.outputs) != 1:
            return None
        v = node.outputs[0]
        sym, t = getattr(v, "sym", None), v.type
        if sym is None or not t.dtype.is_int or not t.is_static:
            return None
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in sym):
            return None
        if len(sym) != math.prod(t.shape):
            return None
        return [np.array(sym, dtype=t.dtype.numpy).reshape(t.shape)]

    def _evaluate(self, node: Node) -> Optional[Sequence[np.ndarray]]:
        ins = [v for v in node.inputs if v is not None]
        if not all(v.const is not None and (self.fold_params or not v.is_param) for v in ins):
            return self._from_sym(node)
        if self._too_big(node):
            self.skipped.append(f"{node.name}: larger than {self.max_elements} elements")
            return None
        try:
            results = run_node(node, [None if v is None else v.const for v in node.inputs])
        except Exception as e:  # the runtime would fail the same way; do not fail the compile
            self.skipped.append(f"{node.name}: {type(e).__name__}: {e}")
            return None
        if any(r.size > self.max_elements for r in results):
            self.skipped.append(f"{node.name}: larger than {self.max_elements} elements")
            return None
        return results

    def run(self, graph: Graph) -> Dict[str, int]:
        self.skipped = []
        folded = 0
        for node in list(graph.nodes):
            arrays = self._evaluate(node)
            if arrays is None:
                continue
            for old, array in zip(node.outputs, arrays):
                array = np.array(array, copy=True, order="C")   # never alias another constant's buffer
                new = Value(old.name, TensorType.of_array(array), const=array)
                graph.constants[old.name] = new
                graph.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove_node(node)
            folded += 1
        return {"folded": folded}
