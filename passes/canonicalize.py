"""`canonicalize`: one spelling per formula, so that each fusion needs one pattern per family.

Before::

    %s: float32[B,H,T,T] = Div(%scores, 8.0)
    %r: float32[B,T,1]   = Div(1.0, Sqrt(%ms))
    %n: float32[B,T,D]   = Mul(%x, %r)
    %q: float32[B,T,D]   = Pow(%n, 2.0)

After::

    %s: float32[B,H,T,T] = Mul(%scores, 0.125)
    %n: float32[B,T,D]   = Div(%x, Sqrt(%ms))
    %q: float32[B,T,D]   = Mul(%n, %n)

After tinygrad's `symbolic_simple` and onnxscript's pre-optimization rewrites: `RULES` is a
short table of local rewrites, each a function ``(node, graph) -> replacement value or
None`` whose comment says how exact it is. The pass sweeps the nodes in order, trying the
table on each, until a sweep changes nothing. A rewrite keeps the output's dtype and shape
(and symbolic contents), and graph outputs keep their names; nodes it leaves dead go with
it. Constant subexpressions are folded first (by `fold-constants` itself), so that a
constant the graph computes (``Sqrt(64.0)``, a static dim's `Shape`) is one to the rules,
and a later run, after the cleanup has folded it, finds the same forms; nodes still on
constants only (of parameters, or too big to fold) are left alone.

Constants are read only when they are small and not checkpoint parameters, decided from
the declared type (`tgraph.passes.constants`), so a lazy weight is never read.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tgraph.ir import DType, Graph, Node, Value

from .base import Pass, register_pass
from .constants import scalar_const, small_const
from .fold_constants import FoldConstants
from .rewrite import builder_at, can_replace, is_output, replace_value

F16, BF16, F32, F64 = DType.float16, DType.bfloat16, DType.float32, DType.float64
PLAIN_FLOATS = frozenset({F16, BF16, F32, F64})
#: float dtype -> the float dtypes that hold every one of its values exactly
LOSSLESS: Dict[DType, frozenset] = {F16: frozenset({F32, F64}), BF16: frozenset({F32, F64}), F32: frozenset({F64}),
                                    F64: frozenset()}
MAX_SWEEPS = 64


# ------------------------------------------------------------------ helpers
def _is(v: Optional[Value], number: float) -> bool:
    c = scalar_const(v, params=True)
    return c is not None and c == number


def _is_const(v: Optional[Value]) -> bool:
    return v is not None and v.const is not None


def _make(v: Optional[Value], op: str) -> Optional[Node]:
    """The producer of `v` if it is a standard `op` node with one output."""
    n = v.producer if v is not None else None
    return n if n is not None and n.op == op and n.domain == "" and len(n.outputs) == 1 else None


def _private(graph: Graph, v: Value) -> bool:
    """`v` has one use and is no graph output: rewriting its consumer frees its producer."""
    return len(v.uses) == 1 and not is_output(graph, v)


def _perm(node: Node) -> Optional[List[int]]:
    rank = node.inputs[0].type.rank
    perm = node.attrs.get("perm")
    if rank is None:
        return None
    return list(range(rank))[::-1] if perm is None else [int(p) for p in perm]


# ------------------------------------------------------------------ the rules
def div_by_constant(node: Node, graph: Graph) -> Optional[Value]:
    """Div(x, c) -> Mul(x, 1/c); in float16/bfloat16 only when 1/c is exact there (powers of two)."""
    if node.op != "Div":
        return None
    x, c = node.inputs
    value = scalar_const(c, params=False)
    if value is None or x.dtype not in PLAIN_FLOATS or value == 0 or not math.isfinite(value):
        return None
    inverse = np.asarray(1.0 / value).astype(c.dtype.numpy)
    if not np.isfinite(inverse) or (c.dtype in (F16, BF16) and float(inverse) != 1.0 / value):
        return None
    b = builder_at(graph, node)
    return b.op("Mul", x, b.const(inverse.reshape(c.type.shape), hint="canon"))


def mul_by_reciprocal(node: Node, graph: Graph) -> Optional[Value]:
    """Mul(x, Reciprocal(y)) and Mul(x, Div(1, y)) (either order) -> Div(x, y)."""
    if node.op != "Mul" or not node.outputs[0].dtype.is_float:
        return None
    for x, r in (node.inputs, node.inputs[::-1]):
        rec, one_div = _make(r, "Reciprocal"), _make(r, "Div")
        y = rec.inputs[0] if rec is not None else \
            one_div.inputs[1] if one_div is not None and _is(one_div.inputs[0], 1.0) else None
        if y is not None and _private(graph, r):
            return builder_at(graph, node).op("Div", x, y)
    return None


def one_over(node: Node, graph: Graph) -> Optional[Value]:
    """Div(1, y) -> Reciprocal(y), unless a Mul takes it whole (`mul_by_reciprocal` makes a Div)."""
    if node.op != "Div" or not node.outputs[0].dtype.is_float or not _is(node.inputs[0], 1.0):
        return None
    out = node.outputs[0]
    if _private(graph, out) and out.uses[0][0].op == "Mul" and out.uses[0][0].domain == "":
        return None
    return builder_at(graph, node).op("Reciprocal", node.inputs[1])


def small_powers(node: Node, graph: Graph) -> Optional[Value]:
    """Pow(x, 2) -> Mul(x, x); Pow(x, 0.5) -> Sqrt(x); Pow(x, 1) -> x. (Pow(x, 3) stays.)"""
    if node.op != "Pow":
        return None
    x, e = node.inputs
    p = scalar_const(e, params=True)
    if p == 1.0:
        return x
    if p == 2.0:
        return builder_at(graph, node).op("Mul", x, x)
    if p == 0.5 and x.dtype.is_float:
        return builder_at(graph, node).op("Sqrt", x)
    return None


def negation(node: Node, graph: Graph) -> Optional[Value]:
    """Mul(x, -1), Mul(-1, x) and Sub(0, x) -> Neg(x)."""
    if node.op not in ("Mul", "Sub") or not node.outputs[0].dtype.is_signed:
        return None
    a, b = node.inputs
    if node.op == "Mul":
        x = a if _is(b, -1.0) and not _is_const(a) else b if _is(a, -1.0) and not _is_const(b) else None
    else:
        x = b if _is(a, 0.0) and not _is_const(b) else None
    return None if x is None else builder_at(graph, node).op("Neg", x)


def identity_element(node: Node, graph: Graph) -> Optional[Value]:
    """Mul(x, 1), Mul(1, x) -> x; Add(x, 0), Add(0, x), Sub(x, 0) -> x."""
    neutral = {"Mul": 1.0, "Add": 0.0, "Sub": 0.0}.get(node.op)
    if neutral is None:
        return None
    a, b = node.inputs
    if _is(b, neutral) and not _is_const(a):
        return a
    if node.op != "Sub" and _is(a, neutral) and not _is_const(b):
        return b
    return None


def constant_right(node: Node, graph: Graph) -> Optional[Value]:
    """Mul(c, x) -> Mul(x, c), Add(c, x) -> Add(x, c) when only c is a constant (reads no data)."""
    if node.op not in ("Mul", "Add"):
        return None
    a, b = node.inputs
    if not _is_const(a) or _is_const(b):
        return None
    return builder_at(graph, node).op(node.op, b, a)


def merge_scalars(node: Node, graph: Graph) -> Optional[Value]:
    """Mul(Mul(x, a), b) -> Mul(x, a·b), Add(Add(x, a), b) -> Add(x, a+b); float32/64 only."""
    if node.op not in ("Mul", "Add") or node.outputs[0].dtype not in (F32, F64):
        return None
    inner, b = node.inputs
    a = inner.producer.inputs[1] if _make(inner, node.op) is not None else None
    x = inner.producer.inputs[0] if a is not None else None
    av, bv = small_const(a, params=False), small_const(b, params=False)
    if av is None or bv is None or _is_const(x) or not _private(graph, inner):
        return None
    merged = (np.multiply if node.op == "Mul" else np.add)(av, bv).astype(node.outputs[0].dtype.numpy)
    bld = builder_at(graph, node)
    return bld.op(node.op, x, bld.const(merged, hint="canon"))


def cast_chain(node: Node, graph: Graph) -> Optional[Value]:
    """Cast(x, to=dtype(x)) -> x; Cast(Cast(x, A), B) -> x when B = dtype(x) and A holds it
    exactly, -> Cast(x, B) when A holds both dtype(x) and B exactly."""
    if node.op != "Cast":
        return None
    x, to = node.inputs[0], DType.of(node.attrs["to"])
    if x.dtype == to:
        return x
    inner = _make(x, "Cast")
    if inner is None or inner.attrs.get("saturate") is not None or node.attrs.get("saturate") is not None:
        return None
    src, mid = inner.inputs[0], x.dtype
    if src.dtype not in PLAIN_FLOATS or to not in PLAIN_FLOATS or mid not in LOSSLESS[src.dtype]:
        return None
    if to == src.dtype:
        return src
    if mid in LOSSLESS[to]:
        return builder_at(graph, node).op("Cast", src, to=to)
    return None


def transpose_chain(node: Node, graph: Graph) -> Optional[Value]:
    """Transpose(Transpose(x, p1), p2) -> Transpose(x, p1[p2]) (inner used only here); identity perm -> x."""
    if node.op != "Transpose":
        return None
    p2 = _perm(node)
    if p2 is None:
        return None
    if p2 == list(range(len(p2))):
        return node.inputs[0]
    inner = _make(node.inputs[0], "Transpose")
    p1 = _perm(inner) if inner is not None else None
    if p1 is None or not _private(graph, inner.outputs[0]):
        return None
    composed = [p1[i] for i in p2]
    if composed == list(range(len(composed))):
        return inner.inputs[0]
    return builder_at(graph, node).op("Transpose", inner.inputs[0], perm=composed)


def folded_heads_kt(node: Node, graph: Graph) -> Optional[Value]:
    """torch dynamo's Kᵀ, Reshape(Transpose(Reshape(K[B,H,T,D], [B*H,T,D]), [0,2,1]), [B,H,D,T])
    -> Transpose(K, [0,1,3,2]); shapes checked as fuse-attention's `_flat_transposed` does."""
    if node.op != "Reshape":
        return None
    kt = node.outputs[0]
    tr = _make(node.inputs[0], "Transpose")
    r1 = _make(tr.inputs[0], "Reshape") if tr is not None else None
    if r1 is None or _perm(tr) != [0, 2, 1] or not _private(graph, tr.outputs[0]) \
            or not _private(graph, r1.outputs[0]):
        return None
    k = r1.inputs[0]
    if k.type.rank != 4 or r1.outputs[0].type.rank != 3 or kt.type.rank != 4:
        return None
    (b, h, t, d), (_, t1, d1), (b2, h2, d2, t2) = k.shape, r1.outputs[0].shape, kt.shape
    if None in (b, h, t, d) or (t1, d1) != (t, d) or (b2, h2, d2, t2) != (b, h, d, t):
        return None
    return builder_at(graph, node).op("Transpose", k, perm=[0, 1, 3, 2])


