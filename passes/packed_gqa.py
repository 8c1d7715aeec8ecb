"""GroupQueryAttention's packed-QKV input: the projection feeds the op whole, no Split.

`fuse-packed-qkv` turns the Q, K and V projections into one MatMul whose result a Split
cuts into the op's query, key and value. onnxruntime's GroupQueryAttention also takes the
three packed in `query` ([B, S, (Hq + 2 Hkv) D], key and value left out): what
onnxruntime-genai's builder writes. The op then reads the packed rows directly, so the
Split (a copy per layer and step) disappears.

Before:  %q, %k, %v = Split(%qkv){axis=-1}; %y, %pk, %pv = GroupQueryAttention(%q, %k, %v, %past_k, ...)
After:   %y, %pk, %pv = GroupQueryAttention(%qkv, , , %past_k, ...)

Not in a level: the generation builds (`tgraph.export_dir.generation_pipeline`) add it.
"""
from __future__ import annotations

from typing import Dict

from tgraph.ir import Graph, Node
from tgraph.ir.contrib import DOMAIN

from .base import Pass, register_pass
from .rewrite import is_output


def _packed_source(graph: Graph, gqa: Node):
    """The Split whose three outputs are exactly `gqa`'s query, key, value (read nowhere
    else), cutting its input's last axis in that order; else None."""
    q, k, v = gqa.inputs[:3]
    if q is None or k is None or v is None:
        return None
    split = q.producer
    if split is None or split.op != "Split" or split.domain != "" or list(split.outputs) != [q, k, v]:
        return None
    packed = split.inputs[0]
    rank = packed.type.rank
    if rank != 3 or split.attrs.get("axis", 0) % rank != rank - 1:
        return None
    if any(is_output(graph, x) or len(x.uses) != 1 or x.uses[0][0] is not gqa for x in (q, k, v)):
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None and split.inputs[1].const is None:
        return None                                   # sizes known only at run time
    return split


@register_pass
class FusePackedGQA(Pass):
    """Split(qkv) -> GroupQueryAttention(q, k, v) becomes GroupQueryAttention(qkv, , )."""

    name = "fuse-packed-gqa"

    def run(self, graph: Graph) -> Dict[str, int]:
        packed = 0
        for node in list(graph.nodes):
            if node.graph is not graph or node.op != "GroupQueryAttention" or node.domain != DOMAIN:
                continue
            split = _packed_source(graph, node)
            if split is None:
                continue
            node.replace_input_with(0, split.inputs[0])
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            graph.remove_node(split)
            packed += 1
        if packed:
            graph.remove_unused_constants()
        return {"packed": packed}
