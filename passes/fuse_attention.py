"""Scaled dot-product attention -> Attention-23, and the `causal-mask` pass.

The attention matcher is procedural: the subgraph between ``Q @ Kᵀ`` and ``softmax(..) @ V``
comes in too many optional layers (scale before or after the matmul, Mul or Div, an
additive bias, a boolean `Where` mask, tgraph's `CausalMask`, fp32 softmax between
casts, grouped heads as a 5-D broadcast) for a table of patterns. It peels those layers
off one at a time, walking back from the softmax, and refuses (with the reason) anything
it does not understand, or a match whose intermediates are used elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from tgraph.ir import Builder, DType, Graph, Node, Value

from .base import register_pass
from .pattern import Match, NoMatch, OpPat, RewritePass, Rule, escapes

MASK_FILL_LIMIT = -1e4       # a Where fill at or below this is a mask (contrib ops use -10000)


def _producer(v: Optional[Value], op: str) -> Optional[Node]:
    return v.producer if v is not None and v.producer is not None and v.producer.op == op \
        and v.producer.domain == "" else None


def _scalar_const(v: Optional[Value]) -> Optional[float]:
    if v is None or v.const is None or v.const.size == 0:
        return None
    flat = np.asarray(v.const, np.float64).reshape(-1)
    return float(flat[0]) if np.all(flat == flat[0]) and (v.const.size == 1 or v.const.ndim == 0) else None


def _swap_last_perm(rank: int) -> List[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


@dataclass
class AttentionMatch:
    root: Node
    q: Value
    k: Value                       # [B, Hkv, Tk, D]; when k_is_transposed, it is Kᵀ [B, Hkv, D, Tk]
    v: Value
    scale: float = 1.0
    causal: bool = False
    keep: Optional[Value] = None   # bool, True = attend
    bias: Optional[Value] = None   # additive float
    k_is_transposed: bool = False
    grouped: bool = False
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
        # softmax, possibly computed in fp32 between casts
        cast_out = _producer(probs, "Cast")
        if cast_out is not None:
            nodes.append(cast_out)
            probs = cast_out.inputs[0]
        sm = _producer(probs, "Softmax")
        if sm is None:
            return None                                 # not attention-shaped: no near miss to report
        rank = probs.type.rank
        if rank is None or sm.attrs.get("axis", -1) % rank != rank - 1:
            raise NoMatch(f"{sm.name}: softmax is not over the last axis")
        nodes.append(sm)
        s = sm.inputs[0]
        cast_in = _producer(s, "Cast")
        if cast_in is not None:
            nodes.append(cast_in)
            s = cast_in.inputs[0]
        am = AttentionMatch(root, None, None, v, grouped=grouped)
        # masking layers, in any order
        while True:
            n = s.producer
            if n is None:
                raise NoMatch(f"scores {s.name} are not computed from a matmul")
            if n.domain == "tgraph" and n.op == "CausalMask" and not am.causal:
                am.causal = True
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
        tr = _producer(kt, "Transpose")
        if tr is not None and tr.attrs.get("perm") == _swap_last_perm(kt.type.rank or 0):
            nodes.append(tr)
            k = tr.inputs[0]
        else:
            k, am.k_is_transposed = kt, True
        if grouped:                                     # undo the 5-D views of q, k and v
            rq = _producer(q, "Reshape")
            uk, uv = _producer(k, "Unsqueeze"), _producer(v, "Unsqueeze")
            if rq is None or uk is None or uv is None or uk.attrs.get("axes") != [2] or uv.attrs.get("axes") != [2]:
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
        if not q.type.dtype.is_float:
            return "attention on a non-float tensor"
        hq, hk = q.shape[1], (k.shape[1])
        if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
            return f"query heads {hq} are not a multiple of key/value heads {hk}"
        if am.causal:
            tq = q.shape[2]
            tk = k.shape[3] if am.k_is_transposed else k.shape[2]
            if tq != tk or tq is None:
                return f"causal with query length {tq} and key length {tk} (not provably equal)"
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
        if am.k_is_transposed:
            k = b.op("Transpose", k, perm=[0, 1, 3, 2])
        keep, bias = am.keep, am.bias
        if am.grouped:                                   # [B, 1, 1, Tq|1, Tk] -> [B, 1, Tq|1, Tk]
            keep = b.op("Squeeze", keep, axes=[1]) if keep is not None else None
            bias = b.op("Squeeze", bias, axes=[1]) if bias is not None else None
        mask = None
        if bias is not None and keep is not None:
            lowest = b.const(np.array(np.finfo(am.q.type.dtype.numpy).min, am.q.type.dtype.numpy), hint="mask_fill")
            mask = b.op("Where", keep, bias, lowest)    # Where, not Add: no -inf + -inf overflow
        else:
            mask = bias if bias is not None else keep
        ins = [am.q, k, am.v] + ([mask] if mask is not None else [])
        return b.op("Attention", *ins, is_causal=int(am.causal), scale=float(am.scale))


@register_pass(level=2)
class FuseAttention(RewritePass):
    """Scaled dot-product attention -> Attention-23 (grouped heads, masks and causality kept).

    Before:  %s = Mul(MatMul(%q, Transpose(%k){perm=[0,1,3,2]}), 0.125)
             %p = Softmax(Where(%keep, tgraph.CausalMask(%s), -3.4e38)); %y = MatMul(%p, %v)
    After:   %y = Attention(%q, %k, %v, %keep){is_causal=1, scale=0.125}
    """

    name = "fuse-attention"

    def rules(self):
        return [AttentionRule()]


# ------------------------------------------------------------------------------ causal-mask
@register_pass(level=2)
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
            return Match(node, {"scores": node.inputs[0]}, [node]), 0
        return None

    def rewrite(self, b: Builder, m: Match):
        s = m.scores
        rank = s.type.rank
        tq = b.op("Shape", s, start=rank - 2, end=rank - 1)
        tk = b.op("Shape", s, start=rank - 1)
        tq0, tk0 = b.op("Squeeze", tq, axes=[0]), b.op("Squeeze", tk, axes=[0])
        zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
        rows = b.op("Unsqueeze", b.op("Range", b.op("Sub", tk0, tq0), tk0, one), axes=[1])   # (Tq, 1)
        cols = b.op("Range", zero, tk0, one)                                                  # (Tk,)
        keep = b.op("Not", b.op("Greater", cols, rows))                                      # (Tq, Tk)
        lowest = b.const(np.array(np.finfo(s.type.dtype.numpy).min, s.type.dtype.numpy), hint="mask_fill")
        return b.op("Where", keep, s, lowest)
