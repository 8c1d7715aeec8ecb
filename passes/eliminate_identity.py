"""`eliminate-identity`: remove nodes that return their input unchanged.

Before::

    %t: float32[4,4] = Transpose(%x) {perm=[0, 1]}
    %c: float32[4,4] = Cast(%t) {to=float32}
    %r: float32[4,4] = Reshape(%c, %shape)        # %shape = [4,4]
    %y: float32[4,4] = Relu(%r)

After::

    %y: float32[4,4] = Relu(%x)

A node is an identity when its rule below says so; its uses then read the input
directly. A rule may rely on declared shapes (Reshape/Expand to the input's own shape,
known dims only), which the verifier keeps consistent with inference. If the output is
a graph output, the input takes over its name, unless the input is a graph input,
constant or another output (then the node stays, so output names never change).
One forward sweep also removes chains (Identity of Identity).
"""
from __future__ import annotations

from typing import Callable, Dict

from tgraph.ir import DType, Graph, Node

from .base import Pass, register_pass
from .rewrite import can_replace, replace_value


def _same_known_shape(node: Node) -> bool:
    src, out = node.inputs[0].type, node.outputs[0].type
    return src.shape is not None and None not in src.shape and src == out


def _identity_perm(node: Node) -> bool:
    rank = node.inputs[0].type.rank
    perm = node.attrs.get("perm")
    if rank is None:
        return False
    return list(perm) == list(range(rank)) if perm is not None else rank <= 1


# op -> "this node returns its first input unchanged"
IDENTITY_RULES: Dict[str, Callable[[Node], bool]] = {
    "Identity": lambda n: True,
    "Cast": lambda n: DType.of(n.attrs["to"]) == n.inputs[0].dtype,       # to the same dtype
    "Transpose": _identity_perm,                                          # perm = 0..rank-1
    "Reshape": _same_known_shape,                                         # to its own shape
    "Expand": _same_known_shape,                                          # broadcast that adds nothing
    "Concat": lambda n: len(n.inputs) == 1,                               # of one tensor
}


@register_pass
class EliminateIdentity(Pass):
    """Forward the input of no-op nodes (Identity, same-dtype Cast, identity Transpose/Reshape...)."""

    name = "eliminate-identity"

    def run(self, graph: Graph) -> Dict[str, int]:
        removed = 0
        for node in list(graph.nodes):
            rule = IDENTITY_RULES.get(node.op) if not node.domain else None
            if rule is None or len(node.outputs) != 1 or node.inputs[0] is None or not rule(node):
                continue
            src, out = node.inputs[0], node.outputs[0]
            if not can_replace(graph, out, src):
                continue
            replace_value(graph, out, src)
            graph.remove_node(node)
            removed += 1
        return {"removed": removed}
