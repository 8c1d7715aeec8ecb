"""Key/value caches for autoregressive decoding: one graph for prefill and for each step.

A decoder traced with a cache takes, per layer i, the keys and values of the tokens seen so
far and returns them with the new tokens' appended:

    past_key_values.{i}.key / .value   [batch, kv_heads, past_seq, head_dim]   graph inputs
    present.{i}.key / .value           [batch, kv_heads, past_seq + seq, head_dim]  graph outputs
                                       = Concat(past, new, axis=2)

Prefill feeds an empty past (past_seq = 0); each decode step feeds the previous step's
presents. Everything that depends on where the new tokens sit follows the past length:
`tgraph.CausalMask` is aligned to the end of the key axis (query i sees keys j <= i + past;
a local layer's `window` W keeps only j > i + past - W, so the window slides over the past),
the padding mask covers past + new tokens ([batch, past_seq + seq]), and positions start at
past_seq unless the model takes explicit `position_ids` (left-padded batches need them:
position_ids = cumsum(attention_mask) - 1, as Hugging Face computes them in `generate`).

That is the *dynamic* layout (`kv_cache="dynamic"`, what optimum's ORTModelForCausalLM
loads). The *static* layout (`kv_cache="static"`, what generation uses) keeps one
preallocated buffer per layer that attention writes in place, so no shape changes between
decode steps (bench/static_cache.py measured the choice of op):

    past_key_values.{i}.key / .value   [batch, kv_heads, max_length, head_dim]   graph inputs
    present.{i}.key / .value           the same shape: onnxruntime's GroupQueryAttention
                                       writes the new tokens into the past buffer itself
    attention_mask                     [batch, total_sequence_length]: only its row sums
                                       (valid lengths) and its width are read, no 4-D mask

Rows are right-aligned in the buffer (row b's tokens at 0..L_b - 1, L_b the row sum of the
mask); on the first prompt (seq == total_sequence_length) the new tokens sit at 0..seq-1,
afterwards at L_b - seq .. L_b - 1. Positions follow (HF's cumsum(mask) - 1 of a left-padded
batch is the same numbers), and `logits` holds only each row's last real token [batch, 1, V].
This is onnxruntime-genai's decoder interface, so its runtime runs the same graph. A local
(sliding-window) layer keeps the whole buffer and sets GroupQueryAttention's
`local_window_size` = W: query at position p sees buffer positions p - W < j <= p (the same
W keys as `tgraph.CausalMask`'s window; onnxruntime's CPU kernel measured to agree).

Encoder-decoders also cache their **cross-attention** keys and values: they depend only on
the encoder output, so the encoder graph of a generation (part="encoder", use_cache) computes
them once per source, and the cached decoder takes them instead of the encoder states:

    cross_attention.{i}.key / .value   [batch, heads, encoder_seq, head_dim]   encoder outputs,
                                       cached decoder inputs (fed unchanged every step)

With the static layout an encoder-decoder's decoder keeps its self-attention in the fixed
buffers above and reads these cross K/V as ordinary inputs, fixed in shape for one request.
T5's relative position bias goes into GroupQueryAttention's `attention_bias`
[batch, heads, seq, total_sequence_length]: one row per batch entry, from j - p over every buffer
column j (`StaticKVCache.key_offsets`), since each row's queries sit at its own position p.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..errors import ConfigError
from ..ir import DType
from .module import InputSpec
from .tensor import Tensor, TensorOps, _op, arange, as_value, concat, const, where

PAST = "past_key_values.{i}.{kind}"
PRESENT = "present.{i}.{kind}"
PAST_SEQ = "past_seq"
TOTAL_SEQ = "past_seq + seq"      # what Concat infers for the key axis of a present
LAYOUTS = ("dynamic", "static")
MAX_LENGTH = "max_length"         # the static buffer's position axis
STATIC_TOTAL = "total_sequence_length"


def cache_input_specs(num_layers: int, kv_heads: int, head_dim: int, dtype=DType.float32) -> Dict[str, InputSpec]:
    """The past inputs of `num_layers` layers, in layer order, key before value."""
    spec = InputSpec(DType.of(dtype), ("batch", kv_heads, PAST_SEQ, head_dim))
    return {PAST.format(i=i, kind=kind): spec for i in range(num_layers) for kind in ("key", "value")}


def static_cache_input_specs(num_layers: int, kv_heads: int, head_dim: int, dtype=DType.float32
                             ) -> Dict[str, InputSpec]:
    """The per-layer static buffers [batch, kv_heads, max_length, head_dim]."""
    spec = InputSpec(DType.of(dtype), ("batch", kv_heads, MAX_LENGTH, head_dim))
    return {PAST.format(i=i, kind=kind): spec for i in range(num_layers) for kind in ("key", "value")}


def total_mask_spec(layout: str = "dynamic") -> InputSpec:
    """`attention_mask` of a cached graph: 1 for every real token, past and new."""
    return InputSpec(DType.int64, ("batch", STATIC_TOTAL if layout == "static" else TOTAL_SEQ))


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

    layout = "dynamic"

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, TensorOps], num_layers: int) -> "KVCache":
        layers = [LayerCache(*_past_pair(inputs, i, num_layers)) for i in range(num_layers)]
        _refuse_unknown(inputs, num_layers)
        return cls(layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def past_length(self) -> Tensor:
        """past_seq as a 0-d int64, read from the first layer's past keys at run time."""
        return self.layers[0].past_key.shape_of(2, 3).squeeze(0)

    def outputs(self) -> Dict[str, Tensor]:
        return _outputs(self.layers)