def slice_unit_steps(node: Node, graph: Graph) -> Optional[Value]:
    """Slice(x, starts, ends, axes, steps=[1, ...]) -> Slice(x, starts, ends, axes)."""
    if node.op != "Slice" or len(node.inputs) != 5 or node.inputs[4] is None:
        return None
    steps = small_const(node.inputs[4], 64, params=False)
    if steps is None or steps.dtype.kind not in "iu" or not np.all(steps == 1):
        return None
    ins = list(node.inputs[:4])
    while ins and ins[-1] is None:
        ins.pop()
    return builder_at(graph, node).op("Slice", *ins)


Rule = Callable[[Node, Graph], Optional[Value]]

#: (name, rule), tried in this order on each node; the first that returns a value wins.
RULES: List[Tuple[str, Rule]] = [
    ("div-by-constant", div_by_constant),    # ≤1 ulp in fp32/64 (1/c rounds); exact in fp16/bf16 (only exact 1/c)
    ("mul-by-reciprocal", mul_by_reciprocal),  # ≤1 ulp: Div rounds once where x·(1/y) rounds twice
    ("one-over", one_over),                  # exact: Reciprocal(y) is 1/y
    ("small-powers", small_powers),          # x·x exact; Sqrt correctly rounded, powf ≤1 ulp (and ±0, -inf differ)
    ("negation", negation),                  # exact (Neg(+0) is -0 where 0 - 0 is +0)
    ("identity-element", identity_element),  # exact (but for -0 + 0, which is +0)
    ("constant-right", constant_right),      # exact: Add and Mul commute
    ("merge-scalars", merge_scalars),        # reassociates, fp32/64 only: Mul ≤2 ulp, Add ≤1 ulp of the largest term
    ("cast-chain", cast_chain),              # exact: the middle dtype holds the values exactly
    ("transpose-chain", transpose_chain),    # exact: a permutation of a permutation
    ("folded-heads-kt", folded_heads_kt),    # exact: the same permutation of K's elements
    ("slice-unit-steps", slice_unit_steps),  # exact: steps default to 1
]


