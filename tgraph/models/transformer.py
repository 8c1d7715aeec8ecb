"""The original encoder-decoder Transformer ("Attention Is All You Need", Vaswani et al. 2017).

Post-LN residual blocks, LayerNorm(x + Sublayer(x)); ReLU feed-forward; sinusoidal
positions; one embedding matrix shared by encoder, decoder and the pre-softmax
projection, with embeddings scaled by √d_model.

For generation, part="encoder" with use_cache also returns every decoder layer's
cross-attention keys/values, which the cached decoder reads instead of the encoder states
(`tgraph.dsl.cache.CROSS`): projected once per source, not once per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..dsl import (Embedding, FeedForward, InputSpec, LayerNorm, Module, ModuleList, MultiHeadAttention,
                   SinusoidalPositions, padding_keep_mask)
from ..dsl.cache import cross_attention_caches, cross_attention_outputs, cross_attention_specs, layer_caches
from ..errors import ConfigError
from ..ir import DType
from .decoding import (cache_length, check_cache_options, decoder_input_specs, decoder_state, encoder_states_specs,
                       last_tokens, token_positions)
from .config_checks import check_fields, epsilon, repeated
from .registry import register_model


@dataclass
class TransformerConfig:
    vocab_size: int = 37000          # the paper's shared source/target BPE vocabulary
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = repeated(6)  # encoder blocks
    num_decoder_layers: int = repeated(6)
    max_len: int = 1024              # positions of the sinusoidal table: the longest sequence
    layer_norm_eps: float = epsilon(1e-5)
    use_attention_mask: bool = True  # adds the `attention_mask` input (source padding)
    part: str = "full"               # "encoder" | "decoder": export one half (generation runs the encoder once)
    use_cache: bool = False          # KV-cache decoder (self-attention cache, reads cross K/V); encoder: returns cross K/V
    use_position_ids: Optional[bool] = None   # explicit position_ids input; None: = use_cache
    kv_cache: str = "dynamic"        # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0            # positions of a static cache (0: max_len, capped at 4096)

    def __post_init__(self):
        check_fields(self, "transformer")
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"transformer: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"transformer: d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads})")
        if self.d_model % 2:
            raise ConfigError(f"transformer: d_model ({self.d_model}) must be even for sinusoidal positions")
        if self.num_encoder_layers < 0 or self.num_decoder_layers < 1:
            raise ConfigError("transformer: needs num_encoder_layers >= 0 and num_decoder_layers >= 1")
        check_cache_options(self, "transformer", encoder_decoder=True)
        cache_length(self, self.max_len)


class EncoderLayer(Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads)
        self.self_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.ffn = FeedForward(c.d_model, c.d_ff, act="relu")
        self.ffn_norm = LayerNorm(c.d_model, c.layer_norm_eps)

    def forward(self, x, keep):                                   # x: (B, S, C)
        x = self.self_attn_norm(x + self.self_attn(x, keep_mask=keep))
        return self.ffn_norm(x + self.ffn(x))


class DecoderLayer(Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, causal=True)
        self.self_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(c.d_model, c.num_heads)
        self.cross_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.ffn = FeedForward(c.d_model, c.d_ff, act="relu")
        self.ffn_norm = LayerNorm(c.d_model, c.layer_norm_eps)

    def forward(self, y, memory, keep, cache=None, cross=None):    # y: (B, T, C), memory: (B, S, C) or cross K/V
        y = self.self_attn_norm(y + self.self_attn(y, cache=cache))
        y = self.cross_attn_norm(y + self.cross_attn(y, kv=memory, keep_mask=keep, cache=cross))
        return self.ffn_norm(y + self.ffn(y))


class Transformer(Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = self.config = config
        self.embed = Embedding(c.vocab_size, c.d_model, std=c.d_model ** -0.5)
        self.positions = SinusoidalPositions(c.d_model, c.max_len)
        self.encoder = ModuleList([EncoderLayer(c) for _ in range(c.num_encoder_layers)])
        self.decoder = ModuleList([DecoderLayer(c) for _ in range(c.num_decoder_layers)])

    def input_specs(self):
        c = self.config
        ids = InputSpec(DType.int64, ("batch", "seq"))
        if c.part == "decoder":           # with a cache, the encoder's cross-attention K/V instead of its states
            head_dim = c.d_model // c.num_heads
            cross = cross_attention_specs(c.num_decoder_layers, c.num_heads, head_dim) if c.use_cache else {}
            return {**decoder_input_specs(c, c.num_decoder_layers, c.num_heads, head_dim, mask=False), **cross,
                    **encoder_states_specs(c.d_model, mask=c.use_attention_mask, states=not c.use_cache)}
        specs = {"input_ids": ids}
        if c.part == "full":
            specs["decoder_input_ids"] = InputSpec(DType.int64, ("batch", "decoder_seq"))
        if c.use_attention_mask:
            specs["attention_mask"] = ids
        return specs

    def embed_tokens(self, ids, position_ids=None):
        return self.positions(self.embed(ids) * math.sqrt(self.config.d_model), position_ids=position_ids)  # (B, T, C)

    def encode(self, input_ids, keep):
        memory = self.embed_tokens(input_ids)
        for layer in self.encoder:
            memory = layer(memory, keep)
        return memory                                                # (B, S, C)

    def decode(self, ids, memory, keep, cache=None, position_ids=None, cross=None):
        pos = token_positions(cache, ids, position_ids)              # None, (T,) or (B, T)
        y = self.embed_tokens(ids, pos)
        for layer, layer_cache, layer_cross in zip(self.decoder, layer_caches(cache, len(self.decoder)),
                                                   cross or [None] * len(self.decoder)):
            y = layer(y, memory, keep, layer_cache, layer_cross)
        return last_tokens(cache, y) @ self.embed.weight.swap_last()  # (B, T, C) @ (C, V) -> (B, T, V); static: T = 1

    def forward(self, input_ids, decoder_input_ids=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, position_ids=None, **past):
        c = self.config
        if c.part == "decoder":           # attention_mask: a static cache's valid lengths (no target padding)
            keep = padding_keep_mask(encoder_attention_mask) if encoder_attention_mask is not None else None
            past = dict(past)
            cross = cross_attention_caches(past, c.num_decoder_layers) if c.use_cache else None
            _, cache, _ = decoder_state(c, c.num_decoder_layers, attention_mask, past, input_ids)
            logits = self.decode(input_ids, encoder_hidden_states, keep, cache, position_ids, cross)
            return {"logits": logits, **(cache.outputs() if cache else {})}
        keep = padding_keep_mask(attention_mask) if attention_mask is not None else None  # (B, 1, 1, S)
        memory = self.encode(input_ids, keep)
        if c.part == "encoder":
            cross = cross_attention_outputs([layer.cross_attn for layer in self.decoder], memory) if c.use_cache else {}
            return {"last_hidden_state": memory, **cross}
        return {"logits": self.decode(decoder_input_ids, memory, keep)}


@register_model("transformer", TransformerConfig)
def build(config: TransformerConfig) -> Transformer:
    return Transformer(config)