# ---------------------------------------------------------------- cross-attention
CROSS = "cross_attention.{i}.{kind}"
ENCODER_SEQ = "encoder_seq"


def cross_attention_specs(num_layers: int, kv_heads: int, head_dim: int, dtype=DType.float32
                          ) -> Dict[str, InputSpec]:
    """The cross-attention keys/values a cached decoder of `num_layers` layers reads."""
    spec = InputSpec(DType.of(dtype), ("batch", kv_heads, ENCODER_SEQ, head_dim))
    return {CROSS.format(i=i, kind=kind): spec for i in range(num_layers) for kind in ("key", "value")}


@dataclass
class CrossLayerCache:
    """One decoder layer's cross-attention keys/values [B, Hkv, S, D], given as graph inputs."""

    key: TensorOps
    value: TensorOps
    layout = "cross"


def cross_attention_caches(inputs: Dict[str, TensorOps], num_layers: int) -> List[CrossLayerCache]:
    """Takes the `cross_attention.{i}.*` entries out of `inputs` (forward's keyword arguments),
    so what remains is the self-attention past."""
    caches = []
    for i in range(num_layers):
        names = [CROSS.format(i=i, kind=kind) for kind in ("key", "value")]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ConfigError(f"cross-attention cache: missing input {missing[0]!r}")
        caches.append(CrossLayerCache(inputs.pop(names[0]), inputs.pop(names[1])))
    return caches


def cross_attention_outputs(attentions, memory: TensorOps) -> Dict[str, Tensor]:
    """What the encoder of a generation returns besides its states: each decoder layer's
    cross-attention keys/values of `memory` [B, S, C] (`attentions`: those layers' attentions)."""
    out: Dict[str, Tensor] = {}
    for i, attn in enumerate(attentions):
        out[CROSS.format(i=i, kind="key")], out[CROSS.format(i=i, kind="value")] = attn.key_values(memory)
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


# ---------------------------------------------------------------- the static layout
@dataclass
class StaticLayerCache:
    """One layer's static buffers; `attend` runs attention and writes the new K/V in place."""

    layout = "static"
    owner: "StaticKVCache"
    past_key: TensorOps
    past_value: TensorOps
    present_key: Optional[Tensor] = None
    present_value: Optional[Tensor] = None

    def attend(self, q: TensorOps, k: TensorOps, v: TensorOps, num_heads: int, kv_heads: int, scale: float,
               rotary_tables=None, window: int = 0, bias: Optional[TensorOps] = None) -> Tensor:
        """q [B, S, Hq*D], k/v [B, S, Hkv*D] -> [B, S, Hq*D]: causal over the row's valid keys
        (only the last `window` of them when window > 0: `local_window_size`).
        `rotary_tables` (cos, sin [max_positions, R/2]) rotates q and k inside the op.
        `bias` [B|1, H|1, S, total_sequence_length] is added to the scores by absolute key
        position (the op's `attention_bias`: T5's relative position bias, `StaticKVCache.key_offsets`)."""
        o = self.owner
        extra = [as_value(t) for t in rotary_tables] if rotary_tables is not None else []
        if bias is not None:              # cos_cache, sin_cache, position_ids left out
            extra = (extra or [None, None]) + [None, as_value(bias)]
        y, pk, pv = _op("GroupQueryAttention", as_value(q), as_value(k), as_value(v), as_value(self.past_key),
                        as_value(self.past_value), as_value(o.seqlens_k), as_value(o.total32), *extra,
                        domain="com.microsoft", num_heads=num_heads, kv_num_heads=kv_heads, scale=float(scale),
                        do_rotary=int(rotary_tables is not None),
                        **({"local_window_size": int(window)} if window > 0 else {}))
        self.present_key, self.present_value = Tensor(pk), Tensor(pv)
        return Tensor(y)