# ------------------------------------------------------------------ the pass
def _drop_dead(graph: Graph, nodes: Sequence[Optional[Node]]) -> None:
    """Remove `nodes` whose outputs nothing uses, then producers that only fed them."""
    stack = [n for n in nodes if n is not None]
    while stack:
        n = stack.pop()
        if n.graph is not graph or any(o.uses or is_output(graph, o) for o in n.outputs):
            continue
        feeders = [v.producer for v in n.inputs if v is not None and v.producer is not None]
        graph.remove_node(n)
        stack.extend(feeders)


def _drop_new_constants(graph: Graph, count_before: int) -> None:
    """Remove the unused constants added since the graph had `count_before` (dicts keep order)."""
    for name in [n for n in list(graph.constants)[count_before:] if not graph.constants[n].uses]:
        del graph.constants[name]
        graph.names.release(name)


def _acceptable(graph: Graph, old: Value, new: Value) -> bool:
    """`new` may stand for `old`: same type and symbolic contents, and graph output names kept."""
    return new.type == old.type and (old.sym is None or new.sym == old.sym) and can_replace(graph, old, new)


def _rewrite(graph: Graph, node: Node, rule: Rule) -> bool:
    old = node.outputs[0]
    constants = len(graph.constants)
    new = rule(node, graph)
    if new is None or new is old:
        return False
    if not _acceptable(graph, old, new):      # undo what the rule built (its node is unused)
        if new.producer is not None and not new.uses:
            _drop_dead(graph, [new.producer])
        _drop_new_constants(graph, constants)
        return False
    replace_value(graph, old, new)
    _drop_dead(graph, [node])
    return True


@register_pass
class Canonicalize(Pass):
    """Bring equivalent spellings (Div by a constant, Pow(x, 2), Cast/Transpose chains...) to one form."""

    name = "canonicalize"

    def run(self, graph: Graph) -> Dict[str, int]:
        counts = {"folded": FoldConstants().run(graph)["folded"], **{name: 0 for name, _ in RULES}}
        for _ in range(MAX_SWEEPS):
            changed = False
            for node in list(graph.nodes):
                if node.graph is not graph or node.domain != "" or len(node.outputs) != 1 \
                        or all(_is_const(v) for v in node.inputs if v is not None):
                    continue
                for name, rule in RULES:
                    if _rewrite(graph, node, rule):
                        counts[name] += 1
                        changed = True
                        break
            if not changed:
                break
        return counts
