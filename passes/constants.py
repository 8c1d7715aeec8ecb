"""Which constants a rewrite may read, decided in one place.

A rewrite reads a constant to decide (is this epsilon a scalar? is that exponent 2?) or to
compute a replacement (1/c). It must never read a checkpoint's weight to do so: weights are
lazy (`tgraph.ir.lazy`), loaded only when an export writes them, and reading one for a test
would load gigabytes. So the size is taken from the declared type, and lazy arrays are never
touched. Rules that put the value into the graph (canonicalize's `1/c`) also refuse
checkpoint parameters, which keep their names and identity; rules that only compare may
read small parameters (an imported ONNX model's constants are all parameters).

Both the hand-written canonicalize rules and the pattern engine's `ConstPat` read through
`small_const`; `scalar_of` turns an array that a pattern bound into its one number.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from tgraph.ir import Value
from tgraph.ir.lazy import is_lazy


def declared_size(v: Value) -> Optional[int]:
    """The element count of `v`'s declared type, None when a dim is symbolic or unknown."""
    shape = v.type.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def small_const(v: Optional[Value], max_size: int = 1, *, params: bool) -> Optional[np.ndarray]:
    """`v`'s contents when it is an in-memory constant of at most `max_size` elements (by its
    declared type) and, unless `params`, not a checkpoint parameter; else None."""
    if v is None or v.const is None or is_lazy(v.const) or (v.is_param and not params):
        return None
    size = declared_size(v)
    if size is None or size > max_size:
        return None
    return np.asarray(v.const)


def scalar_of(array: Optional[np.ndarray]) -> Optional[float]:
    """The number in a one-element array, else None."""
    return float(np.asarray(array, np.float64).reshape(-1)[0]) if array is not None and array.size == 1 else None


def scalar_const(v: Optional[Value], *, params: bool) -> Optional[float]:
    """The number in a one-element constant that `small_const` may read, else None."""
    return scalar_of(small_const(v, 1, params=params))
