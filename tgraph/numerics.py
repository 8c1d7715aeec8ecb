"""One-line numeric warnings a user needs: inf/NaN in a run's outputs, weights clamped to fp16.

A half-precision model can overflow where its float32 original did not; the result is
still an array of the right shape, so nothing fails. These helpers say so in one line
on stderr (``tgraph: warning: ...``) instead of letting NaN logits pass for an answer.
"""
from __future__ import annotations

import sys
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np


def warn(message: str) -> None:
    print(f"tgraph: warning: {message}", file=sys.stderr)


def nonfinite_summary(outputs: Mapping[str, object]) -> Optional[str]:
    """``"logits has 12 inf/NaN of 1940 values (float16)"`` for the outputs that have any, or None."""
    parts = []
    for name, value in outputs.items():
        a = np.asarray(value)
        if a.dtype.kind != "f" or not a.size:
            continue
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            parts.append(f"{name} has {bad} inf/NaN of {a.size} values ({a.dtype})")
    return "; ".join(parts) or None


def warn_nonfinite(outputs: Mapping[str, object], context: str) -> Optional[str]:
    """Warn (one line) when any float output holds inf or NaN; returns the message."""
    summary = nonfinite_summary(outputs)
    if summary is not None:
        hint = " (a float16 overflow? try --dtype float32)" if _any_half(outputs) else ""
        warn(f"{context}: {summary}{hint}")
    return summary


def _any_half(outputs: Mapping[str, object]) -> bool:
    return any(np.asarray(v).dtype == np.float16 for v in outputs.values())


def clamp_summary(clamped: Sequence[Tuple[str, int]], dtype_name: str, limit: float, shown: int = 3) -> str:
    """``"clamped 5 weights beyond float16's range (±65504) in 2 tensors: a.weight (4), b.weight (1)"``."""
    total = sum(n for _, n in clamped)
    names = ", ".join(f"{name} ({n})" for name, n in clamped[:shown])
    more = f" and {len(clamped) - shown} more" if len(clamped) > shown else ""
    tensors = f"{len(clamped)} tensor{'s' if len(clamped) != 1 else ''}"
    return (f"clamped {total} weight{'s' if total != 1 else ''} beyond {dtype_name}'s range (±{limit:g}) "
            f"in {tensors}: {names}{more}")
