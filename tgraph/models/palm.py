"""PaLM (Chowdhery et al. 2022): a decoder whose attention and MLP read the same input in parallel.

    y = x + Attn(LN(x)) + MLP(LN(x))        instead of the serial  h = x + Attn(LN(x)); y = h + MLP(LN(h))

The paper's choices are the defaults: one shared LayerNorm per block, SwiGLU, multi-query
attention (one K/V head), rotary positions, no biases anywhere, input and output
embeddings shared. The options are wide enough for GPT-NeoX's parallel residual
(Pythia): two LayerNorms with biases (`shared_norm=False`, `norm_bias`), a GELU MLP with
biases, full multi-head attention with biases, rotary on a fraction of each head
(`rotary_pct`) and an untied output head.
Default sizes are small so a bare `tgraph build palm` is quick; PaLM 8B is d_model=4096,
num_layers=32, num_heads=16, head_dim=256, d_ff=16384, vocab_size=256000.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from ..checkpoints import HFAdapter, WeightRule, hf_get, linear, register_adapter, rule, transposed
from ..dsl import (ACTIVATIONS, Embedding, FeedForward, LayerNorm, Linear, Module, ModuleList,
                   MultiHeadAttention)
from ..dsl.rotary import RotaryEmbedding
from ..errors import ConfigError
from ..ir.lazy import contiguous
from .hf_options import activation_from_hf, rope_from_hf
from .decoding import (check_cache_options, decoder_input_specs, decoder_state, last_tokens, lm_logits, rotary_for,
                       token_positions)
from .config_checks import bounded, check_fields, epsilon, fraction, positive, repeated
from .registry import register_model


@dataclass
class PaLMConfig:
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = repeated(8)
    num_heads: int = 8
    num_kv_heads: int = 1                  # multi-query attention; = num_heads for GPT-NeoX
    head_dim: Optional[int] = None         # None: d_model // num_heads
    d_ff: int = 2048                       # 4 · d_model
    hidden_act: str = "silu"               # MLP activation, a tgraph.dsl name (GPT-NeoX: gelu)
    gated_mlp: bool = True                 # SwiGLU; False: act(x W_up) W_down (GPT-NeoX)
    shared_norm: bool = True               # one LayerNorm feeds both branches; False: GPT-NeoX's two
    norm_bias: bool = False                # the LayerNorms have a bias (GPT-NeoX)
    attention_bias: bool = False           # biases on the attention projections (GPT-NeoX)
    mlp_bias: bool = False
    layer_norm_eps: float = epsilon(1e-5)
    rotary_pct: float = fraction(1.0)      # fraction of each head's dims that rotate (GPT-NeoX: 0.25)
    rope_theta: float = positive(10000.0)
    tie_word_embeddings: bool = True
    use_cache: bool = False                # KV-cache inputs/outputs (tgraph.dsl.cache): past_key_values.*, present.*
    use_position_ids: Optional[bool] = None   # explicit position_ids input; None: = use_cache
    kv_cache: str = "dynamic"              # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                  # positions of a static cache (0: trained_positions, capped at 4096)
    trained_positions: int = bounded(0, ge=0)   # positions the checkpoint was trained for (HF max_position_embeddings; 0: unknown)

    def __post_init__(self):
        check_fields(self, "palm")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"palm: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"palm: num_heads ({self.num_heads}) is not a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(f"palm: d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads}); "
                              "give head_dim")
        if self.head_size <= 0:
            raise ConfigError(f"palm: head_dim must be positive, got {self.head_size}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"palm: rotary_pct={self.rotary_pct} of head_dim {self.head_size} gives "
                              f"{self.rotary_dim} rotary dims; needs an even number >= 2")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"palm: hidden_act {self.hidden_act!r} unknown (known: {', '.join(sorted(ACTIVATIONS))})")
        check_cache_options(self, "palm")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.rotary_pct)     # truncation, as GPT-NeoX computes rotary_ndims


class ParallelBlock(Module):
    def __init__(self, c: PaLMConfig):
        super().__init__()
        self.shared_norm = c.shared_norm
        if c.shared_norm:
            self.norm = LayerNorm(c.d_model, c.layer_norm_eps, bias=c.norm_bias)
        else:
            self.attn_norm = LayerNorm(c.d_model, c.layer_norm_eps, bias=c.norm_bias)
            self.mlp_norm = LayerNorm(c.d_model, c.layer_norm_eps, bias=c.norm_bias)
        self.attn = MultiHeadAttention(c.d_model, c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_size,
                                       bias=c.attention_bias, causal=True)
        self.mlp = FeedForward(c.d_model, c.d_ff, act=c.hidden_act, gated=c.gated_mlp, bias=c.mlp_bias)

    def forward(self, x, keep, rotary, cache=None):                      # x: (B, T, C)
        if self.shared_norm:
            h_attn = h_mlp = self.norm(x)
        else:
            h_attn, h_mlp = self.attn_norm(x), self.mlp_norm(x)
        return x + self.attn(h_attn, keep_mask=keep, rotary=rotary, cache=cache) + self.mlp(h_mlp)


class PaLM(Module):
    def __init__(self, config: PaLMConfig):
        super().__init__()
        c = self.config = config
        self.embed = Embedding(c.vocab_size, c.d_model)
        self.layers = ModuleList([ParallelBlock(c) for _ in range(c.num_layers)])
        self.final_norm = LayerNorm(c.d_model, c.layer_norm_eps, bias=c.norm_bias)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(c.head_size, rotary_dim=c.rotary_dim, theta=c.rope_theta)

    def input_specs(self):
        c = self.config
        return decoder_input_specs(c, c.num_layers, c.num_kv_heads, c.head_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **past):
        c = self.config
        keep, cache, layer_slots = decoder_state(c, c.num_layers, attention_mask, past, input_ids)  # (B, 1, 1, P + T)
        pos = token_positions(cache, input_ids, position_ids)            # None, (T,) or (B, T)
        rotary = rotary_for(cache, self.rotary, input_ids, pos, c)        # cos/sin: ((B, 1,) T, R), or op tables
        x = self.embed(input_ids)                                         # (B, T, C)
        for layer, layer_cache in zip(self.layers, layer_slots):
            x = layer(x, keep, rotary, layer_cache)
        x = self.final_norm(last_tokens(cache, x))                        # static cache: (B, 1, C)
        logits = lm_logits(x, self.embed, None if c.tie_word_embeddings else self.lm_head)  # (B, T, V)
        return {"logits": logits, **(cache.outputs() if cache else {})}


@register_model("palm", PaLMConfig)
def build(config: PaLMConfig) -> PaLM:
    return PaLM(config)


# ---------------------------------------------------------------- Hugging Face GPT-NeoX checkpoints
def config_from_hf(hf: Dict[str, Any]) -> PaLMConfig:
    """HF gpt_neox config.json -> PaLMConfig; only the parallel-residual variant is a PaLM block."""
    mt = hf.get("model_type", "gpt_neox")
    parallel = hf.get("use_parallel_residual", True)
    if not parallel:
        raise ConfigError(f"{mt}: config option use_parallel_residual={parallel!r} is not supported "
                          "(the palm family implements the parallel block x + attn(ln1(x)) + mlp(ln2(x)) only)")
    rope = rope_from_hf(hf, mt, default_partial=0.25, theta_alias="rotary_emb_base", partial_alias="rotary_pct")
    heads = hf_get(hf, "num_attention_heads", 64)
    hidden = hf_get(hf, "hidden_size", 6144)
    if hf.get("head_dim") is not None and hf["head_dim"] * heads != hidden:
        raise ConfigError(f"{mt}: config option head_dim={hf['head_dim']!r} is not supported "
                          f"(GPT-NeoX uses hidden_size // num_attention_heads = {hidden // heads})")
    attn_bias = hf_get(hf, "attention_bias", True)
    return PaLMConfig(
        vocab_size=hf_get(hf, "vocab_size", 50432),
        d_model=hidden,
        num_layers=hf_get(hf, "num_hidden_layers", 44),
        num_heads=heads,
        num_kv_heads=heads,
        d_ff=hf_get(hf, "intermediate_size", 24576),
        hidden_act=activation_from_hf(hf, mt, "gelu"),
        gated_mlp=False,
        shared_norm=False,
        norm_bias=True,
        attention_bias=attn_bias,
        mlp_bias=True,
        layer_norm_eps=hf_get(hf, "layer_norm_eps", 1e-5),
        rotary_pct=rope.partial_rotary_factor,
        rope_theta=rope.theta,
        tie_word_embeddings=hf_get(hf, "tie_word_embeddings", False),
        trained_positions=hf_get(hf, "max_position_embeddings", 0) or 0,
    )


def _qkv_part(part: int, heads: int):
    """GPT-NeoX's fused query_key_value output dim is laid out per head as [H, 3, D]; pick q (0), k (1)
    or v (2) as [H*D, ...] and return it in our layout ([in, out] for weights)."""
    def take(x: np.ndarray) -> np.ndarray:
        rest = x.shape[1:]                                                 # () for the bias, (in,) for the weight
        if x.shape[0] % (3 * heads):
            raise ValueError(f"fused dim {x.shape[0]} is not 3 x {heads} heads")
        y = x.reshape(heads, 3, x.shape[0] // (3 * heads), *rest)[:, part]   # (3*H*D, ...) -> (H, D, ...)
        y = y.reshape(-1, *rest)                                           # (H*D, ...)
        return contiguous(y.T) if y.ndim == 2 else contiguous(y)
    return take


def weight_map(c: PaLMConfig) -> Dict[str, WeightRule]:
    """Our names -> GPT-NeoX names after the "gpt_neox." prefix of GPTNeoXForCausalLM is stripped."""
    w: Dict[str, WeightRule] = {
        "embed.weight": rule("embed_in.weight"),
        "final_norm.weight": rule("final_layer_norm.weight"),
        "final_norm.bias": rule("final_layer_norm.bias"),
    }
    for i in range(c.num_layers):
        ours, hf = f"layers.{i}", f"layers.{i}"
        for mine, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
            w[f"{ours}.{mine}.weight"] = rule(f"{hf}.{theirs}.weight")
            w[f"{ours}.{mine}.bias"] = rule(f"{hf}.{theirs}.bias")
        qkv = f"{hf}.attention.query_key_value"
        for part, p in enumerate(("q", "k", "v")):
            w[f"{ours}.attn.{p}_proj.weight"] = rule(f"{qkv}.weight", fn=_qkv_part(part, c.num_heads))
            if c.attention_bias:
                w[f"{ours}.attn.{p}_proj.bias"] = rule(f"{qkv}.bias", fn=_qkv_part(part, c.num_heads))
        linear(f"{hf}.attention.dense", f"{ours}.attn.o_proj", bias=c.attention_bias, weights=w)
        linear(f"{hf}.mlp.dense_h_to_4h", f"{ours}.mlp.up", weights=w)
        linear(f"{hf}.mlp.dense_4h_to_h", f"{ours}.mlp.down", weights=w)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = rule("embed_out.weight", fn=transposed)   # the file keeps the hub name embed_out
    return w


register_adapter(HFAdapter(
    family="palm",
    model_types=("gpt_neox",),
    config_from_hf=config_from_hf,
    weight_map=weight_map,
    # Old checkpoints saved the causal-mask and rotary buffers; a tied head's saved copy of the embedding.
    ignore=(r"(.*\.)?attention\.(bias|masked_bias)", r"(.*\.)?rotary_emb\.inv_freq", r"embed_out\.weight"),
    base_prefixes=("gpt_neox.",),
))
