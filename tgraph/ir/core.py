"""Graph, Node and Value: the in-memory IR.

Design (after onnx-ir): a `Value` knows its producer and its uses; a `Node`'s inputs
are an immutable tuple that only changes through methods that keep use lists right;
`replace_all_uses_with` refuses to rewire graph outputs unless asked to. Constants and
parameters are producer-less values carrying a NumPy array (`Value.const`), or for
checkpoint weights a `LazyTensor` (`lazy.py`) with the same shape/dtype/nbytes that is
read only when written; `np.asarray(v.const)` gives the numbers either way.

Nodes are kept in a list in topological order. Builders append; passes insert with
`insert_before`/`insert_after` and remove with `remove_node`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .lazy import is_lazy
from .names import NameAuthority
from .types import TensorType


class Value:
    """An SSA value: a graph input, a constant/parameter, or a node output."""

    __slots__ = ("name", "type", "producer", "index", "const", "is_param", "sym", "_uses", "__weakref__")

    def __init__(self, name: str, type: TensorType, const: Optional[np.ndarray] = None, is_param: bool = False):
        self.name = name
        self.type = type
        self.producer: Optional[Node] = None
        self.index = 0
        self.const = const
        self.is_param = is_param
        # For small int64 shape tensors computed from symbolic shapes (Shape, Gather, Concat ...):
        # the contents as a tuple of dims, so Reshape/Expand/Slice keep "seq" instead of "?".
        self.sym: Optional[Tuple] = None
        self._uses: List[Tuple[Node, int]] = []

    @property
    def uses(self) -> Tuple[Tuple["Node", int], ...]:
        """(node, input index) pairs that consume this value."""
        return tuple(self._uses)

    @property
    def users(self) -> List["Node"]:
        seen: Dict[int, Node] = {}
        for node, _ in self._uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def dtype(self):
        return self.type.dtype

    @property
    def shape(self):
        return self.type.shape

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operator application. `domain` is "" for standard ONNX ops."""

    __slots__ = ("op", "domain", "_inputs", "outputs", "attrs", "name", "meta", "graph")

    def __init__(self, op: str, inputs: Sequence[Optional[Value]], outputs: Sequence[Value],
                 attrs: Optional[Dict[str, Any]] = None, domain: str = "", name: str = "",
                 meta: Optional[Dict[str, Any]] = None):
        self.op = op
        self.domain = domain
        self.attrs: Dict[str, Any] = dict(attrs or {})
        self.name = name
        self.meta: Dict[str, Any] = dict(meta or {})
        self.graph: Optional[Graph] = None
        self._inputs: Tuple[Optional[Value], ...] = tuple(inputs)
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.append((self, i))
        self.outputs: Tuple[Value, ...] = tuple(outputs)
        for i, v in enumerate(self.outputs):
            if v.producer is not None:
                raise ValueError(f"value {v.name} already has a producer")
            v.producer, v.index = self, i

    @property
    def inputs(self) -> Tuple[Optional[Value], ...]:
        return self._inputs

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}.{self.op}" if self.domain else self.op

    def replace_input_with(self, index: int, value: Optional[Value]) -> None:
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.remove((self, index))
        if value is not None:
            value._uses.append((self, index))
        self._inputs = self._inputs[:index] + (value,) + self._inputs[index + 1:]

    def detach(self) -> None:
        """Drop this node's uses of its inputs (before removing it)."""
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.remove((self, i))
        self._inputs = tuple(None for _ in self._inputs)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __repr__(self) -> str:
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self._inputs)
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        return f"{outs} = {self.qualified_op}({ins})"


