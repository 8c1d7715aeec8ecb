"""Key/value caches for autoregressive decoding: one graph for prefill and for each step.

A decoder traced with a cache takes, per layer i, the keys and values of the tokens seen so
far and returns them with the new tokens' appended:

    past_key_values.{i}.key / .value   [batch, kv_heads, past_seq, head_dim]   graph inputs
    present.{i}.key / .value           [batch, kv_heads, past_seq + seq, head_dim]  graph outputs
                                       = Concat(past, new, axis=2)

Prefill feeds an empty past (past_seq = 0); each decode step feeds the previous step's
presents. Everything that depends on where the new tokens sit follows the past length:
`tgraph.CausalMask` is aligned to the end of the key axis (query i sees keys j <= i + past),
the padding mask covers past + new tokens ([batch, past_seq + seq]), and positions start at
past_seq unless the model takes explicit `position_ids` (left-padded batches need them:
position_ids = cumsum(attention_mask) - 1, as Hugging Face computes them in `generate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

from ..errors import ConfigError
from ..ir import DType
from .module import InputSpec
from .tensor import Tensor, TensorOps, arange, concat

PAST = "past_key_values.{i}.{kind}"
PRESENT = "present.{i}.{kind}"
PAST_SEQ = "past_seq"
TOTAL_SEQ = "past_seq + seq"      # what Concat infers for the key axis of a present


def cache_input_specs(num_layers: int, kv_heads: int, head_dim: int, dtype=DType.float32) -> Dict[str, InputSpec]:
    """The past inputs of `num_layers` layers, in layer order, key before value."""
    spec = InputSpec(DType.of(dtype), ("batch", kv_heads, PAST_SEQ, head_dim))
    return {PAST.format(i=i, kind=kind): spec for i in range(num_layers) for kind in ("key", "value")}


def total_mask_spec() -> InputSpec:
    """`attention_mask` of a cached graph: 1 for every real token, past and new."""
    return InputSpec(DType.int64, ("batch", TOTAL_SEQ))


def position_ids_spec() -> InputSpec:
    return InputSpec(DType.int64, ("batch", "seq"))


@dataclass
class LayerCache:
    """One attention layer's past K/V (inputs) and, once the layer ran, its present K/V."""

    past_key: TensorOps
    past_value: TensorOps
    present_key: Optional[Tensor] = None
    present_value: Optional[Tensor] = None

    def update(self, k: TensorOps, v: TensorOps):
        """Append the new tokens' keys/values [B, Hkv, T, D] to the past; returns the full K, V."""
        self.present_key = concat([self.past_key, k], axis=2)           # (B, Hkv, P + T, D)
        self.present_value = concat([self.past_value, v], axis=2)       # (B, Hkv, P + T, D)
        return self.present_key, self.present_value


class KVCache:
    """The past inputs of a whole decoder, taken from `forward`'s keyword arguments."""

    def __init__(self, layers: List[LayerCache]):
        self.layers = layers

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, TensorOps], num_layers: int) -> "KVCache":
        layers = []
        for i in range(num_layers):
            names = [PAST.format(i=i, kind=kind) for kind in ("key", "value")]
            missing = [n for n in names if n not in inputs]
            if missing:
                raise ConfigError(f"KV cache: missing input {missing[0]!r} (a cached decoder of {num_layers} layers "
                                  f"takes {PAST.format(i='{i}', kind='key|value')} for i < {num_layers})")
            layers.append(LayerCache(inputs[names[0]], inputs[names[1]]))
        unknown = sorted(set(inputs) - {PAST.format(i=i, kind=k) for i in range(num_layers) for k in ("key", "value")})
        if unknown:
            raise ConfigError(f"KV cache: unexpected input {unknown[0]!r}")
        return cls(layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def past_length(self) -> Tensor:
        """past_seq as a 0-d int64, read from the first layer's past keys at run time."""
        return self.layers[0].past_key.shape_of(2, 3).squeeze(0)

    def outputs(self) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            if layer.present_key is None:
                raise ConfigError(f"KV cache: layer {i} never used its cache (no attention called with it)")
            out[PRESENT.format(i=i, kind="key")] = layer.present_key
            out[PRESENT.format(i=i, kind="value")] = layer.present_value
        return out


def layer_caches(cache: Optional[KVCache], num_layers: int) -> List[Optional[LayerCache]]:
    """cache[i] for each layer, or None everywhere when the graph has no cache."""
    return list(cache.layers) if cache is not None else [None] * num_layers


def positions(input_ids: TensorOps, past_length: Optional[TensorOps] = None,
              position_ids: Optional[TensorOps] = None) -> Tensor:
    """Position ids of the new tokens: explicit [B, T] ids, or past .. past + T - 1 as (T,)."""
    if position_ids is not None:
        return position_ids if isinstance(position_ids, Tensor) else Tensor(position_ids._value())
    seq = input_ids.shape_of(1, 2).squeeze(0)                           # T, a 0-d runtime length
    if past_length is None:
        return arange(0, seq)                                           # (T,)
    return arange(past_length, past_length + seq)                       # (T,)
