"""What each optimization level runs, in order: one table, read top to bottom.

-O0 runs nothing (the graph as built). -O1 cleans up: forward no-op nodes, fold what is
known, merge duplicates, then sweep what became dead. -O2 first brings equivalent
spellings of a formula to one form (`canonicalize`: a Div by a constant becomes a Mul,
Pow(x, 2) becomes Mul(x, x), Cast and Transpose chains collapse ...), so that each fusion
needs one pattern per family; then it cleans up, fuses the portable patterns (elementwise
formulas first, then rotary positions, then attention, whose leftover causal masks
`causal-mask` makes explicit) and cleans up again, since rewrites leave dead nodes and
duplicate constants behind. -O3 adds the onnxruntime-specific fusions (com.microsoft ops)
after the portable ones.

A pass is in a level because this table names it, not because of where it is defined
or imported; `tgraph passes` prints the table. Passes in no level (to-fp16, to-bf16,
quantize-weights, fuse-skip-layer-norm) run by name (`--pipeline`) or through their option.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Tuple

from tgraph.errors import ConfigError

#: Normalises equivalent spellings of a formula so that each fusion matches one form; runs first at -O2.
CANONICALIZE: Tuple[str, ...] = ("canonicalize",)
CLEANUP: Tuple[str, ...] = ("eliminate-identity", "fold-constants", "cse", "dce")
FUSIONS: Tuple[str, ...] = ("fuse-softmax", "fuse-layer-norm", "fuse-rms-norm", "fuse-gelu", "fuse-rotary",
                            "fuse-attention", "causal-mask")
ORT_FUSIONS: Tuple[str, ...] = ("fuse-packed-qkv",)

#: -Ok runs LEVEL_TABLE[k], in this order.
LEVEL_TABLE: Dict[int, Tuple[str, ...]] = {
    0: (),
    1: CLEANUP,
    2: CANONICALIZE + CLEANUP + FUSIONS + CLEANUP,
    3: CANONICALIZE + CLEANUP + FUSIONS + ORT_FUSIONS + CLEANUP,
}
MAX_LEVEL = max(LEVEL_TABLE)


def level_pipeline(level: int) -> List[str]:
    """The pass names run at -O`level`, in order."""
    if isinstance(level, bool) or level not in LEVEL_TABLE:
        raise ConfigError(f"unknown optimization level {level!r}; levels are 0..{MAX_LEVEL}")
    return list(LEVEL_TABLE[level])


def levels_of(name: str) -> List[int]:
    """The levels whose pipeline includes the pass `name`."""
    return [k for k, names in sorted(LEVEL_TABLE.items()) if name in names]


class _Levels(Mapping):
    """``LEVELS[k]``: the pipeline of -Ok as a fresh list (a caller may extend it)."""

    def __getitem__(self, level: int) -> List[str]:
        if level not in LEVEL_TABLE:
            raise KeyError(level)
        return level_pipeline(level)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(LEVEL_TABLE))

    def __len__(self) -> int:
        return len(LEVEL_TABLE)

    def __repr__(self) -> str:
        return repr(dict(self))


LEVELS: Mapping = _Levels()
