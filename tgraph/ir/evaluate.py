"""A reference interpreter: run the op table's kernels over a graph in node order.

It needs nothing but the IR, so it is the oracle for passes (a graph's values before a
pass must equal its values after), and constant folding evaluates single nodes with the
same `run_node`, so folding and interpretation cannot disagree. Every result is checked
against the node's declared type, which catches kernels and type rules that drift apart.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ShapeError, TgraphError, VerifyError
from .core import Graph, Node, Value
from .lazy import materialize
from .opdefs import get_op
from .types import DType


def kernel_attrs(node: Node) -> Dict[str, Any]:
    """The node's attributes as its kernel takes them: defaults filled, DTypes as NumPy dtypes."""
    attrs = get_op(node.op, node.domain).resolve_attrs(node.attrs)
    return {k: v.numpy if isinstance(v, DType) else v for k, v in attrs.items()}


def _check(v: Value, array: np.ndarray, bindings: Dict[str, int], what: str, error=VerifyError) -> None:
    t = v.type
    if array.dtype != t.dtype.numpy:
        raise error(f"{what}: got {array.dtype}{list(array.shape)}, {v.name} is declared {t}")
    if t.shape is None:
        return
    if len(t.shape) != array.ndim:
        raise error(f"{what}: got rank {array.ndim} {list(array.shape)}, {v.name} is declared {t}")
    for dim, actual in zip(t.shape, array.shape):
        if isinstance(dim, int) and dim != actual:
            raise error(f"{what}: got shape {list(array.shape)}, {v.name} is declared {t}")
        if isinstance(dim, str) and dim.isidentifier():
            bound = bindings.setdefault(dim, actual)
            if bound != actual:
                raise error(f"{what}: dim {dim!r} is {actual} in {v.name} but {bound} elsewhere")


def run_node(node: Node, args: Sequence[Optional[np.ndarray]],
             bindings: Optional[Dict[str, int]] = None) -> Tuple[np.ndarray, ...]:
    """Evaluate one node on concrete inputs; raises VerifyError if a result contradicts its type."""
    kernel = get_op(node.op, node.domain).kernel
    with np.errstate(all="ignore"):
        result = kernel(*args, **kernel_attrs(node))
    results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if len(results) != len(node.outputs):
        raise VerifyError(f"node {node.name} ({node.op}): kernel returned {len(results)} results "
                          f"for {len(node.outputs)} outputs")
    out = tuple(np.asarray(r) for r in results)
    bindings = {} if bindings is None else bindings
    for v, r in zip(node.outputs, out):
        _check(v, r, bindings, f"node {node.name} ({node.qualified_op})")
    return out


def evaluate(graph: Graph, inputs: Mapping[str, Any], *, all_values: bool = False) -> Dict[str, np.ndarray]:
    """Run `graph` on `inputs` (name -> array); returns ``{output name: array}``.

    With `all_values`, every value computed on the way is returned too. Input dtypes must
    match exactly, and a symbolic dim must have one size throughout the run.
    """
    names = {v.name for v in graph.inputs}
    unknown = sorted(set(inputs) - names)
    if unknown:
        raise TgraphError(f"evaluate: unknown input(s) {unknown}; graph inputs: {sorted(names)}")
    env: Dict[int, np.ndarray] = {}
    bindings: Dict[str, int] = {}
    for v in graph.inputs:
        if v.name not in inputs:
            raise TgraphError(f"evaluate: missing input {v.name!r} ({v.type})")
        array = np.asarray(inputs[v.name])
        _check(v, array, bindings, f"input {v.name}", error=ShapeError)
        env[id(v)] = array
    for v in graph.constants.values():
        env[id(v)] = materialize(v.const)       # checkpoint weights are lazy until used
    for node in graph.nodes:
        args = [None if v is None else env[id(v)] for v in node.inputs]
        for v, r in zip(node.outputs, run_node(node, args, bindings)):
            env[id(v)] = r
    if all_values:
        return {v.name: env[id(v)] for v in graph.values()}
    return {v.name: env[id(v)] for v in graph.outputs}
