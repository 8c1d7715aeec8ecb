"""onnxruntime-specific fusions (-O3): rewrites whose result only onnxruntime runs well.

-O2 produces standard ONNX ops that every runtime understands; the passes here trade
that portability for speed on onnxruntime, so each one joins -O3 only where
`bench/compare_anchor.py` measured it faster on onnxruntime CPU (the numbers are in
each pass's docstring). Passes that did not help on CPU stay registered by name, for
pipelines that target other providers, but not in a level.

Measured and left out of -O3: the skip norms (no faster on CPU; see `FuseSkipLayerNorm`);
BiasGelu/FastGelu, which onnxruntime's own CPU optimizer already forms from -O2's
Add + Gelu (its optimized GPT-2 graph holds 12 FastGelu); MultiHeadAttention and
GroupQueryAttention are not written yet (GroupQueryAttention has no fp32 CUDA kernel).

* `fuse-skip-layer-norm`: ``LayerNormalization(a + b)`` -> ``com.microsoft.SkipLayerNormalization``
  (and the RMSNorm twin, ``SkipSimplifiedLayerNormalization``). onnxruntime's own
  SkipLayerNormFusion leaves the residual Add alone when its sum is also read by the next
  residual connection, i.e. in every pre-LN block; the contrib op returns that sum as a
  second output, so the fusion applies there too. A constant bias added to one side
  (the projection's bias) moves into the op's `bias` input.
* `fuse-packed-qkv`: sibling MatMuls that read one activation through constant weights
  (Q, K and V projections) -> one MatMul on the concatenated weights, then Split: one
  bigger GEMM instead of three small ones (standard ops only).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tgraph.ir import Builder, Graph, Node, Value
from tgraph.ir.contrib import DOMAIN
from tgraph.ir.lazy import concatenate

from .base import Pass, register_pass
from .pattern import Match, OpBuilder, Or, Pattern, RewritePass, Rule, Var
from .rewrite import builder_at, is_output, replace_match


def _const_vector(v: Optional[Value], size, dtype) -> bool:
    return (v is not None and v.const is not None and v.const.ndim == 1 and v.type.dtype == dtype
            and v.const.shape[0] == size)


# ------------------------------------------------------------------------------ skip norms
def _vector(v: Value) -> bool:
    return v.const is not None and v.type.rank == 1


class SkipNormRule(Rule):
    """``norm(Add(a, b))`` -> the com.microsoft skip norm that also returns ``a + b``;
    an ``Add(x, bias)`` with a constant vector on either side of the sum (the projection's
    bias) moves into the op's `bias` input. One instance per norm op."""

    #: the `_name` of the residual Add, whose sum the op's second output replaces
    also_replaces = ("sum",)
    #: every norm is a candidate: say why one whose input is no Add stays as it is
    near_miss_nodes = 1
    FUSED = {"LayerNormalization": ("skip-layer-norm", "SkipLayerNormalization"),
             "RMSNormalization": ("skip-rms-norm", "SkipSimplifiedLayerNormalization")}

    def __init__(self, norm: str):
        self.norm = norm
        self.name, self.fused = self.FUSED[norm]

    def pattern(self, op: OpBuilder) -> Pattern:
        x, skip = Var("x"), Var("skip")
        bias = Var("bias", predicate=_vector, describe="a constant vector")
        total = Or(op.Add(op.Add(x, bias), skip, _name="sum"), op.Add(x, skip, _name="sum"))
        norm, gamma = getattr(op, self.norm), Var("gamma")
        if self.norm == "LayerNormalization":               # with or without beta
            return Or(norm(total, gamma, Var("beta")), norm(total, gamma))
        return norm(total, gamma)

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        total, attrs = m.sum, m.root.attrs
        rank, hidden, dtype = total.type.rank, total.shape[-1] if total.shape else None, total.type.dtype
        if rank not in (2, 3):
            return f"input rank {rank} (onnxruntime's kernel takes 2-D or 3-D)"
        if attrs.get("axis", -1) % rank != rank - 1:
            return "not normalised over the last axis"
        if attrs.get("stash_type", 1) != 1:
            return "stash_type is not fp32"
        if m.x.type != total.type or m.skip.type != total.type:
            return f"Add broadcasts ({m.x.type} + {m.skip.type})"
        for what in ("gamma", "beta", "bias"):
            v = m.get(what)
            if v is not None and not _const_vector(v, hidden, dtype):
                return f"{what} {v.name} is not a constant vector over the last axis"
        return None

    def rewrite(self, b: Builder, m: Match):
        ins = [m.x, m.skip, m.gamma] + ([m.get("beta")] if self.norm == "LayerNormalization" else [])
        if m.get("bias") is not None:
            ins.append(m.bias)
        while ins[-1] is None:
            ins.pop()
        eps = float(m.root.attrs.get("epsilon", 1e-5))     # always explicit: the contrib default is 1e-12
        y, total = b.op(self.fused, *ins, domain=DOMAIN, epsilon=eps)
        return y, total


