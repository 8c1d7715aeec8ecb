"""Config options shared by every decoder that can export a KV cache (see `tgraph.dsl.cache`).

Each such config has `use_cache: bool = False` and `use_position_ids: Optional[bool] = None`;
encoder-decoders also have `part` ("full" | "encoder" | "decoder"): with use_cache, the
encoder also returns `cross_attention.{i}.key/value` [batch, heads, encoder_seq, head_dim]
and the decoder reads them (with encoder_attention_mask) instead of encoder_hidden_states.
These helpers check them and build the decoder's input specs, so every family names its
inputs alike:

    input_ids         [batch, seq]
    attention_mask    [batch, seq], or [batch, past_seq + seq] with a cache (past + new tokens)
    position_ids      [batch, seq]  with a cache, unless use_position_ids=False (then positions
                                    are past_seq .. past_seq + seq - 1, read from the past's shape)
    past_key_values.{i}.key / .value  [batch, kv_heads, past_seq, head_dim]

`kv_cache="static"` (with use_cache) gives the static layout of `tgraph.dsl.cache` instead:
attention_mask [batch, total_sequence_length], no position_ids, per-layer buffers
[batch, kv_heads, max_length, head_dim] written in place, logits of the last token only.
`cache_length` sizes the rotary tables of a static graph (0: the model's positions, capped at
DEFAULT_CACHE_LENGTH). An
encoder-decoder's static decoder (part="decoder") takes the same inputs plus the encoder's
cross-attention K/V and encoder_attention_mask.
"""
from __future__ import annotations

from typing import Any, Dict

from ..dsl import InputSpec, padding_keep_mask
from ..dsl.cache import (LAYOUTS, KVCache, StaticKVCache, cache_input_specs, layer_caches, position_ids_spec,
                         positions as dynamic_positions, static_cache_input_specs, total_mask_spec)
from ..errors import ConfigError
from ..ir import DType

PARTS = ("full", "encoder", "decoder")
DEFAULT_CACHE_LENGTH = 4096        # positions of a static cache when neither the model nor the user says


def is_static(config: Any) -> bool:
    return bool(getattr(config, "use_cache", False)) and getattr(config, "kv_cache", "dynamic") == "static"


def cache_length(config: Any, position_limit: Any = None) -> int:
    """How many positions a static cache holds: `cache_length`, else the model's positions
    (capped at DEFAULT_CACHE_LENGTH); never more than the model's positions.

    `position_limit` is a hard limit (a learned or sinusoidal table). A rotary model has none,
    but its checkpoint says how many positions it was trained for (`trained_positions`, HF's
    max_position_embeddings): that sizes the default cache, and an explicit cache_length may
    exceed it (rotary positions extrapolate, as in HF)."""
    limit = int(position_limit) if position_limit else None
    asked = int(getattr(config, "cache_length", 0) or 0)
    if asked and limit and asked > limit:
        raise ConfigError(f"--set cache_length={asked} exceeds the model's {limit} positions")
    positions = limit or int(getattr(config, "trained_positions", 0) or 0) or DEFAULT_CACHE_LENGTH
    return asked or min(positions, DEFAULT_CACHE_LENGTH)


