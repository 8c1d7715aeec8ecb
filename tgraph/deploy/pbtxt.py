"""Protobuf text format, written from plain Python values (no protobuf needed to write).

Why our own writer: `tgraph deploy triton` must work without `tritonclient` installed;
`tgraph.deploy.triton_check` then parses what was written with Triton's own
`model_config_pb2`, so a mistake here is caught there, not in the server.

    dict          -> `key { ... }` (a message), or, as a value of `Map`, repeated key/value entries
    list of dicts -> repeated `key { ... }`
    list          -> `key: [a, b]`
    Enum("KIND")  -> KIND (unquoted);  str -> "quoted";  bool -> true/false;  int/float -> as is
"""
from __future__ import annotations

import json
from typing import Any, List


class Enum(str):
    """An enum value: written bare (KIND_GPU), not as a string."""


class Map(dict):
    """A protobuf map field; `message_values`: values are messages (written `value { ... }`)."""

    def __init__(self, items, message_values: bool = False):
        super().__init__(items)
        self.message_values = message_values


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)           # a valid protobuf string literal for printable text
    raise TypeError(f"no protobuf text form for {type(value).__name__}")


def _lines(message: dict, indent: int) -> List[str]:
    pad = "  " * indent
    out: List[str] = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, Map):
            for k, v in value.items():
                inner = {"key": k, "value": v}
                if value.message_values:
                    out += [f"{pad}{key} {{", f"{pad}  key: {_scalar(k)}", f"{pad}  value {{",
                            *_lines(v, indent + 2), f"{pad}  }}", f"{pad}}}"]
                else:
                    out += [f"{pad}{key} {{", *_lines(inner, indent + 1), f"{pad}}}"]
        elif isinstance(value, dict):
            out += [f"{pad}{key} {{", *_lines(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                out += [f"{pad}{key} {{", *_lines(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            out.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}")
    return out


def to_text(message: dict) -> str:
    return "\n".join(_lines(message, 0)) + "\n"
