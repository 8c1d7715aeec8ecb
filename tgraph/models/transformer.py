"""The original encoder-decoder Transformer ("Attention Is All You Need", Vaswani et al. 2017).

Post-LN residual blocks, LayerNorm(x + Sublayer(x)); ReLU feed-forward; sinusoidal
positions; one embedding matrix shared by encoder, decoder and the pre-softmax
projection, with embeddings scaled by √d_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..dsl import (Embedding, FeedForward, InputSpec, LayerNorm, Module, ModuleList, MultiHeadAttention,
                   SinusoidalPositions, padding_keep_mask)
from ..errors import ConfigError
from ..ir import DType
from .registry import register_model


@dataclass
class TransformerConfig:
    vocab_size: int = 37000          # the paper's shared source/target BPE vocabulary
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_len: int = 1024
    layer_norm_eps: float = 1e-5
    use_attention_mask: bool = True  # adds the `attention_mask` input (source padding)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"transformer: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"transformer: d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads})")
        if self.d_model % 2:
            raise ConfigError(f"transformer: d_model ({self.d_model}) must be even for sinusoidal positions")
        if self.num_encoder_layers < 0 or self.num_decoder_layers < 1:
            raise ConfigError("transformer: needs num_encoder_layers >= 0 and num_decoder_layers >= 1")


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

    def forward(self, y, memory, keep):                            # y: (B, T, C), memory: (B, S, C)
        y = self.self_attn_norm(y + self.self_attn(y))
        y = self.cross_attn_norm(y + self.cross_attn(y, kv=memory, keep_mask=keep))
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
        ids = InputSpec(DType.int64, ("batch", "seq"))
        specs = {"input_ids": ids, "decoder_input_ids": InputSpec(DType.int64, ("batch", "decoder_seq"))}
        if self.config.use_attention_mask:
            specs["attention_mask"] = ids
        return specs

    def embed_tokens(self, ids):
        return self.positions(self.embed(ids) * math.sqrt(self.config.d_model))   # (B, T, C)

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        keep = padding_keep_mask(attention_mask) if attention_mask is not None else None  # (B, 1, 1, S)
        memory = self.embed_tokens(input_ids)
        for layer in self.encoder:
            memory = layer(memory, keep)
        y = self.embed_tokens(decoder_input_ids)
        for layer in self.decoder:
            y = layer(y, memory, keep)
        logits = y @ self.embed.weight.swap_last()                  # (B, T, C) @ (C, V) -> (B, T, V)
        return {"logits": logits}


@register_model("transformer", TransformerConfig)
def build(config: TransformerConfig) -> Transformer:
    return Transformer(config)