def check_cache_options(config: Any, family: str, encoder_decoder: bool = False) -> None:
    """An encoder-decoder's use_cache applies to a half: the cached decoder reads the
    cross-attention keys/values (`tgraph.dsl.cache.CROSS`) that its part='encoder' computes."""
    layout = getattr(config, "kv_cache", "dynamic")
    if layout not in LAYOUTS:
        raise ConfigError(f"{family}: kv_cache must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if int(getattr(config, "cache_length", 0) or 0) < 0:
        raise ConfigError(f"{family}: cache_length must be >= 0, got {config.cache_length}")
    if layout == "static" and getattr(config, "use_position_ids", None):
        raise ConfigError(f"{family}: --set kv_cache=static computes positions from attention_mask; "
                          "--set use_position_ids=true is for the dynamic cache")
    if getattr(config, "use_position_ids", None) and not config.use_cache:
        raise ConfigError(f"{family}: --set use_position_ids=true needs --set use_cache=true")
    if encoder_decoder:
        if config.part not in PARTS:
            raise ConfigError(f"{family}: part must be one of {', '.join(PARTS)}, got {config.part!r}")
        if config.use_cache and config.part == "full":
            raise ConfigError(f"{family}: --set use_cache=true needs --set part=decoder or --set part=encoder (the "
                              "encoder then also returns each decoder layer's cross-attention keys/values, which "
                              "the cached decoder reads)")


def wants_position_ids(config: Any) -> bool:
    """`use_position_ids=None` (the default) follows use_cache."""
    explicit = getattr(config, "use_position_ids", None)
    return bool(config.use_cache if explicit is None else explicit)


def decoder_input_specs(config: Any, num_layers: int, kv_heads: int, head_dim: int, mask: bool = True,
                        positions: bool = True) -> Dict[str, InputSpec]:
    """input_ids (+ attention_mask); with a cache also position_ids (if `positions` and wanted)
    and the past inputs, the mask then covering past + new tokens."""
    ids = InputSpec(DType.int64, ("batch", "seq"))
    specs = {"input_ids": ids}
    if is_static(config):                  # the mask's row sums are the valid lengths: always there
        specs["attention_mask"] = total_mask_spec("static")
        specs.update(static_cache_input_specs(num_layers, kv_heads, head_dim))
        return specs
    if mask:
        specs["attention_mask"] = total_mask_spec() if config.use_cache else ids
    if config.use_cache:
        if positions and wants_position_ids(config):
            specs["position_ids"] = position_ids_spec()
        specs.update(cache_input_specs(num_layers, kv_heads, head_dim))
    return specs


def encoder_states_specs(d_model: int, mask: bool = True, states: bool = True) -> Dict[str, InputSpec]:
    """What a split decoder (part='decoder') reads from the encoder's run; `states=False` for
    one that reads the cross-attention keys/values instead (`tgraph.dsl.cache.CROSS`)."""
    specs = {"encoder_hidden_states": InputSpec(DType.float32, ("batch", "encoder_seq", d_model))} if states else {}
    if mask:
        specs["encoder_attention_mask"] = InputSpec(DType.int64, ("batch", "encoder_seq"))
    return specs


def lm_logits(x, tokens, head=None):
    """Logits from the tied token embedding (x Eᵀ), or from an untied head (a `Linear`)."""
    if head is not None:
        return head(x)                                        # (B, T, C) @ (C, V) -> (B, T, V)
    return x @ tokens.weight.swap_last()                      # (B, T, C) @ (C, V) -> (B, T, V)


def decoder_state(config: Any, num_layers: int, attention_mask, past: Dict[str, Any], input_ids=None):
    """What every decoder-only forward starts from: the padding keep-mask (B, 1, 1, P + T) or
    None, the KV cache (None without `use_cache`) and one per-layer cache slot per layer.
    A static cache reads valid lengths, not a mask: keep is None."""
    if is_static(config):
        cache = StaticKVCache(past, num_layers, input_ids, attention_mask)
        return None, cache, list(cache.layers)
    keep = padding_keep_mask(attention_mask) if attention_mask is not None else None
    cache = KVCache.from_inputs(past, num_layers) if config.use_cache else None
    return keep, cache, layer_caches(cache, num_layers)


def token_positions(cache, input_ids, position_ids=None):
    """Positions of the new tokens: the static cache's (B, S), past .. past + T - 1 after a
    dynamic past (or explicit ids), None without a cache (the model counts from 0)."""
    if cache is None:
        return None
    if cache.layout == "static":
        return cache.positions
    return dynamic_positions(input_ids, cache.past_length(), position_ids)


def rotary_for(cache, rotary, input_ids, pos, config: Any):
    """What the attention layers take as `rotary`: the static cache's in-op tables where the
    op can rotate, else the callable bound to the positions."""
    if cache is not None and cache.layout == "static":
        tables = cache.rotary_tables(rotary, cache_length(config))
        if tables is not None:
            return tables
    return rotary.bind(input_ids, positions=pos)


def last_tokens(cache, x):
    """A static cache's graph computes logits only at each row's last real token."""
    return cache.last_tokens(x) if cache is not None and cache.layout == "static" else x
