"""The name authority: one unique, legal Python identifier per value.

One name serves as the ONNX value name and as the generated NumPy variable name,
so names must be identifiers that are not keywords and do not shadow the names the
generated module itself uses. Parameters keep their dotted module path
(``decoder.layers.0.fc1.weight``) as their name; those never become code (the NumPy
backend only ever writes them as string literals).
"""
from __future__ import annotations

import keyword
import re

# Names the generated NumPy module defines itself; values must never shadow them.
RESERVED = frozenset({"np", "run", "inputs", "P", "load_weights", "WEIGHTS_FILE", "k", "InputError"})

_ILLEGAL = re.compile(r"[^0-9a-zA-Z_]+")


def sanitize(hint: str) -> str:
    """Turn any string into a legal, non-reserved identifier (not yet unique)."""
    text = _ILLEGAL.sub("_", str(hint)).strip("_") or "v"
    if text[0].isdigit():
        text = "v" + text
    if keyword.iskeyword(text) or keyword.issoftkeyword(text) or text in RESERVED or text.startswith("__"):
        text = text.lstrip("_") + "_"
    return text[:80]


class NameAuthority:
    """Hands out unique identifiers derived from hints (``attn.q`` -> ``attn_q``, ``attn_q_1``)."""

    def __init__(self):
        self._used: set[str] = set()
        self._counters: dict[str, int] = {}

    def claim(self, name: str) -> str:
        """Reserve an exact name (graph inputs, parameters); fails if taken."""
        if name in self._used:
            raise ValueError(f"name {name!r} is already used in this graph")
        self._used.add(name)
        return name

    def fresh(self, hint: str) -> str:
        base = sanitize(hint)
        name = base
        while name in self._used:
            self._counters[base] = self._counters.get(base, 0) + 1
            name = f"{base}_{self._counters[base]}"
        self._used.add(name)
        return name

    def release(self, name: str) -> None:
        self._used.discard(name)

    def __contains__(self, name: str) -> bool:
        return name in self._used
