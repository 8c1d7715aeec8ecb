"""Rotary position embeddings -> RotaryEmbedding-23 (the `fuse-rotary` pass).

Two layouts of the formula  x·cos + rotate(x)·sin  are recognised, optionally on the first
R dims of each head only, the rest concatenated back unrotated:

* "rotate_half" (LLaMA, GPT-NeoX, `tgraph.dsl.rotary`): rotate(x) = concat(-x₂, x₁) of the
  two halves, cut by `Split` or constant `Slice`s; one angle per pair (i, i + R/2), so the
  cos/sin tables must repeat over their two halves;
* "rotate_every_two" (GPT-J): rotate(x) = stack(-x[..., 1::2], x[..., 0::2]).flatten(-2);
  one angle per pair (2i, 2i + 1), so each table column must equal its neighbour
  (``repeat_interleave``): RotaryEmbedding with ``interleaved=1``.

The rule proves the tables' repetition from how they are computed and refuses tables it
cannot see through. A table is [T, R] or [B, 1, T, R] for x = [B, H, T, D], or [B, T, 1, R]
for x = [B, T, H, D] (GPT-J rotates before moving the heads forward), which the op then
takes as [B, T, H*D] with `num_heads`. The rewrite feeds the op its 3-D cache form,
without position_ids: the distinct columns of each table broadcast to [B, T, R/2] with the
batch and sequence length of x, exactly as the Mul broadcast it, all computed in the graph,
so the model stays dynamic in batch and sequence length.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from tgraph.ir import Builder, Graph, Value
from tgraph.ir.traits import has_trait

from .base import register_pass
from .pattern import ANY, Match, OpBuilder, Or, Pattern, RewritePass, Rule, Var


def _last_axis_ok(axis, rank: Optional[int]) -> bool:
    return axis is not None and rank is not None and int(axis) % rank == rank - 1


def _cut(op: OpBuilder, x: Pattern, tag: str) -> Tuple[Pattern, Pattern]:
    """`x` cut in two along its last axis: (first part, second part), each a Split output or a
    constant Slice. (A unit step stays a spelling: canonicalize keeps it where dropping it would
    sharpen the Slice's type, as when an exporter's bound is a Shape folded later.) The parts bind ``{tag}_a``
    and ``{tag}_b``; the Or's name makes both take the same form, so a part used twice is
    one node. `_cut_at` checks that they cut the axis in two."""
    def part(i: int) -> Pattern:
        name = f"{tag}_{'ab'[i]}"
        bounds = (x, op.const(name=f"{name}_start"), op.const(name=f"{name}_end"), op.const(name=f"{name}_axes"))
        return Or(op.Split(x, axis=Var(f"{tag}_axis"), _outputs=2, _index=i, _name=name),
                  op.Slice(*bounds, _name=name), op.Slice(*bounds, op.const(value=1), _name=name), name=f"{tag}_form")
    return part(0), part(1)


def _every_other(op: OpBuilder, x: Pattern, name: str) -> Pattern:
    """x[..., start::2] (bounds checked by `_every_other_ok`)."""
    return op.Slice(x, op.const(name=f"{name}_start"), op.const(name=f"{name}_end"), op.const(name=f"{name}_axes"),
                    op.const(value=2), _name=name)


def _rotated(op: OpBuilder, x: Pattern) -> Pattern:
    """rotate_half(x) = concat(-x₂, x₁), or rotate_every_two(x) = stack(-x_odd, x_even).flatten(-2);
    `interleaved` binds which."""
    x1, x2 = _cut(op, x, "half")
    half = op.Concat(op.Neg(x2), x1, axis=Var("rot_axis"))
    pair = op.Concat(op.Unsqueeze(op.Neg(_every_other(op, x, "odd")), axes=Var("odd_new_axis")),
                     op.Unsqueeze(_every_other(op, x, "even"), axes=Var("even_new_axis")), axis=Var("rot_axis"))
    return Or(half, op.Reshape(pair, ANY, _name="pairs"), name="interleaved")


def _formula(op: OpBuilder, x: Pattern) -> Pattern:
    return op.Add(op.Mul(x, Var("cos"), _name="x_cos"), op.Mul(_rotated(op, x), Var("sin"), _name="r_sin"))


class RotaryRule(Rule):
    """x·cos + rotate(x)·sin  [concat x_pass]  ->  RotaryEmbedding(x, cos cache, sin cache)."""

    name = "rotary"

    def pattern(self, op: OpBuilder) -> Pattern:
        x = Var("x")
        rot, passed = _cut(op, x, "rot")                # partial rotation: the first R dims rotate
        return Or(_formula(op, x), op.Concat(_formula(op, rot), passed, axis=Var("outer_axis"), _name="partial"))

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
            r = _cut_at(m, "rot", d)
            if isinstance(r, str):
                return r
            if not _last_axis_ok(m.outer_axis, 4):
                return "the rotated and passed parts are not concatenated on the last axis"
        else:
            r = d
        head = m.rot_a if partial else x                       # the part that rotates
        interleaved = m.interleaved == 1
        reason = _interleave_refusal(m, head, r) if interleaved else _halves_refusal(m, r)
        if reason:
            return reason
        repeats, how = (_pairs_equal, "repeats each column for a pair of dims") if interleaved else \
            (_halves_equal, "repeats over its two halves")
        for name, product in (("cos", m.x_cos), ("sin", m.r_sin)):
            t: Value = m.get(name)
            if t.type.dtype != x.dtype:
                return f"{name} table {t.name} is {t.type.dtype.name}, input is {x.dtype.name}"
            if _heads_axis(t) is None:
                return f"{name} table {t.name} is {t.type}, not [seq, rotary_dim], [batch, 1, seq, rotary_dim] " \
                       f"or [batch, seq, 1, rotary_dim]"
            if t.shape[-1] != r:
                return f"{name} table {t.name} has {t.shape[-1]} columns, rotary_dim is {r}"
            if product.shape != head.shape:
                return f"{name} table {t.name} broadcasts {head.name} {head.type} up to {product.type}"
            if not repeats(t):
                return f"cannot prove that {name} table {t.name} {how}"
        if _heads_axis(m.cos) != _heads_axis(m.sin):
            return "the cos and sin tables broadcast over different axes"
        if _heads_axis(m.cos) == 2 and not isinstance(shape[2], int):
            return f"the heads axis of {x.name} {x.type} is not static"
        return None

    # ---- rewrite ----------------------------------------------------------------------------
    def rewrite(self, b: Builder, m: Match):
        x = m.x
        r = m.cos.shape[-1]
        interleaved = m.interleaved == 1
        heads_axis = _heads_axis(m.cos)
        i64 = lambda *v: b.const(np.array(v, np.int64))                # noqa: E731
        # [B, T, 1]: x's batch and sequence length; Expand broadcasts a table against it
        # exactly as the Mul broadcast it against x.
        view = _head_split_source(x, heads_axis)
        if view is not None:        # read them before the head split, which then stays private to attention
            bt = b.op("Shape", view, start=0, end=2)                                  # [B, T]
        elif heads_axis == 1:
            bt = b.op("Concat", b.op("Shape", x, start=0, end=1), b.op("Shape", x, start=2, end=3), axis=0)
        else:
            bt = b.op("Shape", x, start=0, end=2)
        target = b.op("Concat", bt, i64(1), axis=0)

        def cache(t: Value, hint: str) -> Value:                   # the distinct columns: (.., T, R/2)
            cols = b.op("Slice", t, i64(0), i64(r), i64(-1), i64(2)) if interleaved else \
                b.op("Slice", t, i64(0), i64(r // 2), i64(-1))
            if t.type.rank == 4:
                cols = b.op("Squeeze", cols, axes=[heads_axis])                        # (B|1, T, R/2)
            return b.op("Expand", cols, target, hint=hint)                             # (B, T, R/2)

        attrs = dict(interleaved=int(interleaved), rotary_embedding_dim=r if r != x.shape[3] else 0)
        cos, sin = cache(m.cos, "cos_cache"), cache(m.sin, "sin_cache")
        if heads_axis == 1:
            return b.op("RotaryEmbedding", x, cos, sin, **attrs)
        # x is [B, T, H, D]: the op rotates it as [B, T, H*D] with num_heads
        heads, d = x.shape[2], x.shape[3]
        flat = view if view is not None else b.op("Reshape", x, i64(0, 0, heads * d))
        y = b.op("RotaryEmbedding", flat, cos, sin, num_heads=int(heads), **attrs)
        return b.op("Reshape", y, i64(0, 0, heads, d))


def _cut_at(m: Match, tag: str, width: int):
    """Where the `tag` cut of a `width`-wide last axis falls (the first part's size), or a reason."""
    a, b = m.get(f"{tag}_a"), m.get(f"{tag}_b")
    if a.producer.op == "Split":
        if a.producer is not b.producer:
            return "the two parts come from different Split nodes"
        node = a.producer
        if not _last_axis_ok(node.attrs.get("axis", 0), node.inputs[0].type.rank):
            return f"{node.name} does not split the last axis"
        return a.shape[-1] if isinstance(a.shape[-1], int) and a.shape[-1] + b.shape[-1] == width \
            else f"{node.name} parts do not cover {width} dims"
    bounds = {}
    for part in ("a", "b"):
        start, end, axis = _slice_bounds(m, f"{tag}_{part}", width)
        if start is None:
            return f"a {tag} Slice is not a single-axis constant slice"
        if axis not in (-1, 3):
            return f"a {tag} Slice cuts axis {axis}, not the last one"
        bounds[part] = (start, end)
    (a0, a1), (b0, b1) = bounds["a"], bounds["b"]
    if a0 != 0 or b0 != a1 or b1 != width:
        return f"Slices [{a0}:{a1}] and [{b0}:{b1}] do not cut {width} dims in two"
    return a1


def _slice_bounds(m: Match, name: str, width: int):
    """(start, end, axis) of the constant single-axis Slice bound as `name`, clamped to `width`."""
    vals = [m.get(f"{name}_{k}") for k in ("start", "end", "axes")]
    if any(v is None or np.size(v) != 1 for v in vals):
        return None, None, None
    start, end, axis = (int(np.asarray(v).reshape(-1)[0]) for v in vals)
    return start + width if start < 0 else start, min(end + width if end < 0 else end, width), axis


def _halves_refusal(m: Match, r: int) -> Optional[str]:
    h = _cut_at(m, "half", r)
    if isinstance(h, str):
        return h
    if 2 * h != r:
        return f"rotate_half cuts {r} dims at {h}, not in the middle"
    if not _last_axis_ok(m.rot_axis, 4):
        return "rotate_half does not concatenate on the last axis"
    return None


def _interleave_refusal(m: Match, head: Value, r: int) -> Optional[str]:
    for name, first in (("even", 0), ("odd", 1)):
        start, end, axis = _slice_bounds(m, name, r)
        if start != first or end != r or axis not in (-1, 3):
            return f"rotate_every_two's {name} dims are not x[..., {first}::2]"
        new_axis = m.get(f"{name}_new_axis")
        if new_axis is None or len(new_axis) != 1 or new_axis[0] not in (-1, 4):
            return f"rotate_every_two does not stack its {name} dims on a new last axis"
    if not _last_axis_ok(m.rot_axis, 5):
        return "rotate_every_two does not stack on the last axis"
    if m.pairs.shape != head.shape:
        return f"rotate_every_two flattens to {m.pairs.type}, not {head.type}"
    return None


def _heads_axis(t: Value) -> Optional[int]:
    """The axis of x a table broadcasts over, the heads: 1 for [T, R] and [B, 1, T, R] (x is
    [B, H, T, D]), 2 for [B, T, 1, R] (x is [B, T, H, D]); None for another shape."""
    shape = t.shape
    if shape is None or len(shape) not in (2, 4):
        return None
    if len(shape) == 2 or shape[1] == 1:
        return 1
    return 2 if shape[2] == 1 else None


def _head_split_source(x: Value, heads_axis: int) -> Optional[Value]:
    """The [B, T, H*D] tensor whose head split x is (Reshape, then a Transpose for [B, H, T, D])."""
    split = x.producer
    if heads_axis == 1:
        if split is None or split.op != "Transpose" or split.attrs.get("perm") != [0, 2, 1, 3]:
            return None
        x = split.inputs[0]
    view = x.producer
    if view is None or view.op != "Reshape" or view.inputs[0].type.rank != 3:
        return None
    src, (b, t, h, d) = view.inputs[0], x.shape
    if heads_axis == 2 and not (isinstance(h, int) and isinstance(d, int) and tuple(src.shape) == (b, t, h * d)):
        return None
    return src


def _columns_repeat(v: Value, pairs: bool, depth: int = 12) -> bool:
    """Whether v's last-axis columns repeat, judged from how v is computed: v[..., :n/2] ==
    v[..., n/2:] (`pairs` False), or v[..., 0::2] == v[..., 1::2] (`pairs` True)."""
    n = v.shape[-1] if v.shape else None
    if v.const is not None:
        arr = np.asarray(v.const)
        if arr.ndim == 0 or arr.shape[-1] == 1:
            return True
        if arr.shape[-1] % 2:
            return False
        h = arr.shape[-1] // 2
        return bool(np.array_equal(arr[..., 0::2], arr[..., 1::2]) if pairs else
                    np.array_equal(arr[..., :h], arr[..., h:]))
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
            and _columns_repeat(src, pairs, depth - 1)
    if node.op == "Reshape" and pairs:                     # repeat_interleave(t, 2, -1): [.., n/2, 2] -> [.., n]
        src = node.inputs[0]
        grown = src.producer
        return src.shape is not None and len(src.shape) == len(v.shape) + 1 and src.shape[-1] == 2 \
            and isinstance(n, int) and src.shape[-2] == n // 2 and tuple(src.shape[:-2]) == tuple(v.shape[:-1]) \
            and grown is not None and grown.op in ("Tile", "Expand") and grown.domain == "" \
            and grown.inputs[0].shape is not None and len(grown.inputs[0].shape) == len(src.shape) \
            and grown.inputs[0].shape[-1] == 1
    if node.op == "Concat":
        rank = v.type.rank
        if rank is not None and node.attrs.get("axis", 0) % rank == rank - 1:    # cat(f, f): HF's emb
            return not pairs and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
        return all(_columns_repeat(i, pairs, depth - 1) for i in node.inputs)
    if not has_trait(node, "elementwise"):
        return False
    return all(i is not None and _columns_repeat(i, pairs, depth - 1) for i in node.inputs)


def _halves_equal(v: Value) -> bool:
    """Whether v[..., :n/2] == v[..., n/2:] holds for every run (rotate_half's tables)."""
    return _columns_repeat(v, pairs=False)


def _pairs_equal(v: Value) -> bool:
    """Whether v[..., 0::2] == v[..., 1::2] holds for every run (rotate_every_two's tables)."""
    return _columns_repeat(v, pairs=True)


class RotaryCacheBatchRule(Rule):
    """RotaryEmbedding(x, cos[1, T, R/2], sin[1, T, R/2]) -> caches expanded to x's batch.

    Without position_ids the op takes [batch, seq, R/2] caches; torch's opset-23 export gives
    [1, T, R/2] and relies on broadcasting, which onnxruntime refuses for batch > 1."""

    name = "rotary-cache-batch"

    def pattern(self, op: OpBuilder) -> Pattern:
        return op.RotaryEmbedding(Var("x"), Var("cos"), Var("sin"))

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        for t in (m.cos, m.sin):
            if t.type.rank != 3 or t.shape[0] != 1:
                return f"cache {t.name} is {t.type}, not [1, seq, rotary_dim / 2]"
        if m.x.shape is None or m.x.shape[0] == 1:
            return f"{m.x.name} has batch 1: its caches already fit"
        return None

    def rewrite(self, b: Builder, m: Match):
        target = b.op("Concat", b.op("Shape", m.x, start=0, end=1), b.op("Shape", m.cos, start=1, end=3), axis=0)
        cos, sin = (b.op("Expand", t, target, hint=hint) for t, hint in ((m.cos, "cos_cache"), (m.sin, "sin_cache")))
        return b.op("RotaryEmbedding", m.x, cos, sin, **m.root.attrs)


@register_pass
class FuseRotary(RewritePass):
    """Rotary position embeddings (rotate_half or rotate_every_two, full or partial) -> RotaryEmbedding-23.

    Before:  %x1, %x2 = Split(%q){axis=-1}; %r = Concat(Neg(%x2), %x1){axis=-1}
             %y = Add(Mul(%q, %cos), Mul(%r, %sin))            (cos, sin: [T, R], equal halves)
    After:   %y = RotaryEmbedding(%q, Expand(%cos[:, :R/2], [B, T, 1]), Expand(%sin[:, :R/2], [B, T, 1]))
    """

    name = "fuse-rotary"

    def rules(self):
        return [RotaryRule(), RotaryCacheBatchRule()]
