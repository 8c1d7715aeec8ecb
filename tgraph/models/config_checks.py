"""One check for every field of every family's config dataclass: its declared type, and its range.

A config arrives from `--set`, from Python, or from a checkpoint's config.json, where JSON says
`"n_head": "12"`, `"layer_norm_epsilon": Infinity` or `"tie_word_embeddings": "false"` as easily
as the right thing. `check_fields` runs first in each config's `__post_init__`, so the family's
own checks (divisibility, known activation names ...) only ever see values of the declared type:

* an `int` field takes an int (not a bool, not 12.0), a `float` field a finite int or float
  (stored as float), a `bool` field a bool, a `str` field a str; `Optional[X]` also takes None;
* a field declared with `bounded(...)` must lie in its range;
* a field declared with `repeated(...)` counts identical blocks; `tgraph.resources` extrapolates
  a config's size from small probes of those fields instead of building all the blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError

REPEATS = "tgraph.repeats"
BOUNDS = "tgraph.bounds"


@dataclass(frozen=True)
class Bounds:
    """A numeric interval; None = unbounded on that side."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}" \
               f"{')' if self.high_open or self.high is None else ']'}"


def bounded(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None,
            lt: Optional[float] = None, le: Optional[float] = None) -> Any:
    """A dataclass field whose value must lie in the given range (gt/ge below, lt/le above)."""
    bounds = Bounds(low=gt if gt is not None else ge, high=lt if lt is not None else le,
                    low_open=gt is not None, high_open=lt is not None)
    return dataclasses.field(default=default, metadata={BOUNDS: bounds})


def repeated(default: Any) -> Any:
    """A dataclass field that counts identical blocks (layers, groups): the model's size is linear in it."""
    return dataclasses.field(default=default, metadata={REPEATS: True})


# The ranges every family shares: a norm's epsilon and a rotary base.
def epsilon(default: float) -> Any:
    return bounded(default, gt=0.0, le=1.0)


def positive(default: float) -> Any:
    return bounded(default, gt=0.0)


def fraction(default: float) -> Any:
    return bounded(default, gt=0.0, le=1.0)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _checked(value: Any, annotation: Any, where: str) -> Any:
    """`value` as `annotation` demands (ints become floats for float fields), or ConfigError."""
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _checked(value, args[0], where)
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value}")
            return value
        raise ConfigError(f"{where} must be a number, got {_describe(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {_describe(value)}")
    return value                      # a type this check does not know: the family checks it


def check_fields(config: Any, family: str) -> None:
    """Type- and range-check every field of a config dataclass in place (see the module docstring)."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        where = f"{family}: {f.name}"
        value = _checked(getattr(config, f.name), hints[f.name], where)
        bounds = f.metadata.get(BOUNDS)
        if bounds is not None and value is not None and not bounds.contains(value):
            raise ConfigError(f"{where} must be in {bounds}, got {value!r}")
        object.__setattr__(config, f.name, value)


def repeated_fields(config: Any) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get(REPEATS))
