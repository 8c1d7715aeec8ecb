"""Rotary position embeddings -> RotaryEmbedding-23 (the `fuse-rotary` pass).

The formula is the "rotate_half" one LLaMA, GPT-NeoX and Hugging Face write (and
`tgraph.dsl.rotary`):  x·cos + concat(-x₂, x₁)·sin, optionally on the first R dims of
each head only, the rest concatenated back unrotated. The halves may be cut by `Split`
or by constant `Slice`s (what a PyTorch export writes).

RotaryEmbedding uses one angle per pair (i, i + R/2), so it is only equivalent when the
cos/sin tables repeat over their two halves. The rule proves that from how the tables
are computed (the DSL: Cos/Sin of positions times a constant whose halves are equal)
and refuses tables it cannot see through. A table is [T, R] (positions 0..T-1, or a KV
cache's offsets) or [B, 1, T, R] (per-row position_ids). The rewrite feeds the op its
3-D cache form, without position_ids: the first half of each table broadcast to
[B, T, R/2] with the batch and sequence length of x, exactly as the Mul broadcast it, all
computed in the graph, so the model stays dynamic in batch and sequence length.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import numpy as np

from tgraph.ir import Builder, Graph, Node, Value
from tgraph.ir.traits import has_trait

from .base import register_pass
from .pattern import ConstPat, Match, NoMatch, OpBuilder, OpPat, RewritePass, Rule, Var, Matcher, escapes


def _last_axis_ok(axis, rank: Optional[int]) -> bool:
    return axis is not None and rank is not None and int(axis) % rank == rank - 1


def _halves(op: OpBuilder, x, tag: str) -> List[Tuple[OpPat, OpPat]]:
    """Ways to cut `x` in two along its last axis: (first part, second part) patterns.

    The parts bind ``{tag}_a`` and ``{tag}_b``; a Split its axis, Slices their constant
    bounds; `_cut` checks that they cut the axis in two (a Split's two parts must be the
    outputs of one node: two pattern objects may match different ones).
    """
    split_attrs = {"axis": Var(f"{tag}_axis")}
    a = OpPat("Split", (x,), dict(split_attrs), name=f"{tag}_a", outputs=2, index=0)
    b = OpPat("Split", (x,), dict(split_attrs), name=f"{tag}_b", outputs=2, index=1)
    forms = [(a, b)]
    for steps in (False, True):
        def cut(part: str):
            ins = [x, ConstPat(f"{tag}_{part}_start"), ConstPat(f"{tag}_{part}_end"), ConstPat(f"{tag}_{part}_axes")]
            if steps:
                ins.append(ConstPat(f"{tag}_{part}_steps", value=1))
            return OpPat("Slice", tuple(ins), {}, name=f"{tag}_{part}")
        forms.append((cut("a"), cut("b")))
    return forms


class RotaryRule(Rule):
    """x·cos + rotate_half(x)·sin  [concat x_pass]  ->  RotaryEmbedding(x, cos[..., :R/2], sin[..., :R/2])."""

    name = "rotary"

    def patterns(self, op: OpBuilder) -> List[OpPat]:
        out = []
        # full rotation: the core formula on the whole head
        for x1, x2 in _halves(op, Var("x"), "half"):
            out.append(self._core(op, Var("x"), x1, x2))
        # partial rotation: the core formula on the first R dims, the rest passed through
        for (xr, xp), inner in itertools.product(_halves(op, Var("x"), "rot"), range(3)):
            x1, x2 = _halves(op, xr, "half")[inner]
            root = op.Concat(self._core(op, xr, x1, x2), xp, axis=Var("outer_axis"))
            root.name = "partial"                 # records which form matched
            out.append(root)
        return out

    def match(self, graph: Graph, node: Node, patterns, reasons):
        """Only roots shaped like the formula are tried, so near misses stay about rotary; and
        a refusal of a structural match is reported before the spellings that did not match."""
        ins = node.inputs
        plausible = (node.op == "Add" and all(i.producer is not None and i.producer.op == "Mul" for i in ins)) or \
            (node.op == "Concat" and len(ins) == 2 and ins[0].producer is not None and ins[0].producer.op == "Add")
        if not plausible or node.domain != "":
            return None
        refused: List[str] = []
        unmatched: List[str] = []
        for pat in patterns:
            if pat.op != node.op:
                continue
            try:
                m = Matcher(graph).match(pat, node)
            except NoMatch as e:
                unmatched.append(str(e))
                continue
            reason = escapes(graph, m) or self.check(m, graph)
            if reason is None:
                return m, pat.index
            refused.append(reason)
        reasons.extend(refused + unmatched)
        return None

    @staticmethod
    def _core(op: OpBuilder, x, x1, x2) -> OpPat:
        rotated = op.Concat(op.Neg(x2), x1, axis=Var("rot_axis"))          # rotate_half(x)
        return op.Add(op.Mul(x, Var("cos"), _name="x_cos"), op.Mul(rotated, Var("sin"), _name="r_sin"))

    # ---- checks ---------------------------------------------------------------------------
    def check(self, m: Match, graph: Graph) -> Optional[str]:
        x: Value = m.x
        if not x.type.dtype.is_float:
            return "not a float tensor"
        shape = x.shape
        if shape is None or len(shape) != 4:
            return f"{x.name} is {x.type}, not [batch, heads, seq, head_dim]"
        d = shape[3]
        if not isinstance(d, int):
            return f"head_dim of {x.name} is not static"
        partial = "partial" in m.bindings
        if partial:
            r = self._cut(m, "rot", d)
            if isinstance(r, str):
                return r
            if not _last_axis_ok(m.outer_axis, 4):
                return "the rotated and passed parts are not concatenated on the last axis"
        else:
            r = d
        h = self._cut(m, "half", r)
        if isinstance(h, str):
            return h
        if 2 * h != r:
            return f"rotate_half cuts {r} dims at {h}, not in the middle"
        if not _last_axis_ok(m.rot_axis, 4):
            return "rotate_half does not concatenate on the last axis"
        head = m.rot_a if partial else x                       # the part that rotates
        for name, product in (("cos", m.x_cos), ("sin", m.r_sin)):
            t: Value = m.get(name)
            if t.type.dtype != x.dtype:
                return f"{name} table {t.name} is {t.type.dtype.name}, input is {x.dtype.name}"
            if t.shape is None or len(t.shape) not in (2, 4) or (len(t.shape) == 4 and t.shape[1] != 1):
                return f"{name} table {t.name} is {t.type}, not [seq, rotary_dim] or [batch, 1, seq, rotary_dim]"
            if t.shape[-1] != r:
                return f"{name} table {t.name} has {t.shape[-1]} columns, rotary_dim is {r}"
            if product.shape != head.shape:
                return f"{name} table {t.name} broadcasts {head.name} {head.type} up to {product.type}"
            if not _halves_equal(t):
                return f"cannot prove that {name} table {t.name} repeats over its two halves"
        return None

    @staticmethod
    def _cut(m: Match, tag: str, width: int):
        """Where the `tag` cut of a `width`-wide last axis falls (the first part's size), or a reason."""
        a, b = m.get(f"{tag}_a"), m.get(f"{tag}_b")
        if a.producer.op == "Split":
            if a.producer is not b.producer:
                return "the two parts come from different Split nodes"
            node = a.producer
            if not _last_axis_ok(node.attrs.get("axis", 0), node.inputs[0].type.rank):
                return f"{node.name} does not split the last axis"
            if len(node.outputs) != 2:
                return f"{node.name} splits into {len(node.outputs)} parts, not 2"
            return a.shape[-1] if isinstance(a.shape[-1], int) and a.shape[-1] + b.shape[-1] == width \
                else f"{node.name} parts do not cover {width} dims"
        bounds = {}
        for part in ("a", "b"):
            vals = [m.get(f"{tag}_{part}_{k}") for k in ("start", "end", "axes")]
            if any(v is None or np.size(v) != 1 for v in vals):
                return f"a {tag} Slice is not a single-axis constant slice"
            start, end, axis = (int(np.asarray(v).reshape(-1)[0]) for v in vals)
            if axis not in (-1, 3):
                return f"a {tag} Slice cuts axis {axis}, not the last one"
            bounds[part] = (start + width if start < 0 else start, min(end + width if end < 0 else end, width))
        (a0, a1), (b0, b1) = bounds["a"], bounds["b"]
        if a0 != 0 or b0 != a1 or b1 != width:
            return f"Slices [{a0}:{a1}] and [{b0}:{b1}] do not cut {width} dims in two"
        return a1

    # ---- rewrite ----------------------------------------------------------------------------
    def rewrite(self, b: Builder, m: Match):
        x = m.x
        r = m.cos.shape[-1]
        i64 = lambda *v: b.const(np.array(v, np.int64))                # noqa: E731
        # [B, T, 1]: x's batch and sequence length; Expand broadcasts a table against it
        # exactly as the Mul broadcast it against x.
        # Read them before the head split when there is one ([B, T, H*D] -> [B, H, T, D]), so the
        # split stays private to the attention block and `attention-merged-heads` can drop it.
        split = x.producer if x.producer is not None and x.producer.op == "Transpose" \
            and x.producer.attrs.get("perm") == [0, 2, 1, 3] else None
        view = split.inputs[0].producer if split is not None else None
        if view is not None and view.op == "Reshape" and view.inputs[0].type.rank == 3:
            bt = b.op("Shape", view.inputs[0], start=0, end=2)                       # [B, T]
        else:
            bt = b.op("Concat", b.op("Shape", x, start=0, end=1), b.op("Shape", x, start=2, end=3), axis=0)
        target = b.op("Concat", bt, i64(1), axis=0)

        def cache(t: Value, hint: str) -> Value:
            half = b.op("Slice", t, i64(0), i64(r // 2), i64(-1))                      # (.., T, R/2)
            if t.type.rank == 4:
                half = b.op("Squeeze", half, axes=[1])                                  # (B|1, T, R/2)
            return b.op("Expand", half, target, hint=hint)                              # (B, T, R/2)

        dim = r if r != x.shape[3] else 0
        return b.op("RotaryEmbedding", x, cache(m.cos, "cos_cache"), cache(m.sin, "sin_cache"),
                    interleaved=0, rotary_embedding_dim=dim)


def _halves_equal(v: Value, depth: int = 12) -> bool:
    """Whether v[..., :n/2] == v[..., n/2:] holds for every run, judged from how v is computed."""
    n = v.shape[-1] if v.shape else None
    if v.const is not None:
        arr = np.asarray(v.const)
        if arr.ndim == 0 or arr.shape[-1] == 1:
            return True
        if arr.shape[-1] % 2:
            return False
        h = arr.shape[-1] // 2
        return bool(np.array_equal(arr[..., :h], arr[..., h:]))
    if n == 1 or (v.shape is not None and len(v.shape) == 0):
        return True                        # broadcast along the last axis (or a scalar): the same for every column
    node = v.producer
    if node is None or depth == 0 or node.domain != "":
        return False
    if node.op in ("Unsqueeze", "Squeeze", "Expand"):     # new or dropped axes; the last one kept
        src = node.inputs[0]
        axes = node.attrs.get("axes") or []
        rank = v.type.rank if node.op == "Unsqueeze" else src.type.rank
        if node.op != "Expand" and (rank is None or any(a % rank == rank - 1 for a in axes)):
            return False
        return src.shape is not None and len(src.shape) > 0 and src.shape[-1] in (n, 1) \
            and _halves_equal(src, depth - 1)
    if node.op == "Concat":
        rank = v.type.rank
        if rank is not None and node.attrs.get("axis", 0) % rank == rank - 1:    # cat(f, f): HF's emb
            return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
        return all(_halves_equal(i, depth - 1) for i in node.inputs)
    if not has_trait(node, "elementwise"):
        return False
    return all(i is not None and _halves_equal(i, depth - 1) for i in node.inputs)


@register_pass
class FuseRotary(RewritePass):
    """Rotary position embeddings (rotate_half form, full or partial) -> RotaryEmbedding-23.

    Before:  %x1, %x2 = Split(%q){axis=-1}; %r = Concat(Neg(%x2), %x1){axis=-1}
             %y = Add(Mul(%q, %cos), Mul(%r, %sin))            (cos, sin: [T, R], equal halves)
    After:   %y = RotaryEmbedding(%q, Expand(%cos[:, :R/2], [B, T, 1]), Expand(%sin[:, :R/2], [B, T, 1]))
    """

    name = "fuse-rotary"

    def rules(self):
        return [RotaryRule()]
