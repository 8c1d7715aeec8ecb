"""Scaled dot-product attention -> Attention-23, and the `causal-mask` pass.

The attention pattern is one expression with optional layers: softmax(Q Kᵀ · s, masks) V,
where the scale may sit on the scores, on Q or on Kᵀ; Kᵀ is a Transpose of K (any perm,
composed with the swap) or arrives pretransposed; the masks (tgraph's `CausalMask`, a
boolean `Where` fill, an additive bias) come in any order; the softmax may run in fp32
between casts and its rows may be guarded (torch SDPA's NaN-to-zero, tgraph's fully
masked rows); K/V may be HF's repeat_kv of fewer heads, or the heads grouped as a 5-D
broadcast. `check` refuses what Attention-23 cannot express, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from tgraph.ir import Builder, DType, Graph, Value

from .base import register_pass
from .constants import scalar_of, small_const
from .pattern import ANY, Match, OpBuilder, Or, Pattern, RewritePass, Rule, Var, optional

MASK_FILL_LIMIT = -1e4       # a Where fill at or below this is a mask (contrib ops use -10000)


def _is_scale(a) -> bool:
    return (scalar_of(a) or 0.0) != 0.0


def _is_mask_fill(a) -> bool:
    c = scalar_of(a)
    return c is not None and c <= MASK_FILL_LIMIT


def _to_float(to) -> bool:
    return DType.of(to).is_float


def _swap_last_perm(rank: int) -> List[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


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
    if n.op == "Where" and n.inputs[0].producer is not None and n.inputs[0].producer.op == "Equal":
        s = _shape_contents(n.inputs[2], depth - 1)
        if s is not None and all(isinstance(d, str) or (isinstance(d, int) and d >= 0) for d in s):
            return s
    return None


# ---------------------------------------------------------------- the pieces of the pattern
def _each(wrap, p: Pattern) -> Pattern:
    """`wrap` around each alternative of `p`: a layer that reads its input twice
    (Where(IsNaN(p), 0, p)) must see one node, which a shared op pattern is and an Or is not."""
    return Or(*(_each(wrap, a) for a in p.alternatives)) if isinstance(p, Or) else wrap(p)


def _any_order(layers: Sequence, inner: Pattern) -> Pattern:
    """`inner` under any subset of `layers` (functions wrapping a pattern), each at most once,
    in any order."""
    def under(rest: Tuple[int, ...]) -> Pattern:
        return Or(inner, *(layers[i](under(tuple(j for j in rest if j != i))) for i in rest))
    return under(tuple(range(len(layers))))


def _scaled(op: OpBuilder, x: Pattern, tag: str) -> Pattern:
    """x · c for a nonzero scalar c (bound as `tag`), or x as it is. Canonicalize writes x / c as
    x · (1/c), except in float16/bfloat16 where 1/c is not exact there: that Div stays a spelling."""
    return Or(op.Mul(x, op.const(name=tag, predicate=_is_scale)),
              op.Div(x, op.const(name=f"{tag}_div", predicate=_is_scale)), x)


def _repeat_kv(op: OpBuilder, x: Pattern, tag: str) -> Pattern:
    """HF's repeat_kv: Reshape(Expand(Unsqueeze(x, [2]), [B, Hkv, G, T, D]), [B, Hkv*G, T, D])."""
    unsqueezed = op.Unsqueeze(x, axes=lambda a: a is not None and list(a) in ([2], [-3]))
    return op.Reshape(op.Expand(unsqueezed, ANY, _name=f"{tag}_expanded"), ANY, _name=f"{tag}_repeated")


def _keys_transposed(op: OpBuilder, grouped: bool) -> Pattern:
    """Kᵀ: a Transpose of K (its perm bound as `k_perm`; canonicalize writes torch dynamo's
    head-folded Kᵀ so), or a pretransposed K."""
    k, perm = Var("k"), Var("k_perm", predicate=lambda p: p is not None)
    if grouped:                                      # (B, Hkv, 1, Tk, D)
        return op.Transpose(op.Unsqueeze(k, axes=[2]), perm=perm)
    return Or(op.Transpose(Or(_repeat_kv(op, k, "k"), k), perm=perm), k)


def _masked(op: OpBuilder, scores: Pattern) -> Pattern:
    """The masking layers, in any order: tgraph's CausalMask, Where(keep, s, fill <= -1e4), and
    s + bias, or (s + bias) + bias2 (T5: the position bias, then the padding mask)."""
    return _any_order([
        lambda s: op.CausalMask(s, _domain="tgraph", _name="causal", window=Var("window")),
        lambda s: op.Where(Var("keep"), s, op.const(predicate=_is_mask_fill)),
        lambda s: optional(lambda t: op.Add(t, Var("bias2")), op.Add(s, Var("bias"))),
    ], scores)