class StaticKVCache:
    """A decoder's static buffers plus what every layer reads of the mask, built once:
    seqlens_k (L_b - 1, int32 [B]), the mask width (int32), the new tokens' positions
    [B, S] and each row's last real token among them ([B])."""

    layout = "static"

    def __init__(self, past: Mapping[str, TensorOps], num_layers: int, input_ids: TensorOps,
                 attention_mask: Optional[TensorOps]):
        if attention_mask is None:
            raise ConfigError("static KV cache: the decoder needs an attention_mask input (its row sums are the "
                              "valid lengths)")
        self.layers = [StaticLayerCache(self, past_key, past_value) for past_key, past_value in
                       (_past_pair(past, i, num_layers) for i in range(num_layers))]
        _refuse_unknown(past, num_layers)
        lengths = attention_mask.sum(axis=1, keepdims=False)                        # L_b: (B,) int64
        total = attention_mask.shape_of(1, 2).squeeze(0)                            # () int64
        seq = input_ids.shape_of(1, 2).squeeze(0)                                   # () int64
        self.seqlens_k = (lengths - 1).cast(DType.int32)
        self.total32 = total.cast(DType.int32)
        starts = where(seq.eq(total), np.array(0, np.int64), lengths - seq)       # (B,)
        self.positions = starts.unsqueeze(1) + arange(0, seq).unsqueeze(0)          # (B, S)
        self.last_index = lengths - starts - 1                                      # (B,)
        self.total = total

    def key_offsets(self) -> Tensor:
        """j - p for every buffer column j < total_sequence_length and new-token position p:
        (B, S, total) int64, what a relative position bias over the buffer is indexed by."""
        return arange(0, self.total).unsqueeze(0, 1) - self.positions.unsqueeze(2)   # (1, 1, L) - (B, S, 1)

    def __getitem__(self, i: int) -> StaticLayerCache:
        return self.layers[i]

    def last_tokens(self, x: TensorOps) -> Tensor:
        """x [B, S, C] -> [B, 1, C]: each row's last real token (the only logits generation reads)."""
        idx = self.last_index.unsqueeze(1, 2)                                       # (B, 1, 1)
        shape = concat([x.shape_of(0, 1), const(np.array([1], np.int64)), x.shape_of(2, 3)], axis=0)
        return Tensor(_op("GatherElements", as_value(x), as_value(idx.expand(shape)), axis=1))

    def rotary_tables(self, rotary, max_positions: int, dtype=DType.float32):
        """cos/sin [max_positions, R/2] constants for the op's own rotary, or None where
        onnxruntime's kernel cannot take them (R/2 must be a multiple of 8) or where the
        frequencies depend on the run's length (dynamic NTK, LongRoPE)."""
        if (rotary.dim // 2) % 8:
            return None
        tables = rotary.table_arrays(max_positions, DType.of(dtype).numpy)
        if tables is None:
            return None
        return Tensor(const(tables[0])), Tensor(const(tables[1]))

    def outputs(self) -> Dict[str, Tensor]:
        return _outputs(self.layers)


def _past_pair(inputs: Mapping[str, TensorOps], i: int, num_layers: int):
    names = [PAST.format(i=i, kind=kind) for kind in ("key", "value")]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ConfigError(f"KV cache: missing input {missing[0]!r} (a cached decoder of {num_layers} layers "
                          f"takes {PAST.format(i='{i}', kind='key|value')} for i < {num_layers})")
    return inputs[names[0]], inputs[names[1]]


def _refuse_unknown(inputs: Mapping[str, TensorOps], num_layers: int) -> None:
    unknown = sorted(set(inputs) - {PAST.format(i=i, kind=k) for i in range(num_layers) for k in ("key", "value")})
    if unknown:
        raise ConfigError(f"KV cache: unexpected input {unknown[0]!r}")


def _outputs(layers) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    for i, layer in enumerate(layers):
        if layer.present_key is None:
            raise ConfigError(f"KV cache: layer {i} never used its cache (no attention called with it)")
        out[PRESENT.format(i=i, kind="key")] = layer.present_key
        out[PRESENT.format(i=i, kind="value")] = layer.present_value
    return out
