"""Scaled dot-product attention -> Attention-23, and the `causal-mask` pass.

The attention matcher is procedural: the subgraph between ``Q @ Kᵀ`` and ``softmax(..) @ V``
comes in too many optional layers (scale before or after the matmul, Mul or Div, an
additive bias, a boolean `Where` mask, tgraph's `CausalMask`, fp32 softmax between
casts, the guard that zeroes fully masked rows, grouped heads as a 5-D broadcast) for a
table of patterns. It peels those layers
off one at a time, walking back from the softmax, and refuses (with the reason) anything
it does not understand, or a match whose intermediates are used elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from tgraph.ir import Builder, Graph, Node, Value

from .base import register_pass
from .pattern import Match, NoMatch, OpPat, RewritePass, Rule, escapes

MASK_FILL_LIMIT = -1e4       # a Where fill at or below this is a mask (contrib ops use -10000)


def _producer(v: Optional[Value], op: str) -> Optional[Node]:
    return v.producer if v is not None and v.producer is not None and v.producer.op == op \
        and v.producer.domain == "" else None


def _scalar_const(v: Optional[Value]) -> Optional[float]:
    if v is None or v.const is None or v.const.size != 1:     # (a weight is never read to find out)
        return None
    return float(np.asarray(v.const, np.float64).reshape(-1)[0])


def _swap_last_perm(rank: int) -> List[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _is_zero(v: Optional[Value]) -> bool:
    c = _scalar_const(v)
    return c is not None and c == 0.0


def _shape_contents(v: Optional[Value], depth: int = 4) -> Optional[Tuple]:
    """The contents of a 1-D shape tensor as dims, looking through what exporters wrap around it:
    ``Reshape(s, [-1])`` and torch's ``Where(Equal(s, -1), 1, s)`` (which selects `s` whenever
    every entry is a size, i.e. non-negative)."""
    if v is None or depth < 0:
        return None
    if v.const is not None:
        return tuple(int(x) for x in np.asarray(v.const).reshape(-1)) if v.const.dtype.kind in "iu" else None
    if v.sym is not None:
        return tuple(v.sym)
    n = v.producer
    if n is None or n.domain != "":
        return None
    if n.op == "Reshape" and v.type.rank == 1:
        return _shape_contents(n.inputs[0], depth - 1)
    if n.op == "Where" and _producer(n.inputs[0], "Equal") is not None:
        s = _shape_contents(n.inputs[2], depth - 1)
        if s is not None and all(isinstance(d, str) or (isinstance(d, int) and d >= 0) for d in s):
            return s
    return None


def _with_dead_feeders(graph: Graph, nodes: List[Node], keep: Sequence[Optional[Value]]) -> List[Node]:
    """`nodes` plus the nodes that only feed them (the shape arithmetic of the Reshapes and
    Expands being replaced, e.g. Shape(repeated K) -> Slice -> Concat): they die with the
    match, so their reading a match intermediate is not a use "elsewhere". Producers of
    `keep` (the replacement's inputs) stay."""
    inside = {id(n) for n in nodes}
    kept = {id(v.producer) for v in keep if v is not None and v.producer is not None}
    outputs = {id(v) for v in graph.outputs}
    out, frontier = list(nodes), list(nodes)
    while frontier:
        node = frontier.pop()
        for v in node.inputs:
            p = v.producer if v is not None else None
            if p is None or id(p) in inside or id(p) in kept or any(id(o) in outputs for o in p.outputs):
                continue
            if all(id(u) in inside for o in p.outputs for u, _ in o.uses):
                inside.add(id(p))
                out.append(p)
                frontier.append(p)
    if len(out) > len(nodes):             # a feeder may be shared by two feeders: look again
        return _with_dead_feeders(graph, out, keep)
    return out


def _flat_transposed(kt: Value) -> Optional[Tuple[Value, List[Node]]]:
    """torch's dynamo export writes Kᵀ with the heads folded into the batch:
    Reshape(Transpose(Reshape(K, [B*H, T, D]), [0, 2, 1]), [B, H, D, T]) -> (K, the three nodes)."""
    r2 = _producer(kt, "Reshape")
    tr = _producer(r2.inputs[0], "Transpose") if r2 is not None else None
    r1 = _producer(tr.inputs[0], "Reshape") if tr is not None else None
    if r1 is None or tr.attrs.get("perm") != [0, 2, 1]:
        return None
    k = r1.inputs[0]
    if k.type.rank != 4 or r1.outputs[0].type.rank != 3 or kt.type.rank != 4:
        return None
    (b, h, t, d), (_, t1, d1), (b2, h2, d2, t2) = k.shape, r1.outputs[0].shape, kt.shape
    if None in (b, h, t, d) or (t1, d1) != (t, d) or (b2, h2, d2, t2) != (b, h, d, t):
        return None
    return k, [r2, tr, r1]


def _unrepeat(x: Value) -> Optional[Tuple[Value, int, List[Node]]]:
    """HF's repeat_kv: Reshape(Expand(Unsqueeze(x0, [2]), [B, Hkv, G, T, D]), [B, Hkv*G, T, D]) ->
    (x0, G, the three nodes), or None when `x` is not written that way (provably)."""
    rs = _producer(x, "Reshape")
    ex = _producer(rs.inputs[0], "Expand") if rs is not None else None
    un = _producer(ex.inputs[0], "Unsqueeze") if ex is not None else None
    if un is None or un.attrs.get("axes") not in ([2], [-3]):
        return None
    x0 = un.inputs[0]
    if x0.type.rank != 4 or x.type.rank != 4:
        return None
    (b, hk, t, d), (b2, h, t2, d2) = x0.shape, x.shape
    if not (isinstance(hk, int) and isinstance(h, int) and hk and h % hk == 0) or (b, t, d) != (b2, t2, d2) \
            or None in (b, t, d):
        return None
    group = h // hk
    target = _shape_contents(ex.inputs[1])
    # Expand broadcasts size-1 dims only: every axis but the new one must keep its size.
    if target is None or len(target) != 5 or target[2] != group or \
            any(want not in (have, 1) for want, have in zip((target[0],) + target[1:2] + target[3:], (b, hk, t, d))):
        return None
    return x0, group, [rs, ex, un]


def _masked_row_guard(n: Optional[Node]) -> Optional[Tuple[Value, List[Node]]]:
    """``Where(Equal(ReduceMax(s, [-1]), fill), 0, p)`` (`tgraph.dsl.layers.zero_fully_masked_rows`):
    the rows whose every key is masked get zero probabilities, which Attention-23 does itself.
    Returns (the scores s the guard reads, its nodes) or None."""
    if n is None or n.domain != "" or n.op != "Where" or not _is_zero(n.inputs[1]):
        return None
    eq = _producer(n.inputs[0], "Equal")
    if eq is None:
        return None
    rmax, fill = eq.inputs
    red = _producer(rmax, "ReduceMax")
    if red is None:
        red, fill = _producer(fill, "ReduceMax"), rmax
    c = _scalar_const(fill)
    rank = red.inputs[0].type.rank if red is not None else None
    if red is None or c is None or c > MASK_FILL_LIMIT or rank is None or red.attrs.get("keepdims", 1) != 1 \
            or [a % rank for a in (red.attrs.get("axes") or [])] != [rank - 1]:
        return None
    return red.inputs[0], [n, eq, red]


@dataclass
class AttentionMatch:
    root: Node
    q: Value
    k: Value                       # [B, Hkv, Tk, D] once permuted by k_perm (None: as is)
    v: Value
    scale: float = 1.0
    causal: bool = False
    window: int = 0                # tgraph.CausalMask's window (0: none): never `is_causal`, an explicit mask
    keep: Optional[Value] = None   # bool, True = attend
    bias: Optional[Value] = None   # additive float
    k_perm: Optional[List[int]] = None
    grouped: bool = False
    nan_to_zero: bool = False      # probabilities passed through Where(IsNaN(p), 0, p)
    unrepeat: Optional[Tuple] = None   # (k0, v0, nodes): K/V before HF's repeat_kv
    nodes: List[Node] = field(default_factory=list)


class AttentionRule(Rule):
    """softmax(Q Kᵀ · s + bias, masks) V  ->  Attention(Q, K, V, mask){scale=s, is_causal}."""

    name = "attention"

    def patterns(self, op) -> List[OpPat]:
        return []

    # ---- matching ---------------------------------------------------------------------------
    def match(self, graph: Graph, node: Node, patterns: Sequence[OpPat], reasons: List[str]):
        if node.domain != "" or node.op not in ("MatMul", "Reshape"):
            return None
        am = self._match(graph, node)
        if am is None:
            return None
        base = am.nodes
        if am.unrepeat is not None:     # feed the un-repeated K/V, unless the repeated ones are used elsewhere
            k0, v0, extra = am.unrepeat
            nodes = _with_dead_feeders(graph, base + extra, [am.q, k0, v0, am.keep, am.bias])
            if escapes(graph, Match(node, {}, nodes)) is None:
                am.k, am.v, base = k0, v0, base + extra
        am.nodes = _with_dead_feeders(graph, base, [am.q, am.k, am.v, am.keep, am.bias])
        m = Match(node, {"attention": am}, am.nodes)
        reason = escapes(graph, m) or self._check(am)
        if reason:
            raise NoMatch(reason)
        return m, 0

    def _match(self, graph: Graph, root: Node) -> Optional[AttentionMatch]:
        nodes = [root]
        grouped = False
        pv = root
        if root.op == "Reshape":                       # (B, Hkv, G, Tq, D) -> (B, H, Tq, D)
            pv = _producer(root.inputs[0], "MatMul")
            if pv is None or root.inputs[0].type.rank != 5:
                return None
            grouped = True
            nodes.append(pv)
        probs, v = pv.inputs
        # softmax, possibly computed in fp32 between casts, possibly with NaN rows zeroed
        # (torch's SDPA export: Where(IsNaN(p), 0, p) for rows whose keys are all masked)
        # and possibly with fully masked rows zeroed (tgraph's guard, see `_masked_row_guard`)
        nan_to_zero, guarded = False, None
        while True:
            n = probs.producer
            if n is not None and n.domain == "" and n.op == "Cast" and n.inputs[0].type.dtype.is_float \
                    and probs.type.dtype.is_float:
                nodes.append(n)
                probs = n.inputs[0]
            elif n is not None and n.domain == "" and n.op == "Where" and not nan_to_zero \
                    and _is_zero(n.inputs[1]) and _producer(n.inputs[0], "IsNaN") is not None \
                    and n.inputs[0].producer.inputs[0] is n.inputs[2]:
                nodes += [n, n.inputs[0].producer]
                probs, nan_to_zero = n.inputs[2], True
            elif guarded is None and _masked_row_guard(n) is not None:
                guarded, guard_nodes = _masked_row_guard(n)     # Attention-23 zeroes those rows itself
                nodes += guard_nodes
                probs = n.inputs[2]
            else:
                break
        sm = _producer(probs, "Softmax")
        if sm is None:
            return None                                 # not attention-shaped: no near miss to report
        rank = probs.type.rank
        if rank is None or sm.attrs.get("axis", -1) % rank != rank - 1:
            raise NoMatch(f"{sm.name}: softmax is not over the last axis")
        nodes.append(sm)
        s = sm.inputs[0]
        chain = [s]
        while _producer(s, "Cast") is not None and s.producer.inputs[0].type.dtype.is_float:
            nodes.append(s.producer)
            s = s.producer.inputs[0]
            chain.append(s)
        if guarded is not None and not any(guarded is c for c in chain):
            raise NoMatch(f"{root.name}: the fully-masked-row guard reads {guarded.name}, not the softmax's scores")
        am = AttentionMatch(root, None, None, v, grouped=grouped, nan_to_zero=nan_to_zero)
        # masking layers, in any order
        while True:
            n = s.producer
            if n is None:
                raise NoMatch(f"scores {s.name} are not computed from a matmul")
            if n.domain == "tgraph" and n.op == "CausalMask" and not am.causal:
                am.causal, am.window = True, int(n.attrs.get("window", 0) or 0)
            elif n.op == "Where" and am.keep is None and (_scalar_const(n.inputs[2]) or 0) <= MASK_FILL_LIMIT:
                am.keep = n.inputs[0]
            elif n.op == "Add" and am.bias is None and _scalar_const(n.inputs[1]) is None \
                    and _scalar_const(n.inputs[0]) is None:
                # which side carries the scores: the one that leads back to a MatMul
                lhs_scores = self._leads_to_matmul(n.inputs[0])
                am.bias = n.inputs[1] if lhs_scores else n.inputs[0]
                nodes.append(n)
                s = n.inputs[0] if lhs_scores else n.inputs[1]
                continue
            else:
                break
            nodes.append(n)
            s = n.inputs[0] if n.op != "Where" else n.inputs[1]
        # scale after the matmul
        while s.producer is not None and s.producer.op in ("Mul", "Div"):
            n = s.producer
            c = _scalar_const(n.inputs[1])
            other = n.inputs[0]
            if c is None and n.op == "Mul":
                c, other = _scalar_const(n.inputs[0]), n.inputs[1]
            if c is None or c == 0:
                break
            am.scale *= c if n.op == "Mul" else 1.0 / c
            nodes.append(n)
            s = other
        qk = _producer(s, "MatMul")
        if qk is None:
            raise NoMatch(f"scores {s.name} are not a MatMul of queries and keys")
        nodes.append(qk)
        q, kt = qk.inputs
        q, kt = self._strip_scale(q, am, nodes), self._strip_scale(kt, am, nodes)
        # K = Kᵀ with its last two axes swapped: compose that with a Transpose producing Kᵀ
        # (GPT-2 and BERT write Kᵀ = Transpose(K [B, T, H, D], perm=[0, 2, 3, 1])).
        rank = kt.type.rank or 0
        tr = _producer(kt, "Transpose")
        if tr is not None and tr.attrs.get("perm") is not None:
            perm = list(tr.attrs["perm"])
            nodes.append(tr)
            k = tr.inputs[0]
            composed = perm[:-2] + [perm[-1], perm[-2]]
            am.k_perm = None if composed == list(range(rank)) else composed
        elif _flat_transposed(kt) is not None:
            k, flat_nodes = _flat_transposed(kt)
            nodes += flat_nodes
        else:
            k, am.k_perm = kt, _swap_last_perm(rank)
        if not grouped and am.k_perm is None:          # HF repeat_kv: feed the un-repeated K and V
            rk, rv = _unrepeat(k), _unrepeat(v)
            if rk is not None and rv is not None and rk[1] == rv[1]:
                am.unrepeat = (rk[0], rv[0], rk[2] + rv[2])
        if grouped:                                     # undo the 5-D views of q, k and v
            rq = _producer(q, "Reshape")
            uk, uv = _producer(k, "Unsqueeze"), _producer(v, "Unsqueeze")
            if am.k_perm is not None or rq is None or uk is None or uv is None or uk.attrs.get("axes") != [2] \
                    or uv.attrs.get("axes") != [2]:
                raise NoMatch("grouped attention without the (B, Hkv, G, T, D) query view and unsqueezed K/V")
            nodes += [rq, uk, uv]
            q, k, v = rq.inputs[0], uk.inputs[0], uv.inputs[0]
        am.q, am.k, am.v = q, k, v
        am.nodes = nodes
        return am

    @staticmethod
    def _leads_to_matmul(v: Value, depth: int = 6) -> bool:
        for _ in range(depth):
            n = v.producer
            if n is None:
                return False
            if n.op == "MatMul":
                return True
            if n.op in ("Mul", "Div", "Where") or (n.domain == "tgraph" and n.op == "CausalMask"):
                v = n.inputs[1] if n.op == "Where" else n.inputs[0]
                continue
            return False
        return False

    @staticmethod
    def _strip_scale(x: Value, am: AttentionMatch, nodes: List[Node]) -> Value:
        """q·s or Kᵀ·s before the matmul (the scale folded into one operand)."""
        n = x.producer
        if n is not None and n.op in ("Mul", "Div") and n.domain == "":
            c = _scalar_const(n.inputs[1])
            other = n.inputs[0]
            if c is None and n.op == "Mul":
                c, other = _scalar_const(n.inputs[0]), n.inputs[1]
            if c is not None and c != 0:
                am.scale *= c if n.op == "Mul" else 1.0 / c
                nodes.append(n)
                return other
        return x

    def _check(self, am: AttentionMatch) -> Optional[str]:
        q, k, v = am.q, am.k, am.v
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.type.rank != 4:
                return f"{name} {t.name} is {t.type}, not [batch, heads, seq, head_dim]"
        if am.k_perm is not None and sorted(am.k_perm) != [0, 1, 2, 3]:
            return f"keys are transposed by {am.k_perm}, not a permutation of rank 4"
        k_shape = k.shape if am.k_perm is None else tuple(k.shape[p] for p in am.k_perm)
        if not q.type.dtype.is_float:
            return "attention on a non-float tensor"
        if len({q.type.dtype, k.type.dtype, v.type.dtype}) != 1:
            return f"query, key and value dtypes differ ({q.type.dtype.name}, {k.type.dtype.name}, {v.type.dtype.name})"
        if am.root.outputs[0].type.dtype != q.type.dtype:
            return f"attention computes in {q.type.dtype.name} but its result is {am.root.outputs[0].type.dtype.name}"
        hq, hk = q.shape[1], k_shape[1]
        if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
            return f"query heads {hq} are not a multiple of key/value heads {hk}"
        for extra in (am.keep, am.bias):
            if extra is not None and extra.type.rank not in (None, 2, 3, 4) and not am.grouped:
                return f"mask {extra.name} has rank {extra.type.rank}"
        if am.grouped:
            for extra in (am.keep, am.bias):
                if extra is not None and (extra.type.rank != 5 or extra.shape[1] != 1 or extra.shape[2] != 1):
                    return f"grouped attention mask {extra.name} is {extra.type}, not [B, 1, 1, Tq|1, Tk]"
        if am.bias is not None and am.bias.type.dtype != q.type.dtype:
            return f"bias {am.bias.name} has dtype {am.bias.type.dtype.name}"
        return None

    # ---- rewriting ----------------------------------------------------------------------------
    def rewrite(self, b: Builder, m: Match):
        am: AttentionMatch = m.attention
        k = am.k
        if am.k_perm is not None:
            k = b.op("Transpose", k, perm=list(am.k_perm))
        keep, bias = am.keep, am.bias
        if am.grouped:                                   # [B, 1, 1, Tq|1, Tk] -> [B, 1, Tq|1, Tk]
            keep = b.op("Squeeze", keep, axes=[1]) if keep is not None else None
            bias = b.op("Squeeze", bias, axes=[1]) if bias is not None else None
        # is_causal is upper-left aligned; where Tq may differ from Tk (a KV cache's past), the
        # end-aligned causal mask is written out and joins the padding mask.
        square = am.q.shape[2] is not None and am.q.shape[2] == k.shape[2]
        if am.causal and (not square or am.window):
            causal = causal_keep(b, b.op("Shape", am.q, start=2, end=3), b.op("Shape", k, start=2, end=3), am.window)
            keep = causal if keep is None else b.op("And", keep, causal)          # (B, 1, Tq, Tk)
        mask = None
        if bias is not None and keep is not None:
            # -inf, not finfo.min: Attention-23 zeroes a row only where every key's bias is -inf
            # (onnxruntime also where it is finfo.min; the spec averages those rows instead).
            neg_inf = b.const(np.array(-np.inf, am.q.type.dtype.numpy), hint="mask_fill")
            mask = b.op("Where", keep, bias, neg_inf)    # Where, not Add: no -inf + -inf overflow
        else:
            mask = bias if bias is not None else keep
        ins = [am.q, k, am.v] + ([mask] if mask is not None else [])
        y = b.op("Attention", *ins, is_causal=int(am.causal and square and not am.window), scale=float(am.scale))
        if am.nan_to_zero:      # a row of NaN probabilities gives a NaN output row: zero that instead
            zero = b.const(np.array(0, y.type.dtype.numpy), hint="zero")
            y = b.op("Where", b.op("IsNaN", y), zero, y)
        return y


@register_pass
class FuseAttention(RewritePass):
    """Scaled dot-product attention -> Attention-23 (grouped heads, masks and causality kept).

    Before:  %s = Mul(MatMul(%q, Transpose(%k){perm=[0,1,3,2]}), 0.125)
             %m = Where(%keep, tgraph.CausalMask(%s), -3.4e38)
             %p = Where(Equal(ReduceMax(%m){axes=[-1]}, -3.4e38), 0, Softmax(%m)); %y = MatMul(%p, %v)
    After:   %y = Attention(%q, %k, %v, %keep){is_causal=1, scale=0.125}

    The second Where (`tgraph.dsl.layers.zero_fully_masked_rows`) gives a query whose keys
    are all masked a zero row, which is what Attention-23 (and onnxruntime) compute for a
    row whose mask is all False or -inf; so fusing never changes a padded position. A mask
    that joins a bias is written with -inf, not finfo.min, for the same reason.
    """

    name = "fuse-attention"

    def rules(self):
        return [AttentionRule(), MergedHeadsRule()]


def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


class MergedHeadsRule(Rule):
    """Attention between a head split and a head merge -> 3-D Attention on [B, T, H*D].

    Attention-23 takes [batch, seq, hidden] inputs with `q_num_heads`/`kv_num_heads` and
    returns [batch, seq, hidden], so the four Reshape+Transpose pairs around every attention
    block go away (onnxruntime CPU, BERT-base shapes at seq 512: 8.7 -> 7.8 ms per block).
    A RotaryEmbedding between the split and the attention moves to the 3-D side too (the op
    takes [B, T, H*D] with `num_heads`). Blocks whose 4-D K/V are also used elsewhere (a KV
    cache's present outputs) stay 4-D.
    """

    name = "attention-merged-heads"

    def patterns(self, op) -> List[OpPat]:
        return []

    def match(self, graph: Graph, node: Node, patterns, reasons):
        merge = _producer(node.inputs[0], "Transpose") if node.op == "Reshape" and node.domain == "" else None
        att = _producer(merge.inputs[0], "Attention") if merge is not None else None
        if att is None or merge.attrs.get("perm") != [0, 2, 1, 3] or att.inputs[0].type.rank != 4:
            return None
        b, heads, tq, dv = att.outputs[0].shape
        out = node.outputs[0].shape
        if not _static(heads, dv) or out is None or list(out) != [b, tq, heads * dv]:
            raise NoMatch(f"{node.name}: merges attention heads into {node.outputs[0].type}, not [B, T, H*D]")
        nodes, sources, rotaries = [node, merge, att], [], []
        for what, v in zip(("query", "key", "value"), att.inputs[:3]):
            rotary = _producer(v, "RotaryEmbedding")              # rotate in [B, T, H*D] instead
            if rotary is not None and len(rotary.inputs) == 3 and what != "value":
                nodes.append(rotary)
                v = rotary.inputs[0]
            rotaries.append(rotary)
            split = _producer(v, "Transpose")
            view = _producer(split.inputs[0], "Reshape") if split is not None else None
            if view is None or split.attrs.get("perm") != [0, 2, 1, 3]:
                raise NoMatch(f"{what} {v.name} is not a head split of a [B, T, H*D] tensor")
            x, (vb, vt, vh, vd) = view.inputs[0], view.outputs[0].shape
            if x.type.rank != 3 or not _static(vh, vd) or list(x.shape) != [vb, vt, vh * vd]:
                raise NoMatch(f"{what} view {view.outputs[0].type} does not split {x.type} into heads")
            nodes += [split, view]
            sources.append(x)
        m = Match(node, {"sources": sources, "att": att, "q_heads": heads, "rotaries": rotaries,
                         "kv_heads": att.inputs[1].shape[1]}, nodes)
        reason = escapes(graph, m)
        if reason:
            raise NoMatch(reason)
        return m, 0

    def rewrite(self, b: Builder, m: Match):
        heads = (int(m.q_heads), int(m.kv_heads), int(m.kv_heads))
        sources = [x if rot is None else
                   b.op("RotaryEmbedding", x, *rot.inputs[1:], **dict(rot.attrs, num_heads=n))
                   for x, rot, n in zip(m.sources, m.rotaries, heads)]
        attrs = dict(m.att.attrs, q_num_heads=heads[0], kv_num_heads=heads[1])
        return b.op("Attention", *sources, *m.att.inputs[3:], **attrs)


# ------------------------------------------------------------------------------ causal-mask
@register_pass
class CausalMaskPass(RewritePass):
    """Make the causal masks that fusion did not absorb explicit.

    `tgraph.CausalMask` carries causality as a property of the scores; `fuse-attention`
    turns it into `is_causal`. Where attention stays unfused, this pass writes the mask as
    standard ops, aligned to the end of the key axis (so it follows a KV cache's past length):

    Before:  %m = tgraph.CausalMask(%s)
    After:   %tq = Shape(%s){start=-2,end=-1}; %tk = Shape(%s){start=-1}
             %keep = Not(Greater(Range(0, %tk), Unsqueeze(Range(%tk - %tq, %tk), [-1])))
             %m = Where(%keep, %s, finfo.min)
    """

    name = "causal-mask"

    def rules(self):
        return [ExplicitCausalRule()]


class ExplicitCausalRule(Rule):
    name = "explicit-causal-mask"

    def patterns(self, op) -> List[OpPat]:
        return []

    def match(self, graph, node, patterns, reasons):
        if node.domain == "tgraph" and node.op == "CausalMask":
            return Match(node, {"scores": node.inputs[0], "window": int(node.attrs.get("window", 0) or 0)}, [node]), 0
        return None

    def rewrite(self, b: Builder, m: Match):
        s = m.scores
        rank = s.type.rank
        tq = b.op("Shape", s, start=rank - 2, end=rank - 1)
        tk = b.op("Shape", s, start=rank - 1)
        keep = causal_keep(b, tq, tk, m.window)                                            # (Tq, Tk)
        lowest = b.const(np.array(np.finfo(s.type.dtype.numpy).min, s.type.dtype.numpy), hint="mask_fill")
        return b.op("Where", keep, s, lowest)


def causal_keep(b: Builder, tq: Value, tk: Value, window: int = 0) -> Value:
    """bool (Tq, Tk), True where key j <= i + (Tk - Tq): causality aligned to the end of the key
    axis, so the new queries after a KV cache's past see the whole past. tq, tk: int64 [1].
    With `window` W > 0 also j > i + (Tk - Tq) - W (a local layer's last W keys)."""
    tq0, tk0 = b.op("Squeeze", tq, axes=[0]), b.op("Squeeze", tk, axes=[0])
    zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    rows = b.op("Unsqueeze", b.op("Range", b.op("Sub", tk0, tq0), tk0, one), axes=[1])   # (Tq, 1)
    cols = b.op("Range", zero, tk0, one)                                                  # (Tk,)
    keep = b.op("Not", b.op("Greater", cols, rows))                                      # (Tq, Tk)
    if window > 0:
        first = b.op("Sub", rows, b.const(np.array(window - 1, np.int64), hint="window_reach"))
        keep = b.op("And", keep, b.op("Not", b.op("Less", cols, first)))                 # (Tq, Tk)
    return keep