def _probabilities(op: OpBuilder, softmax: Pattern) -> Pattern:
    """The softmax under its optional layers, in any order: a Cast back from fp32, torch SDPA's
    Where(IsNaN(p), 0, p), and tgraph's Where(Equal(ReduceMax(s, [-1]), fill), 0, p) that zeroes
    fully masked rows (`tgraph.dsl.layers.zero_fully_masked_rows`); Attention-23 zeroes those itself."""
    zero = op.const(0.0, predicate=lambda a: a.size == 1)
    row_max = op.ReduceMax(Var("guarded"), axes=Var("guard_axes"), keepdims=Var("guard_keepdims"))
    return _any_order([
        lambda p: op.Cast(p, to=_to_float),
        lambda p: _each(lambda a: op.Where(op.IsNaN(a, _name="nan_to_zero"), zero, a), p),
        lambda p: op.Where(op.Equal(row_max, op.const(predicate=_is_mask_fill)), zero, p),
    ], softmax)


def _attention_pattern(op: OpBuilder, grouped: bool) -> Pattern:
    if grouped:              # heads grouped as a 5-D broadcast: q (B, Hkv, G, Tq, D), k/v (B, Hkv, 1, Tk, D)
        q, v = op.Reshape(Var("q"), ANY), op.Unsqueeze(Var("v"), axes=[2])
    else:
        q, v = Var("q"), Or(_repeat_kv(op, Var("v"), "v"), Var("v"))
    qk = op.MatMul(_scaled(op, q, "scale_q"), _scaled(op, _keys_transposed(op, grouped), "scale_k"))
    scores = _masked(op, _scaled(op, qk, "scale_s"))
    softmax = op.Softmax(optional(lambda s: op.Cast(s, to=_to_float), scores), axis=Var("axis"), _name="probs")
    out = op.MatMul(_probabilities(op, softmax), v)
    return op.Reshape(out, ANY) if grouped else out


# ---------------------------------------------------------------- what a match means
@dataclass
class AttentionMatch:
    """A match in the rewrite's terms."""

    q: Value
    k: Value                       # [B, Hkv, Tk, D] once permuted by k_perm (None: as is)
    v: Value
    scale: float
    causal: bool
    window: int                    # tgraph.CausalMask's window (0: none): never `is_causal`, an explicit mask
    keep: Optional[Value]          # bool, True = attend
    bias: Optional[Value]          # additive float
    bias2: Optional[Value]         # a second addend (T5: the position bias, then the mask)
    k_perm: Optional[List[int]]
    grouped: bool
    nan_to_zero: bool              # probabilities passed through Where(IsNaN(p), 0, p)

    @classmethod
    def of(cls, m: Match) -> "AttentionMatch":
        scale = 1.0
        for tag in ("scale_q", "scale_k", "scale_s"):
            if tag in m.bindings:
                scale *= scalar_of(m.bindings[tag])
            if f"{tag}_div" in m.bindings:
                scale /= scalar_of(m.bindings[f"{tag}_div"])
        k = m.k
        if "k_perm" in m.bindings:          # Kᵀ = Transpose(K, perm): K's own layout is perm with the last two swapped
            perm = list(m.k_perm)
            composed = perm[:-2] + [perm[-1], perm[-2]]
            k_perm = None if composed == list(range(len(perm))) else composed
        else:
            k_perm = _swap_last_perm(k.type.rank or 0)
        causal = m.get("causal") is not None
        return cls(m.q, k, m.v, scale, causal, int(m.get("window") or 0), m.get("keep"), m.get("bias"),
                   m.get("bias2"), k_perm, m.grouped == 1, "nan_to_zero" in m.bindings)


def _refuse_layers(m: Match) -> Optional[str]:
    """Conditions of the matched layers that a pattern cannot say."""
    probs = m.probs
    rank = probs.type.rank
    axis = m.get("axis")
    if rank is None or (-1 if axis is None else axis) % rank != rank - 1:
        return f"{probs.producer.name}: softmax is not over the last axis"
    if "guarded" in m.bindings:
        s = probs.producer.inputs[0]
        scores = [s] + ([s.producer.inputs[0]] if s.producer is not None and s.producer.op == "Cast" else [])
        if not any(m.guarded is c for c in scores):
            return f"the fully-masked-row guard reads {m.guarded.name}, not the softmax's scores"
        axes, keepdims = m.get("guard_axes"), m.get("guard_keepdims")
        if keepdims not in (None, 1) or [a % rank for a in (axes or [])] != [rank - 1]:
            return "the fully-masked-row guard does not take the maximum over the last axis"
    for bias in (m.get("bias"), m.get("bias2")):
        if small_const(bias, 1, params=True) is not None:
            return f"the scores' addend {bias.name} is a scalar, not a mask"
    return _refuse_unrepeat(m)


