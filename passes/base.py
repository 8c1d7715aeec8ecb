"""The pass registry: `Pass`, `register_pass`, optimization levels and pipeline strings.

After xDSL: a pass is a small dataclass with a kebab-case `name`; its dataclass fields
are its options; a pipeline is a string such as ``"dce,cse,fold-constants{max-elements=4096}"``.
Which passes each -O level runs is not declared here but in one table, `tgraph.passes.levels`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Type, Union

from tgraph.errors import ConfigError
from tgraph.ir import Graph
from tgraph.suggest import did_you_mean

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclasses.dataclass
class Pass:
    """A graph-to-graph rewrite that mutates the graph in place.

    `run` returns what it changed as counts, e.g. ``{"removed_nodes": 3}``; an empty dict
    or all zeros means "no change". Every pass reaches its fixed point in one call, so
    running it a second time reports no change.
    """

    name: ClassVar[str] = ""

    def run(self, graph: Graph) -> Dict[str, int]:
        raise NotImplementedError

    def __call__(self, graph: Graph) -> Dict[str, int]:
        return self.run(graph)

    def spec(self) -> str:
        """This pass as pipeline text: its name plus any option that differs from the default."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                text = str(value).lower() if isinstance(value, bool) else str(value)
                opts.append(f"{f.name.replace('_', '-')}={text}")
        return f"{self.name}{{{','.join(opts)}}}" if opts else self.name


PassLike = Union[str, Pass, Type[Pass]]

PASSES: Dict[str, Type[Pass]] = {}

def register_pass(cls: Optional[Type[Pass]] = None, **options: Any):
    """Register a `Pass` subclass by its `name` (``@register_pass``); `tgraph.passes.levels`
    lists the passes each -O level runs."""
    if options:
        raise TypeError(f"register_pass takes no {', '.join(options)}: the passes of each -O level are listed "
                        "in tgraph.passes.levels.LEVEL_TABLE")

    def deco(c: Type[Pass]) -> Type[Pass]:
        if not (isinstance(c, type) and issubclass(c, Pass)):
            raise TypeError(f"register_pass expects a Pass subclass, got {c!r}")
        if not dataclasses.is_dataclass(c) or "__dataclass_fields__" not in c.__dict__:
            c = dataclasses.dataclass(c)
        name = c.name
        if not _KEBAB.match(name or ""):
            raise ValueError(f"pass {c.__qualname__} needs a kebab-case `name`, got {name!r}")
        if name in PASSES and PASSES[name].__qualname__ != c.__qualname__:
            raise ValueError(f"pass name {name!r} is already registered by {PASSES[name].__qualname__}")
        PASSES[name] = c
        return c

    return deco if cls is None else deco(cls)


def _known() -> str:
    return ", ".join(sorted(PASSES))


def get_pass(name: str) -> Type[Pass]:
    """The registered pass class called `name`."""
    try:
        return PASSES[name]
    except KeyError:
        raise ConfigError(f"unknown pass {name!r}{did_you_mean(name, PASSES)}; known passes: {_known()} "
                          "(`tgraph passes` describes them)") from None


def describe_passes() -> Dict[str, str]:
    """``{name: first line of its docstring}`` for every registered pass (for `tgraph passes`)."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            for name, cls in sorted(PASSES.items())}


# ------------------------------------------------------------------ pipeline strings
def _split_top(text: str) -> List[str]:
    """Split on commas that are not inside ``{...}``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"pipeline {text!r}: unbalanced '}}'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"pipeline {text!r}: unbalanced '{{'")
    parts.append(text[start:])
    return parts


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _instantiate(cls: Type[Pass], options: Dict[str, str]) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, text in options.items():
        attr = key.replace("-", "_")
        if attr not in fields:
            known = ", ".join(n.replace("_", "-") for n in fields) or "none"
            raise ConfigError(f"pass {cls.name!r} has no option {key!r}; its options: {known}")
        kwargs[attr] = _parse_value(text)
    return cls(**kwargs)


def _parse_one(item: str) -> Pass:
    text = item.strip()
    if not text:
        raise ConfigError("pipeline has an empty pass name (stray comma?)")
    m = re.fullmatch(r"([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?", text, flags=re.S)
    if not m:
        raise ConfigError(f"cannot parse pass {text!r}; write name or name{{option=value,...}}")
    cls = get_pass(m.group(1))
    options: Dict[str, str] = {}
    for opt in filter(None, (o.strip() for o in (m.group(2) or "").split(","))):
        key, eq, value = opt.partition("=")
        if not eq:
            raise ConfigError(f"pass {cls.name!r}: option {opt!r} needs the form name=value")
        options[key.strip()] = value.strip()
    return _instantiate(cls, options)


def parse_pipeline(pipeline: Union[str, Sequence[PassLike], None]) -> List[Pass]:
    """Pass instances from ``"dce,cse"`` or a list of names, classes or instances."""
    if pipeline is None:
        return []
    if isinstance(pipeline, str):
        return [] if not pipeline.strip() else [_parse_one(p) for p in _split_top(pipeline)]
    out: List[Pass] = []
    for p in pipeline:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        elif isinstance(p, str):
            out.extend(parse_pipeline(p))
        else:
            raise ConfigError(f"pipeline entries must be pass names or Pass objects, got {p!r}")
    return out


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The inverse of `parse_pipeline`."""
    return ",".join(p.spec() for p in passes)
