"""Resolve a MODEL argument to a DSL module: a registered family, `file.py:factory`, or a
Hugging Face checkpoint directory.

A user's own file is executed (the user named it, exactly as `python file.py` would);
a checkpoint directory never is: its config is JSON and its weights are safetensors.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .checkpoints import HF_ADAPTERS, HFAdapter, SafetensorsWeights, convert_weights, read_config
from .errors import CheckpointError, ConfigError, TgraphError


@dataclass
class LoadedModel:
    module: Any                # a tgraph.dsl.Module with input_specs()
    source: str                # what the user gave
    kind: str                  # "registered", "file" or "checkpoint"
    config: Any = None
    vocab_size: Optional[int] = None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _load_factory_file(spec: str, overrides: Mapping[str, str]) -> LoadedModel:
    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"model file not found: {path}")
    if not factory_name.isidentifier():
        raise ConfigError(f"{spec}: {factory_name!r} is not a function name")
    module_name = f"tgraph_user_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except TgraphError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"{path} has no function {factory_name!r}")
    kwargs = {k: _literal(v) for k, v in overrides.items()}
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ConfigError(f"--set {unknown[0]}: {factory_name}() takes no such argument "
                              f"(it takes: {', '.join(params) or 'nothing'})")
    try:
        model = factory(**kwargs)
    except TgraphError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}:{factory_name}() failed: {type(e).__name__}: {e}") from e
    if not hasattr(model, "input_specs"):
        raise ConfigError(f"{path}:{factory_name}() must return a tgraph Module with an input_specs() method")
    return LoadedModel(model, spec, "file", getattr(model, "config", None), _vocab_of(model))


def _vocab_of(model) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def refuse_missing_path(spec: str) -> None:
    """A MODEL that looks like a path but is none: one wording for every command (not "unknown model")."""
    if spec.endswith((".py", ".onnx", ".json", ".safetensors")) or os.sep in spec or spec.startswith("."):
        raise ConfigError(f"not found or not a model: {spec} (expected a registered model name, "
                          "path/to/file.py:factory, or a checkpoint directory)")


def load_model(spec: str, overrides: Optional[Mapping[str, str]] = None) -> LoadedModel:
    """MODEL -> module. Errors are one line and name the offending file, key or model."""
    from .progress import phase

    with phase("load"):
        return _load_model(spec, dict(overrides or {}))


def _load_model(spec: str, overrides: dict) -> LoadedModel:
    if os.path.isdir(spec):
        return load_checkpoint_model(spec, overrides)
    head, sep, _ = spec.rpartition(":")
    if sep and head.endswith(".py"):
        return _load_factory_file(spec, overrides)
    refuse_missing_path(spec)
    from .models import get_family, make_config
    from .resources import check_fits

    family = get_family(spec)
    config = make_config(family.config_cls, overrides)
    check_fits(family, config, spec)
    model = family.build(config)
    return LoadedModel(model, spec, "registered", config, getattr(config, "vocab_size", None))


# ---------------------------------------------------------------- checkpoint directories
def adapter_for(config: Dict[str, Any], directory: Path) -> HFAdapter:
    from . import models  # noqa: F401  (importing the package registers every family's adapter)

    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{directory / 'config.json'}: no model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{directory / 'config.json'}: model_type must be a string, got {model_type!r}"[:200])
    adapter = HF_ADAPTERS.get(model_type)
    if adapter is None:
        raise ConfigError(f"{directory / 'config.json'}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(sorted(HF_ADAPTERS))})")
    if adapter.accepts is not None:
        reason = adapter.accepts(config)
        if reason:
            raise ConfigError(f"{directory / 'config.json'}: {reason}")
    return adapter


def load_checkpoint_model(directory, overrides: Optional[Mapping[str, str]] = None):
    """A checkpoint directory -> `LoadedModel` with its weights assigned."""
    from .models import get_family, make_config
    from .resources import check_fits

    directory = Path(directory)
    hf = read_config(directory)
    adapter = adapter_for(hf, directory)
    try:
        config = adapter.config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{directory / 'config.json'}: {e}") from None
    source = SafetensorsWeights(directory)
    source.strip_prefixes(adapter.base_prefixes)
    source.rename(adapter.renames)
    if adapter.refine is not None:
        config = adapter.refine(config, source)
    if overrides:
        config = make_config(type(config), overrides, base=config)
    family = get_family(adapter.family)
    check_fits(family, config, str(directory))
    model = family.build(config)
    rules = adapter.weight_map(config)
    weights = convert_weights(source, rules, adapter.ignore, label=str(directory))
    ours = dict(model.named_parameters())
    not_mapped = [n for n in ours if n not in weights]
    if not_mapped:
        raise CheckpointError(f"{directory}: no checkpoint tensor maps to parameter {not_mapped[0]!r}")
    for name, array in weights.items():
        if name not in ours:
            raise CheckpointError(f"{directory}: weight map names unknown parameter {name!r}")
        if tuple(array.shape) != ours[name].shape:
            raise CheckpointError(f"{directory}: tensor {source.original(rules[name][0][0])!r} gives shape "
                                  f"{tuple(array.shape)} but {name} needs {ours[name].shape}")
        ours[name].assign(array, name=f"{directory.name}: {name}")
    return LoadedModel(model, str(directory), "checkpoint", config, getattr(config, "vocab_size", None))