def _refuse_unrepeat(m: Match) -> Optional[str]:
    """repeat_kv is undone only when both K and V are repeated the same way, heads only."""
    groups = []
    for tag in ("k", "v"):
        if f"{tag}_repeated" not in m.bindings:
            continue
        x0, x, target = m.get(tag), m.get(f"{tag}_repeated"), _shape_contents(m.get(f"{tag}_expanded").producer.inputs[1])
        if x0.type.rank != 4 or x.type.rank != 4:
            return f"{x.name} is not a repeat of [B, Hkv, T, D] heads"
        (b, hk, t, d), (b2, h, t2, d2) = x0.shape, x.shape
        if not (isinstance(hk, int) and isinstance(h, int) and hk and h % hk == 0) or (b, t, d) != (b2, t2, d2) \
                or None in (b, t, d):
            return f"{x.name} {x.type} does not repeat the heads of {x0.name} {x0.type}"
        group = h // hk
        # Expand broadcasts size-1 dims only: every axis but the new one must keep its size.
        if target is None or len(target) != 5 or target[2] != group or \
                any(want not in (have, 1) for want, have in zip((target[0],) + target[1:2] + target[3:], (b, hk, t, d))):
            return f"{x.name} expands more than the head axis"
        groups.append(group)
    if len(groups) == 1 or (groups and groups[0] != groups[1]):
        return "keys and values are not repeated alike"
    return None


def _refuse_shapes(am: AttentionMatch, root_out: Value) -> Optional[str]:
    q, k, v = am.q, am.k, am.v
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.type.rank != 4:
            return f"{name} {t.name} is {t.type}, not [batch, heads, seq, head_dim]"
    if am.k_perm is not None and sorted(am.k_perm) != [0, 1, 2, 3]:
        return f"keys are transposed by {am.k_perm}, not a permutation of rank 4"
    if am.grouped and am.k_perm is not None:
        return "grouped attention with keys transposed other than on their last two axes"
    k_shape = k.shape if am.k_perm is None else tuple(k.shape[p] for p in am.k_perm)
    if not q.type.dtype.is_float:
        return "attention on a non-float tensor"
    if len({q.type.dtype, k.type.dtype, v.type.dtype}) != 1:
        return f"query, key and value dtypes differ ({q.type.dtype.name}, {k.type.dtype.name}, {v.type.dtype.name})"
    if root_out.type.dtype != q.type.dtype:
        return f"attention computes in {q.type.dtype.name} but its result is {root_out.type.dtype.name}"
    hq, hk = q.shape[1], k_shape[1]
    if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
        return f"query heads {hq} are not a multiple of key/value heads {hk}"
    for extra in (am.keep, am.bias, am.bias2):
        if extra is None:
            continue
        if not am.grouped and extra.type.rank not in (None, 2, 3, 4):
            return f"mask {extra.name} has rank {extra.type.rank}"
        if am.grouped and (extra.type.rank != 5 or extra.shape[1] != 1 or extra.shape[2] != 1):
            return f"grouped attention mask {extra.name} is {extra.type}, not [B, 1, 1, Tq|1, Tk]"
    for bias in (am.bias, am.bias2):
        if bias is not None and bias.type.dtype != q.type.dtype:
            return f"bias {bias.name} has dtype {bias.type.dtype.name}"
    return None


class AttentionRule(Rule):
    """softmax(Q Kᵀ · s + bias, masks) V  ->  Attention(Q, K, V, mask){scale=s, is_causal}."""

    name = "attention"

    def pattern(self, op: OpBuilder) -> Pattern:
        return Or(_attention_pattern(op, grouped=False), _attention_pattern(op, grouped=True), name="grouped")

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        reason = _refuse_layers(m)
        if reason:
            return reason
        am = AttentionMatch.of(m)
        if "k_repeated" in m.bindings and am.k_perm is not None:
            return "repeated keys transposed other than on their last two axes"
        return _refuse_shapes(am, m.root.outputs[0])

    def rewrite(self, b: Builder, m: Match):
        am = AttentionMatch.of(m)
        k = am.k
        if am.k_perm is not None:
            k = b.op("Transpose", k, perm=list(am.k_perm))
        keep, bias = am.keep, am.bias
        if am.bias2 is not None:
            bias = b.op("Add", bias, am.bias2)
        if am.grouped:                                   # [B, 1, 1, Tq|1, Tk] -> [B, 1, Tq|1, Tk]
            keep = b.op("Squeeze", keep, axes=[1]) if keep is not None else None
            bias = b.op("Squeeze", bias, axes=[1]) if bias is not None else None
        # is_causal is upper-left aligned; where Tq may differ from Tk (a KV cache's past), the
        # end-aligned causal mask is written out and joins the padding mask.
        square = am.q.shape[2] is not None and am.q.shape[2] == k.shape[2]
        if am.causal and (not square or am.window):
            causal = causal_keep(b, b.op("Shape", am.q, start=2, end=3), b.op("Shape", k, start=2, end=3), am.window)
            keep = causal if keep is None else b.op("And", keep, causal)          # (B, 1, Tq, Tk)
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
        return [AttentionRule(), UnrepeatKVRule(), MergedHeadsRule()]


