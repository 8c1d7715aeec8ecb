""""Did you mean ...?" for a mistyped name, from the names that exist (difflib's ratio)."""
from __future__ import annotations

import difflib
from typing import Iterable, List

CUTOFF = 0.6          # difflib's default: `gtp2` -> gpt2, `exprot` -> export, but `foo` -> nothing


def close_matches(word: str, choices: Iterable[str], n: int = 3, cutoff: float = CUTOFF) -> List[str]:
    """The choices closest to `word` (best first); case is ignored."""
    by_lower = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    return [by_lower[m] for m in difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=cutoff)]


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = CUTOFF) -> str:
    """``" (did you mean 'gpt2'?)"`` or ``""``, to append to an error message."""
    matches = close_matches(word, choices, n=1, cutoff=cutoff)
    return f" (did you mean {matches[0]!r}?)" if matches else ""
