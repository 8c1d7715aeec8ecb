"""Checks on each checkpoint tensor as it is converted: its dtype, and whether it holds NaN/inf.

A weight stored as int32, int64 or bool (a mislabelled header, a wrong tensor under a weight's
name) would otherwise be cast to float silently and give wrong numbers; it is refused, naming
the tensor, its dtype and the expected one. NaN or inf weights are legal bytes but poison every
output they reach; they are counted (one sum per tensor, accumulated in float32 or wider so float16 cannot
overflow; a precise count only when the sum is not finite) and reported in one warning per checkpoint.
"""
from __future__ import annotations

import warnings
from typing import Dict, Set, Tuple

import numpy as np

from .errors import CheckpointError, TgraphWarning
from .ir.lazy import fold_blocks

SHOWN = 5          # tensors named in the NaN/inf warning; the rest are counted


# ml_dtypes' floats (how bfloat16 and float8 safetensors are read) have NumPy kind "V", not "f"
ML_FLOATS = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})


def is_floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name in ML_FLOATS


def check_weight_dtype(array: np.ndarray, tensor: str, label: str, expected: str = "float32") -> None:
    """CheckpointError unless `array` holds floating-point numbers (the weights' dtype is `expected`);
    bfloat16 (Llama 3, Qwen2.5 checkpoints) widens to float32 exactly."""
    if not is_floating(array.dtype):
        raise CheckpointError(f"{label}: tensor {tensor!r} has dtype {array.dtype}; expected a floating-point "
                              f"tensor ({expected}) - refusing to cast it")


class NonFiniteWeights:
    """Collects, tensor by tensor, how many NaN and inf values a checkpoint holds."""

    def __init__(self) -> None:
        self.found: Dict[str, Tuple[int, int]] = {}      # tensor -> (NaN count, inf count)
        self.seen: Set[str] = set()                      # a fused tensor feeds several parameters

    def count(self, array: np.ndarray, tensor: str) -> None:
        if not is_floating(array.dtype) or tensor in self.seen or not array.size:
            return
        self.seen.add(tensor)
        wide = np.promote_types(array.dtype, np.float32)
        # (a lazy, memory-mapped tensor is read block by block from the file, never copied whole)
        if np.isfinite(fold_blocks(array, lambda b: np.sum(b, dtype=wide))):   # no temporary array
            return
        nan = fold_blocks(array, lambda b: int(np.count_nonzero(np.isnan(b))))
        inf = fold_blocks(array, lambda b: int(np.count_nonzero(np.isinf(b))))
        if nan or inf:                                    # (a finite tensor whose sum overflowed has neither)
            self.found[tensor] = (nan, inf)

    def message(self, label: str) -> str:
        parts = [f"{name!r} ({nan} NaN, {inf} inf)" for name, (nan, inf) in list(self.found.items())[:SHOWN]]
        more = len(self.found) - SHOWN
        many = len(self.found) > 1
        return (f"{label}: {len(self.found)} checkpoint tensor{'s hold' if many else ' holds'} NaN/inf weights: "
                f"{', '.join(parts)}" + (f" and {more} more" if more > 0 else ""))

    def warn(self, label: str) -> None:
        if self.found:
            warnings.warn(self.message(label), TgraphWarning, stacklevel=3)
