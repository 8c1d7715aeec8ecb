"""Builder: creates nodes through the op table, inferring output types eagerly.

Every node created here has its attributes resolved against the op's schema and its
output types inferred at once, so a shape mistake fails at the line that made it. The
builder keeps a scope stack (the DSL pushes module paths onto it) that becomes the
node's name hint and its `meta["scope"]`, and an optional `locate` callback that names
the user's source line in error messages.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

from ..errors import ShapeError
from .core import Graph, Node, Value
from .opdefs import get_op
from .types import DType, TensorType


class Builder:
    def __init__(self, graph: Optional[Graph] = None, locate: Optional[Callable[[], str]] = None):
        self.graph = graph if graph is not None else Graph()
        self.scope: List[str] = []
        self.locate = locate
        # Where new nodes go: appended (tracing), or before an anchor node (passes rewriting
        # a match in place, so topological order holds without re-sorting).
        self.insert_before: Optional[Node] = None

    # ---- values -------------------------------------------------------------
    def const(self, value: Any, dtype=None, hint: str = "const") -> Value:
        array = np.asarray(value) if dtype is None else np.asarray(value, dtype=DType.of(dtype).numpy)
        return self.graph.add_constant(array, hint=hint)

    def where(self) -> str:
        parts = []
        if self.scope:
            parts.append(".".join(self.scope))
        if self.locate is not None:
            loc = self.locate()
            if loc:
                parts.append(loc)
        return " at ".join(parts)

    # ---- nodes ----------------------------------------------------------------
    def op(self, op: str, *inputs: Optional[Value], domain: str = "", hint: Optional[str] = None,
           **attrs: Any) -> Union[Value, tuple]:
        """Add `op(inputs, attrs)`; returns its output value (a tuple for multi-output ops)."""
        opdef = get_op(op, domain)
        try:
            lo, hi = opdef.inputs
            if not lo <= len(inputs) <= hi:
                raise ShapeError(f"expects {lo}..{hi} inputs, got {len(inputs)}")
            attrs = opdef.resolve_attrs(attrs)
            types = [None if v is None else v.type for v in inputs]
            consts = known_contents(inputs)
            out_types = opdef.infer(types, attrs, consts)
            sym = opdef.sym(consts, attrs, types) if opdef.sym is not None and len(out_types) == 1 else None
        except ShapeError as e:
            where = self.where()
            msg = str(e)
            prefix = f"{opdef.qualified}: " if not msg.startswith(opdef.name) else ""
            raise ShapeError(f"{prefix}{msg}" + (f" (in {where})" if where else "")) from None
        scope = ".".join(self.scope)
        base = hint or (f"{scope}.{op.lower()}" if scope else op.lower())
        outs = [self.graph.new_value(t, base) for t in out_types]
        if sym is not None:
            outs[0].sym = tuple(sym)
        meta = {"scope": scope} if scope else {}
        node = Node(op, inputs, outs, attrs, domain=domain, name=base, meta=meta)
        if self.insert_before is not None:
            self.graph.insert_before(self.insert_before, node)
        else:
            self.graph.append(node)
        return outs[0] if len(outs) == 1 else tuple(outs)


def known_contents(inputs: Sequence[Optional[Value]]) -> list:
    """Per input: its constant array, else its symbolic contents (a tuple of dims), else None."""
    return [None if v is None else v.const if v.const is not None else v.sym for v in inputs]


def infer_node(node: Node) -> List[TensorType]:
    """Re-run type inference on an existing node (used by `verify`)."""
    opdef = get_op(node.op, node.domain)
    types = [None if v is None else v.type for v in node.inputs]
    return opdef.infer(types, opdef.resolve_attrs(node.attrs), known_contents(node.inputs))
