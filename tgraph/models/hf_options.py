"""Hugging Face config.json options shared by the decoder families: rotary settings and
activation names.

Rotary settings come in two layouts found in the wild: transformers >= 5 writes
`rope_parameters: {rope_type, rope_theta, partial_rotary_factor}`; older checkpoints
carry `rope_theta` (GPT-NeoX: `rotary_emb_base`, `rotary_pct`) at the top level and a
`rope_scaling` dict (`type` or `rope_type`). A family that passes `scaling=True` gets the
scaling types of `tgraph.dsl.rope_scaling` (linear, dynamic, yarn, llama3, longrope) as a
`RopeScaling`; other families, and other types, are refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..dsl.rope_scaling import TYPES as SCALING_TYPES, RopeScaling
from ..errors import ConfigError


@dataclass(frozen=True)
class HFRope:
    theta: float
    partial_rotary_factor: float
    scaling: Optional[RopeScaling] = None


def _rope_type(params: Mapping[str, Any], key: str, model_type: str, scaling: bool) -> Optional[str]:
    """The scaling type named in `params` (None: plain RoPE); ConfigError for one not supported."""
    for type_key in ("rope_type", "type"):
        value = params.get(type_key)
        if value is None or value == "default":
            continue
        if not scaling or value not in SCALING_TYPES:
            supported = ", ".join(("default",) + (SCALING_TYPES if scaling else ()))
            raise ConfigError(f"{model_type}: config option {key}.{type_key}={value!r} is not supported "
                              f"(supported rope types: {supported})")
        return value
    return None


def _number(params: Mapping[str, Any], name: str, where: str, required: bool = False,
            integer: bool = False) -> Optional[float]:
    value = params.get(name)
    if value is None:
        if required:
            raise ConfigError(f"{where}: {name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (integer and value != int(value)):
        raise ConfigError(f"{where}: {name}={value!r} must be a finite {'integer' if integer else 'number'}")
    return int(value) if integer else float(value)


def _factors(params: Mapping[str, Any], name: str, where: str):
    value = params.get(name)
    if not isinstance(value, (list, tuple)) or not value or \
            any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                for v in value):
        raise ConfigError(f"{where}: {name} must be a list of positive numbers, got {value!r}"[:200])
    return tuple(float(v) for v in value)


def scaling_from_hf(rope_type: str, params: Mapping[str, Any], hf: Mapping[str, Any], where: str) -> RopeScaling:
    """A `RopeScaling` from HF's rope dict, with transformers' defaults (modeling_rope_utils and
    `standardize_rope_params`): L₀ is a top-level original_max_position_embeddings if there is one
    (Phi-3), else the dict's, else max_position_embeddings; dynamic NTK uses max_position_embeddings."""
    max_pos = _number(hf, "max_position_embeddings", where, integer=True)
    if rope_type == "dynamic":
        original = max_pos
        if original is None:
            raise ConfigError(f"{where}: dynamic scaling needs max_position_embeddings")
    else:
        original = _number(hf, "original_max_position_embeddings", where, integer=True)
        if original is None:
            original = _number(params, "original_max_position_embeddings", where, integer=True)
        if original is None:
            original = max_pos
    for name, value in (("max_position_embeddings", max_pos), ("original_max_position_embeddings", original)):
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: {name}={value!r} must be positive")
    factor = _number(params, "factor", where, required=rope_type in ("linear", "dynamic", "llama3"))
    if factor is None and rope_type in ("yarn", "longrope"):
        if max_pos is None or original is None:
            raise ConfigError(f"{where}: factor is required (or max_position_embeddings and "
                              "original_max_position_embeddings)")
        factor = max_pos / original
    kw: dict = {}
    if rope_type == "llama3":
        kw = dict(low_freq_factor=_number(params, "low_freq_factor", where, required=True),
                  high_freq_factor=_number(params, "high_freq_factor", where, required=True))
    elif rope_type == "yarn":
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigError(f"{where}: truncate={truncate!r} must be true or false")
        kw = dict(attention_factor=_number(params, "attention_factor", where),
                  beta_fast=_number(params, "beta_fast", where) or 32.0,
                  beta_slow=_number(params, "beta_slow", where) or 1.0,
                  mscale=_number(params, "mscale", where), mscale_all_dim=_number(params, "mscale_all_dim", where),
                  truncate=truncate)
    elif rope_type == "longrope":
        kw = dict(attention_factor=_number(params, "attention_factor", where),
                  short_factor=_factors(params, "short_factor", where),
                  long_factor=_factors(params, "long_factor", where))
    try:
        return RopeScaling(rope_type, factor=factor, original_max_positions=original, **kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


def rope_from_hf(hf: Mapping[str, Any], model_type: str, default_theta: float = 10000.0,
                 default_partial: float = 1.0, theta_alias: Optional[str] = None,
                 partial_alias: Optional[str] = None, scaling: bool = False) -> HFRope:
    """(theta, partial_rotary_factor, scaling); ConfigError naming the key for a rope scaling the
    family does not take (`scaling=False`) or that is not implemented."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{model_type}: config option rope_parameters={params!r} is not a JSON object")
    params = dict(params or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError(f"{model_type}: config option rope_parameters with per-layer-type settings "
                          f"({', '.join(sorted(params))}) is not supported")
    rope_type = _rope_type(params, "rope_parameters", model_type, scaling)
    key = "rope_parameters"
    legacy = hf.get("rope_scaling")
    if legacy is not None:
        if not isinstance(legacy, Mapping):
            raise ConfigError(f"{model_type}: config option rope_scaling={legacy!r} is not supported")
        legacy_type = _rope_type(legacy, "rope_scaling", model_type, scaling)
        if rope_type is None and legacy_type is not None:
            rope_type, key = legacy_type, "rope_scaling"
        params = {**legacy, **params}

    def pick(name: str, alias: Optional[str], default: float) -> float:
        for source, key in ((params, name), (hf, name), (hf, alias)):
            if key is not None and source.get(key) is not None:
                value = source[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"{model_type}: config option {key}={value!r} must be a finite number")
                return float(value)
        return float(default)

    theta = pick("rope_theta", theta_alias, default_theta)
    partial = pick("partial_rotary_factor", partial_alias, default_partial)
    if not theta > 0:
        raise ConfigError(f"{model_type}: config option rope_theta={theta!r} must be positive")
    if not 0.0 < partial <= 1.0:
        raise ConfigError(f"{model_type}: config option partial_rotary_factor={partial!r} must be in (0, 1]")
    found = scaling_from_hf(rope_type, params, hf, f"{model_type}: config option {key}") if rope_type else None
    return HFRope(theta, partial, found)


# HF `hidden_act` names -> ours; anything else is refused (no silent approximation).
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",                                   # ACT2FN["gelu"]: exact erf GELU
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def activation_from_hf(hf: Mapping[str, Any], model_type: str, default: str, key: str = "hidden_act") -> str:
    value = hf.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, str) or value not in HF_ACTIVATIONS:
        raise ConfigError(f"{model_type}: config option {key}={value!r} is not supported "
                          f"(supported: {', '.join(sorted(HF_ACTIVATIONS))})")
    return HF_ACTIVATIONS[value]