@dataclass
class Graph:
    """A function: inputs, constants/parameters, nodes in topological order, outputs."""

    name: str = "main"
    inputs: List[Value] = field(default_factory=list)
    outputs: List[Value] = field(default_factory=list)
    nodes: List[Node] = field(default_factory=list)
    constants: Dict[str, Value] = field(default_factory=dict)
    names: NameAuthority = field(default_factory=NameAuthority)
    node_names: NameAuthority = field(default_factory=NameAuthority)
    meta: Dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self.names.claim(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, array: np.ndarray, hint: str = "const", is_param: bool = False,
                     exact_name: bool = False) -> Value:
        """A constant or parameter. Parameters keep their dotted path as their exact name.
        `array` may be a `LazyTensor` (a checkpoint weight not read yet)."""
        array = array if is_lazy(array) else np.asarray(array)
        name = self.names.claim(hint) if exact_name else self.names.fresh(hint)
        v = Value(name, TensorType.of_array(array), const=array, is_param=is_param)
        self.constants[name] = v
        return v

    def new_value(self, type: TensorType, hint: str = "v") -> Value:
        return Value(self.names.fresh(hint), type)

    def _adopt(self, node: Node) -> Node:
        node.graph = self
        node.name = self.node_names.fresh(node.name or node.op.lower())
        return node

    def append(self, node: Node) -> Node:
        self.nodes.append(self._adopt(node))
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        self.nodes.insert(self.nodes.index(anchor), self._adopt(node))
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        self.nodes.insert(self.nodes.index(anchor) + 1, self._adopt(node))
        return node

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are unused (use `replace_all_uses_with` first)."""
        for out in node.outputs:
            if out._uses or out in self.outputs:
                raise ValueError(f"cannot remove node {node.name}: output {out.name} is still used")
        node.detach()
        self.nodes.remove(node)
        node.graph = None
        self.node_names.release(node.name)

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove a set of nodes whose outputs are used only inside the set."""
        doomed = list(nodes)
        ids = {id(n) for n in doomed}
        for n in doomed:
            for out in n.outputs:
                if out in self.outputs or any(id(u) not in ids for u, _ in out._uses):
                    raise ValueError(f"cannot remove node {n.name}: output {out.name} is used outside")
        for n in doomed:
            n.detach()
        self.nodes = [n for n in self.nodes if id(n) not in ids]
        for n in doomed:
            n.graph = None
            self.node_names.release(n.name)

    def replace_all_uses_with(self, old: Value, new: Value, replace_graph_outputs: bool = False) -> None:
        if old is new:
            return
        if old in self.outputs:
            if not replace_graph_outputs:
                raise ValueError(f"{old.name} is a graph output; pass replace_graph_outputs=True")
            self.outputs = [new if o is old else o for o in self.outputs]
        for node, i in list(old._uses):
            node.replace_input_with(i, new)

    def remove_unused_constants(self) -> int:
        dead = [n for n, v in self.constants.items() if not v._uses and v not in self.outputs]
        for n in dead:
            del self.constants[n]
            self.names.release(n)
        return len(dead)

    # ---- queries ----------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for n in self.nodes:
            yield from n.outputs

    def op_histogram(self) -> Dict[str, int]:
        hist: Dict[str, int] = {}
        for n in self.nodes:
            hist[n.qualified_op] = hist.get(n.qualified_op, 0) + 1
        return dict(sorted(hist.items()))

    def parameter_count(self) -> int:
        return int(sum(v.const.size for v in self.constants.values() if v.is_param))

    def parameters(self) -> Dict[str, Value]:
        return {n: v for n, v in self.constants.items() if v.is_param}

    def copy(self) -> "Graph":
        """A structural copy; constant arrays are shared (they are never mutated in place)."""
        g = Graph(name=self.name, meta=dict(self.meta))
        vmap: Dict[int, Value] = {}

        def clone(v: Value) -> Value:
            c = Value(v.name, v.type, const=v.const, is_param=v.is_param)
            c.sym = v.sym
            vmap[id(v)] = c
            g.names.claim(v.name)
            return c

        g.inputs = [clone(v) for v in self.inputs]
        g.constants = {n: clone(v) for n, v in self.constants.items()}
        for node in self.nodes:
            outs = [clone(o) for o in node.outputs]
            ins = [None if v is None else vmap[id(v)] for v in node.inputs]
            g.append(Node(node.op, ins, outs, dict(node.attrs), node.domain, node.name, dict(node.meta)))
        g.outputs = [vmap[id(v)] for v in self.outputs]
        g.names._counters = dict(self.names._counters)
        return g

    def to_networkx(self):
        """A `networkx.MultiDiGraph`: one vertex per node, graph input and constant."""
        import networkx as nx

        G = nx.MultiDiGraph(name=self.name)
        for v in self.inputs:
            G.add_node(v.name, kind="input", type=str(v.type))
        for v in self.constants.values():
            G.add_node(v.name, kind="param" if v.is_param else "const", type=str(v.type))
        for node in self.nodes:
            G.add_node(node.name, kind="node", op=node.qualified_op)
            for i, v in enumerate(node.inputs):
                if v is None:
                    continue
                src = v.producer.name if v.producer is not None else v.name
                G.add_edge(src, node.name, value=v.name, index=i)
        for i, v in enumerate(self.outputs):
            key = f"output:{v.name}"
            G.add_node(key, kind="output", type=str(v.type))
            G.add_edge(v.producer.name if v.producer is not None else v.name, key, value=v.name, index=i)
        return G

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)

    def verify(self) -> None:
        from .verify import verify

        verify(self)
