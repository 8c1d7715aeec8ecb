"""Op traits: the classes of ops that passes reason about, read from the op table.

Each `OpDef` lists its traits; passes ask `has_trait(node, "commutative")` or take
`ops_with("layout")` instead of keeping sets of op names of their own (which used to
disagree). The traits:

* ``commutative``: the result does not depend on the order of the inputs (Add, Mul, Max, Sum ...);
* ``elementwise``: each output element depends only on the same (broadcast) element of
  each input (arithmetic, activations, comparisons, Where, Cast ...);
* ``comparison``: elementwise with a boolean result (Equal, Less, Not, And, IsNaN ...);
* ``conversion``: changes the element type only (Cast, CastLike);
* ``layout``: moves or selects elements without arithmetic (Reshape, Transpose, Slice, Gather ...);
* ``shape_only``: reads only its input's shape, never its values (Shape, Size);
* ``fused``: what a fusion produces (Attention, LayerNormalization, com.microsoft ops ...).
"""
from __future__ import annotations

from typing import FrozenSet

from .opdefs import OPS, TRAITS


def _opdef(op, domain: str = ""):
    if hasattr(op, "op") and hasattr(op, "domain"):          # a Node
        op, domain = op.op, op.domain
    return OPS.get(f"{domain}.{op}" if domain else op)


def has_trait(op, trait: str, domain: str = "") -> bool:
    """Whether the op (a Node, or an op name and domain) has `trait`; unknown ops have none."""
    if trait not in TRAITS:
        raise KeyError(f"unknown op trait {trait!r}; traits: {', '.join(sorted(TRAITS))}")
    d = _opdef(op, domain)
    return d is not None and trait in d.traits


def ops_with(*traits: str) -> FrozenSet[str]:
    """Qualified names (``"Add"``, ``"com.microsoft.MatMulNBits"``) of the ops having every trait."""
    for t in traits:
        if t not in TRAITS:
            raise KeyError(f"unknown op trait {t!r}; traits: {', '.join(sorted(TRAITS))}")
    return frozenset(key for key, d in OPS.items() if all(t in d.traits for t in traits))