class UnrepeatKVRule(Rule):
    """Attention(Q, repeat_kv(K), repeat_kv(V), mask) -> Attention(Q, K, V, mask): Attention-23
    shares each K/V head among a group of query heads itself (torch dynamo at opset 23 writes
    the op on HF's repeated K/V)."""

    name = "attention-unrepeat-kv"

    def pattern(self, op: OpBuilder) -> Pattern:
        q, k, v = Var("q"), _repeat_kv(op, Var("k"), "k"), _repeat_kv(op, Var("v"), "v")
        return Or(op.Attention(q, k, v), op.Attention(q, k, v, Var("mask")))

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        if m.q.type.rank != 4:
            return f"query {m.q.name} is {m.q.type}, not [batch, heads, seq, head_dim]"
        if any(out.uses or any(out is o for o in graph.outputs) for out in m.root.outputs[1:]):
            return f"{m.root.name}'s present key/value outputs are used"
        return _refuse_unrepeat(m)

    def rewrite(self, b: Builder, m: Match):
        mask = [m.mask] if m.get("mask") is not None else []
        return b.op("Attention", m.q, m.k, m.v, *mask, **m.root.attrs)


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
    WHAT = ("query", "key", "value")

    def pattern(self, op: OpBuilder) -> Pattern:
        def heads(tag: str) -> Pattern:                       # [B, T, H*D] -> [B, H, T, D]
            return op.Transpose(op.Reshape(Var(tag), ANY, _name=f"{tag}_heads"), perm=[0, 2, 1, 3])

        def rotated(tag: str) -> Pattern:                     # a RotaryEmbedding moves to the 3-D side
            return Or(op.RotaryEmbedding(heads(tag), Var(f"{tag}_cos"), Var(f"{tag}_sin"), _name=f"{tag}_rotary"), heads(tag))
        qkv = (rotated("query"), rotated("key"), heads("value"))
        attention = Or(op.Attention(*qkv, _name="att"), op.Attention(*qkv, Var("mask"), _name="att"))
        return op.Reshape(op.Transpose(attention, perm=[0, 2, 1, 3]), ANY)

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        att, out = m.att, m.root.outputs[0]
        if att.producer.inputs[0].type.rank != 4:
            return f"attention {att.name} is not on split heads"
        b, heads, tq, dv = att.shape
        if not _static(heads, dv) or out.shape is None or list(out.shape) != [b, tq, heads * dv]:
            return f"{m.root.name}: merges attention heads into {out.type}, not [B, T, H*D]"
        for what in self.WHAT:
            x, view = m.get(what), m.get(f"{what}_heads")
            vb, vt, vh, vd = view.shape
            if x.type.rank != 3 or not _static(vh, vd) or list(x.shape) != [vb, vt, vh * vd]:
                return f"{what} view {view.type} does not split {x.type} into heads"
        return None

    def rewrite(self, b: Builder, m: Match):
        att = m.att.producer
        heads = (int(m.att.shape[1]), int(att.inputs[1].shape[1]), int(att.inputs[1].shape[1]))
        sources = []
        for what, n in zip(self.WHAT, heads):
            x, rotary = m.get(what), m.get(f"{what}_rotary")
            if rotary is not None:
                rot = rotary.producer
                x = b.op("RotaryEmbedding", x, *rot.inputs[1:], **dict(rot.attrs, num_heads=n))
            sources.append(x)
        attrs = dict(att.attrs, q_num_heads=heads[0], kv_num_heads=heads[1])
        return b.op("Attention", *sources, *att.inputs[3:], **attrs)


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

    def pattern(self, op: OpBuilder) -> Pattern:
        return op.CausalMask(Var("scores"), _domain="tgraph", window=Var("window"))

    def rewrite(self, b: Builder, m: Match):
        s = m.scores
        rank = s.type.rank
        tq = b.op("Shape", s, start=rank - 2, end=rank - 1)
        tk = b.op("Shape", s, start=rank - 1)
        keep = causal_keep(b, tq, tk, int(m.window or 0))                                           # (Tq, Tk)
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
