"""Which decoder layers attend locally (a sliding window) and which see every earlier key.

Families mix the two: GPT-Neo alternates "global" and "local" layers (GPT-3's layout), Qwen2
keeps its first `max_window_layers` layers full, Mistral makes every layer local. A config
holds the layout as a comma-separated pattern of layer kinds that repeats over the layers
("global,local": even layers global, odd local), so `--set` can write it and a probe build
with fewer layers keeps the same layout. The window itself is one int: the number of keys a
local layer's query sees, itself included (`tgraph.CausalMask`'s `window`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from ..errors import ConfigError


def parse_pattern(text: str, kinds: Tuple[str, str], where: str) -> Tuple[str, ...]:
    """'a,b,...' -> ('a', 'b', ...), each one of `kinds` (full, local); ConfigError naming `where`."""
    items = tuple(t.strip() for t in text.split(",")) if text.strip() else ()
    bad = [t for t in items if t not in kinds]
    if not items or bad:
        raise ConfigError(f"{where} must be a comma-separated list of {' / '.join(kinds)}, got {text!r}")
    return items


def layer_windows(pattern: Sequence[str], local_kind: str, window: int, num_layers: int) -> List[int]:
    """Each layer's window (0: full attention): layer i is of kind pattern[i % len(pattern)]."""
    return [window if pattern[i % len(pattern)] == local_kind else 0 for i in range(num_layers)]


def shortest_pattern(types: Sequence[str]) -> str:
    """The shortest prefix that repeats to `types` (['g', 'l', 'g', 'l'] -> 'g,l'), as a pattern."""
    n = len(types)
    for p in range(1, n + 1):
        if all(types[i] == types[i % p] for i in range(n)):
            return ",".join(types[:p])
    return ""