@register_pass
class FuseSkipLayerNorm(RewritePass):
    """Residual Add + LayerNorm/RMSNorm -> com.microsoft.Skip(Simplified)LayerNormalization.

    Before:  %h = Add(%x, Add(MatMul(%a, %w), %bias)); %y = LayerNormalization(%h, %g, %b){epsilon=1e-5}
    After:   %y, %h = com.microsoft.SkipLayerNormalization(%x, MatMul(%a, %w), %g, %b, %bias){epsilon=1e-5}

    Not in -O3: on onnxruntime 1.31 CPU (2 threads, medians of 25 alternating runs) it was
    no faster than -O2: GPT-2 124M 28.8 -> 31.1 ms at seq 1, 116.0 -> 119.6 ms at seq 128;
    the small LLaMA 8.2 -> 7.8 ms and 56.5 -> 55.7 ms. Kept by name for providers whose
    LayerNorm is not already memory-bound-cheap (e.g. CUDA).
    """

    name = "fuse-skip-layer-norm"

    def rules(self):
        return [SkipNormRule("LayerNormalization"), SkipNormRule("RMSNormalization")]


# ------------------------------------------------------------------------------ packed QKV
def _projection(graph: Graph, mm: Node) -> Optional[Tuple[Value, Optional[Node], Optional[Value]]]:
    """(weight, bias Add, bias) of `MatMul(x, W)` [+ b] with W a 2-D constant read only here."""
    if mm.op != "MatMul" or mm.domain != "":
        return None
    w = mm.inputs[1]
    if w.const is None or w.const.ndim != 2 or len(w.uses) != 1 or mm.inputs[0].type.rank is None:
        return None
    out = mm.outputs[0]
    if len(out.uses) == 1 and not is_output(graph, out):
        add = out.uses[0][0]
        if add.op == "Add" and add.domain == "":
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if _const_vector(other, w.const.shape[1], out.type.dtype) and add.outputs[0].type == out.type:
                return w, add, other
    return w, None, None


def _groups(graph: Graph) -> List[List[Node]]:
    by_input: Dict[int, List[Node]] = {}
    for node in graph.nodes:
        if _projection(graph, node) is not None:
            by_input.setdefault(id(node.inputs[0]), []).append(node)
    return [g for g in by_input.values() if len(g) > 1]


def _packed_constant(graph: Graph, parts: List[Value], array: np.ndarray, kind: str) -> Value:
    """The concatenation of `parts`; a parameter if they all are, named after them
    (``h.0.attn.q.weight`` + ``h.0.attn.k.weight`` -> ``h.0.attn.q_k.weight``)."""
    if not all(p.is_param for p in parts):
        return graph.add_constant(array, hint=f"packed_{kind}")
    paths = [p.name.split(".") for p in parts]
    common = 0
    while all(len(q) > common + 1 and q[common] == paths[0][common] for q in paths):
        common += 1
    distinct = ["_".join(q[common:-1]) or q[-1] for q in paths]
    name = ".".join(paths[0][:common] + ["_".join(distinct), paths[0][-1]])
    try:
        return graph.add_constant(array, hint=name, is_param=True, exact_name=True)
    except ValueError:                    # taken: a fresh (sanitised) name instead
        return graph.add_constant(array, hint=name, is_param=True)


@register_pass
class FusePackedQKV(Pass):
    """Sibling projections of one activation -> one MatMul on concatenated weights + Split.

    Not a `Rule`: the MatMuls are siblings (one input, several users), not a tree rooted
    at one node. The pass still changes nodes only the way rules do, building the packed
    MatMul with `builder_at` and swapping the projections out with `replace_match`; it
    also adds the packed weights to the graph's constants and drops the unpacked ones.

    Before:  %q = Add(MatMul(%x, %wq), %bq); %k = Add(MatMul(%x, %wk), %bk); %v = MatMul(%x, %wv) ...
    After:   %q, %k, %v = Split(Add(MatMul(%x, Concat(%wq, %wk, %wv)), Concat(%bq, %bk, %bv))){axis=-1}

    Biases are packed only when every sibling has one. In -O3: on onnxruntime 1.31 CPU
    (2 threads, medians of 25 alternating runs) GPT-2 124M went 28.8 -> 25.1 ms at seq 1 and
    the small LLaMA (Q/K/V and gate/up packed) 8.2 -> 7.1 ms; at seq 128 both were unchanged
    within noise (116.0 -> 115.5 ms, 56.5 -> 58.3 ms).
    """

    name = "fuse-packed-qkv"
    max_group: int = 3

    def run(self, graph: Graph) -> Dict[str, int]:
        packed = 0
        for group in _groups(graph):
            group = group[: self.max_group] if self.max_group > 0 else group
            projs = [_projection(graph, mm) for mm in group]
            weights = [p[0].const for p in projs]
            if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
                continue
            x = group[0].inputs[0]
            b = builder_at(graph, group[0])             # the first sibling: every user comes later
            b.scope = b.scope[:-1]                      # the projections' module (h.0.attn for h.0.attn.q)
            w = _packed_constant(graph, [p[0] for p in projs], concatenate(weights, axis=1), "weight")
            y = b.op("MatMul", x, w)
            with_bias = all(p[1] is not None for p in projs)
            if with_bias:
                bias = concatenate([p[2].const for p in projs])
                y = b.op("Add", y, _packed_constant(graph, [p[2] for p in projs], bias, "bias"))
            sizes = [int(w_.shape[1]) for w_ in weights]
            parts = b.op("Split", y, axis=y.type.rank - 1, split=sizes)
            olds, nodes = [], []
            for mm, (_, add, _) in zip(group, projs):
                olds.append(add.outputs[0] if with_bias else mm.outputs[0])
                nodes += [add, mm] if with_bias else [mm]
            replace_match(graph, olds, list(parts), nodes, who=self.name)
            packed += 1
        graph.remove_unused_constants()
        return {"packed": packed}


ORT_FUSIONS: Sequence[str] = ("fuse-skip-layer-norm", "fuse-packed-qkv")
