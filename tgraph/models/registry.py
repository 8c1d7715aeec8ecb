"""Registered model families: name -> (config dataclass, builder).

`--set key=value` overrides are parsed by the config field's declared type, so a typo
or a wrong type is a one-line `ConfigError` naming the field, never a silent string.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from ..errors import ConfigError
from ..suggest import did_you_mean


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config_cls: type
    build: Callable[[Any], Any]


MODELS: Dict[str, ModelFamily] = {}


def register_model(name: str, config_cls: type):
    def deco(fn):
        MODELS[name] = ModelFamily(name, config_cls, fn)
        return fn
    return deco


def get_family(name: str) -> ModelFamily:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}{did_you_mean(name, MODELS)}; registered: "
                          f"{', '.join(sorted(MODELS))} (`tgraph models`), or give path/to/file.py:factory "
                          "or a checkpoint directory") from None


def parse_value(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return parse_value(text, args[0], key)
    try:
        if annotation is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
    except ValueError:
        raise ConfigError(f"--set {key}={text}: expected {annotation.__name__}") from None
    raise ConfigError(f"--set {key}: field type {annotation} cannot be set from the command line")


def make_config(config_cls: type, overrides: Optional[Mapping[str, Any]] = None, base: Any = None):
    """A config from defaults (or `base`) plus overrides; string values are parsed by field type."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        family = next((m.name for m in MODELS.values() if m.config_cls is config_cls), None)
        listing = f"`tgraph config {family}` lists them" if family else f"keys: {', '.join(sorted(fields))}"
        raise ConfigError(f"--set {unknown[0]}: {config_cls.__name__} has no such key"
                          f"{did_you_mean(unknown[0], fields)}; {listing}")
    values = {k: parse_value(v, hints[k], k) if isinstance(v, str) and hints[k] is not str else v
              for k, v in overrides.items()}
    if base is not None:
        return dataclasses.replace(base, **values)
    return config_cls(**values)
