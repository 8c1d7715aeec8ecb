"""Hugging Face config.json options shared by the decoder families: rotary settings and
activation names.

Rotary settings come in two layouts found in the wild: transformers >= 5 writes
`rope_parameters: {rope_type, rope_theta, partial_rotary_factor}`; older checkpoints
carry `rope_theta` (GPT-NeoX: `rotary_emb_base`, `rotary_pct`) at the top level and a
`rope_scaling` dict. Only plain RoPE is implemented: every scaling type (linear, dynamic,
yarn, llama3, longrope ...) changes the numerics and is refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class HFRope:
    theta: float
    partial_rotary_factor: float


def _check_default(params: Mapping[str, Any], key: str, model_type: str) -> None:
    for type_key in ("rope_type", "type"):
        value = params.get(type_key)
        if value is not None and value != "default":
            raise ConfigError(f"{model_type}: config option {key}.{type_key}={value!r} is not supported "
                              "(only plain rotary embeddings, rope_type 'default')")


def rope_from_hf(hf: Mapping[str, Any], model_type: str, default_theta: float = 10000.0,
                 default_partial: float = 1.0, theta_alias: Optional[str] = None,
                 partial_alias: Optional[str] = None) -> HFRope:
    """(theta, partial_rotary_factor); ConfigError naming the key for any rope scaling."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{model_type}: config option rope_parameters={params!r} is not a JSON object")
    params = dict(params or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError(f"{model_type}: config option rope_parameters with per-layer-type settings "
                          f"({', '.join(sorted(params))}) is not supported")
    _check_default(params, "rope_parameters", model_type)
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise ConfigError(f"{model_type}: config option rope_scaling={scaling!r} is not supported")
        _check_default(scaling, "rope_scaling", model_type)
        params = {**scaling, **params}

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
    return HFRope(theta, partial)


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
