"""LLaMA (Touvron et al. 2023): a pre-norm decoder with RMSNorm, SwiGLU and rotary positions.

    h = x + Attn(RMSNorm(x))            grouped-query attention, RoPE on q and k, causal
    y = h + W_down(silu(W_gate h) * W_up h)   applied to RMSNorm(h)

No biases (Qwen2 adds q/k/v biases, `attention_bias`), an untied LM head unless
`tie_word_embeddings`. The same code reads Hugging Face "llama" checkpoints and the
LLaMA-shaped "mistral" and "qwen2" (q/k/v biases), with their sliding windows (`sliding_window`,
Qwen2's `max_window_layers` / `layer_types`: see `tgraph.models.windows`).
Default sizes are small so a bare `tgraph build llama` is quick; LLaMA-7B is
d_model=4096, num_layers=32, num_heads=32, d_ff=11008, vocab_size=32000.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..checkpoints import HFAdapter, WeightRule, hf_get, linear, register_adapter, rule, transposed
from ..dsl import (ACTIVATIONS, Embedding, FeedForward, Linear, Module, ModuleList, MultiHeadAttention, RMSNorm)
from ..dsl.rope_scaling import RopeScaling
from ..dsl.rotary import RotaryEmbedding
from ..errors import ConfigError
from .hf_options import activation_from_hf, rope_from_hf
from .decoding import (check_cache_options, decoder_input_specs, decoder_state, last_tokens, lm_logits, rotary_for,
                       token_positions)
from .config_checks import bounded, check_fields, epsilon, positive, repeated
from .registry import register_model
from .windows import layer_windows, parse_pattern, shortest_pattern

LAYER_KINDS = ("full_attention", "sliding_attention")     # HF's layer_types names


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = repeated(8)
    num_heads: int = 8
    num_kv_heads: Optional[int] = None     # None: = num_heads (LLaMA-1); fewer: grouped-query attention
    head_dim: Optional[int] = None         # None: d_model // num_heads
    d_ff: int = 1536                       # LLaMA: 2/3 · 4·d_model, rounded up to a multiple of 256
    hidden_act: str = "silu"               # SwiGLU
    rms_norm_eps: float = epsilon(1e-6)    # RMSNorm epsilon
    rope_theta: float = positive(10000.0)
    rope_scaling: Optional[RopeScaling] = None   # linear / dynamic / yarn / llama3 / longrope (tgraph.dsl.rope_scaling)
    attention_bias: bool = False           # biases on q/k/v projections (Qwen2)
    attention_out_bias: bool = False       # bias on the output projection (HF llama attention_bias sets both)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = False                # KV-cache inputs/outputs (tgraph.dsl.cache): past_key_values.*, present.*
    use_position_ids: Optional[bool] = None   # explicit position_ids input; None: = use_cache
    kv_cache: str = "dynamic"              # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                  # positions of a static cache (0: trained_positions, capped at 4096)
    trained_positions: int = bounded(0, ge=0)   # positions the checkpoint was trained for (HF max_position_embeddings; 0: unknown)
    sliding_window: int = bounded(0, ge=0)  # keys a local layer's query sees, itself included (0: full attention)
    layer_types: str = "sliding_attention"  # with sliding_window: full_attention / sliding_attention, repeating

    def __post_init__(self):
        check_fields(self, "llama")
        parse_pattern(self.layer_types, LAYER_KINDS, "llama: layer_types")
        if isinstance(self.rope_scaling, dict):        # from Python or a tgraph.json manifest
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.rope_scaling.items()}
            self.rope_scaling = RopeScaling(**fields)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"llama: rope_scaling must be a RopeScaling, got {type(self.rope_scaling).__name__}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"llama: {name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads is not None and self.num_kv_heads <= 0:
            raise ConfigError(f"llama: num_kv_heads must be positive, got {self.num_kv_heads}")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"llama: num_heads ({self.num_heads}) is not a multiple of "
                              f"num_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(f"llama: d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads}); "
                              "give head_dim")
        if self.head_size <= 0 or self.head_size % 2:
            raise ConfigError(f"llama: head_dim ({self.head_size}) must be positive and even for rotary positions")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"llama: hidden_act {self.hidden_act!r} unknown (known: {', '.join(sorted(ACTIVATIONS))})")
        if self.rope_scaling is not None:
            self.rope_scaling.check(self.head_size, self.rope_theta)
        check_cache_options(self, "llama")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window (0: full attention)."""
        return layer_windows(parse_pattern(self.layer_types, LAYER_KINDS, "llama: layer_types"), LAYER_KINDS[1],
                             self.sliding_window, layer + 1)[layer]

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads


class DecoderLayer(Module):
    def __init__(self, c: LlamaConfig, window: int = 0):
        super().__init__()
        self.input_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.self_attn = MultiHeadAttention(c.d_model, c.num_heads, num_kv_heads=c.kv_heads, head_dim=c.head_size,
                                            bias=c.attention_bias, out_bias=c.attention_out_bias, causal=True,
                                            window=window)
        self.post_attention_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.mlp = FeedForward(c.d_model, c.d_ff, act=c.hidden_act, gated=True, bias=c.mlp_bias)

    def forward(self, x, keep, rotary, cache=None):                      # x: (B, T, C)
        x = x + self.self_attn(self.input_norm(x), keep_mask=keep, rotary=rotary, cache=cache)
        return x + self.mlp(self.post_attention_norm(x))


class Llama(Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = Embedding(c.vocab_size, c.d_model)
        self.layers = ModuleList([DecoderLayer(c, c.window(i)) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.d_model, c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(c.head_size, theta=c.rope_theta, scaling=c.rope_scaling)

    def input_specs(self):
        c = self.config
        return decoder_input_specs(c, c.num_layers, c.kv_heads, c.head_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **past):
        c = self.config
        keep, cache, layer_slots = decoder_state(c, c.num_layers, attention_mask, past, input_ids)  # (B, 1, 1, P + T)
        pos = token_positions(cache, input_ids, position_ids)            # None, (T,) or (B, T)
        rotary = rotary_for(cache, self.rotary, input_ids, pos, c)        # cos/sin: ((B, 1,) T, R), or op tables
        x = self.embed_tokens(input_ids)                                  # (B, T, C)
        for layer, layer_cache in zip(self.layers, layer_slots):
            x = layer(x, keep, rotary, layer_cache)
        x = self.norm(last_tokens(cache, x))                              # static cache: (B, 1, C)
        logits = lm_logits(x, self.embed_tokens, None if c.tie_word_embeddings else self.lm_head)  # (B, T, V)
        return {"logits": logits, **(cache.outputs() if cache else {})}


@register_model("llama", LlamaConfig)
def build(config: LlamaConfig) -> Llama:
    return Llama(config)


# ---------------------------------------------------------------- Hugging Face checkpoints
def config_from_hf(hf: Dict[str, Any]) -> LlamaConfig:
    """HF llama / mistral / qwen2 config.json -> LlamaConfig, refusing what we do not implement."""
    mt = hf.get("model_type", "llama")
    rope = rope_from_hf(hf, mt, scaling=True)   # llama's default RoPE ignores partial_rotary_factor, as HF does
    if rope.scaling is not None and rope.partial_rotary_factor != 1.0:
        raise ConfigError(f"{mt}: config option partial_rotary_factor={rope.partial_rotary_factor!r} with "
                          f"rope_type {rope.scaling.rope_type!r} is not supported (HF {mt} rotates whole heads)")
    window, layer_types = _sliding_window_from_hf(hf, mt)
    qkv_bias = bool(hf.get("attention_bias", False)) or mt == "qwen2"
    out_bias = bool(hf.get("attention_bias", False)) and mt != "qwen2"
    heads = hf_get(hf, "num_attention_heads", 32)
    return LlamaConfig(
        vocab_size=hf_get(hf, "vocab_size", 32000),
        d_model=hf_get(hf, "hidden_size", 4096),
        num_layers=hf_get(hf, "num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=hf_get(hf, "num_key_value_heads", heads),
        head_dim=hf_get(hf, "head_dim", None),
        d_ff=hf_get(hf, "intermediate_size", 11008),
        hidden_act=activation_from_hf(hf, mt, "silu"),
        rms_norm_eps=hf_get(hf, "rms_norm_eps", 1e-6),
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=hf_get(hf, "mlp_bias", False),
        tie_word_embeddings=hf_get(hf, "tie_word_embeddings", False),
        trained_positions=hf_get(hf, "max_position_embeddings", 0) or 0,
        sliding_window=window,
        layer_types=layer_types,
    )


def _sliding_window_from_hf(hf: Dict[str, Any], mt: str):
    """(window, layer_types) as HF's modeling reads them: Mistral slides every layer when
    `sliding_window` is set; Qwen2 the layers `layer_types` marks (transformers derives them from
    `use_sliding_window` and `max_window_layers`); llama has no windows. A window that covers
    every position (>= max_position_embeddings) is full attention."""
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ConfigError(f"{mt}: config option sliding_window={window!r} must be a positive integer or null")
    types = hf.get("layer_types") or []
    if not isinstance(types, list) or any(t not in LAYER_KINDS for t in types):
        bad = next((t for t in types if t not in LAYER_KINDS), types) if isinstance(types, list) else types
        raise ConfigError(f"{mt}: config option layer_types containing {bad!r} is not supported "
                          f"(only {' / '.join(LAYER_KINDS)})")
    if mt == "mistral":
        types = []                                           # HF's Mistral ignores layer_types
    elif mt == "qwen2":
        if not hf.get("use_sliding_window"):
            window = None
        elif not types:                                      # older configs: derived as transformers does
            n = hf_get(hf, "num_hidden_layers", 32)
            first = hf_get(hf, "max_window_layers", 28)
            types = [LAYER_KINDS[int(i >= first)] for i in range(n)]
    elif "sliding_attention" in types:
        raise ConfigError(f"{mt}: config option layer_types containing 'sliding_attention' is not supported "
                          "(llama has no sliding window; only full_attention layers)")
    else:
        window = None                                        # HF's llama reads no sliding_window
    max_pos = hf.get("max_position_embeddings")
    if window is None or (isinstance(max_pos, int) and window >= max_pos) or \
            (types and "sliding_attention" not in types):
        return 0, LAYER_KINDS[1]
    return window, shortest_pattern(types) if types else LAYER_KINDS[1]


def weight_map(c: LlamaConfig) -> Dict[str, WeightRule]:
    """Our names -> HF names after the "model." prefix of *ForCausalLM checkpoints is stripped."""
    w: Dict[str, WeightRule] = {"embed_tokens.weight": rule("embed_tokens.weight"), "norm.weight": rule("norm.weight")}
    for i in range(c.num_layers):
        ours, hf = f"layers.{i}", f"layers.{i}"
        w[f"{ours}.input_norm.weight"] = rule(f"{hf}.input_layernorm.weight")
        w[f"{ours}.post_attention_norm.weight"] = rule(f"{hf}.post_attention_layernorm.weight")
        for p in ("q", "k", "v"):
            linear(f"{hf}.self_attn.{p}_proj", f"{ours}.self_attn.{p}_proj", bias=c.attention_bias, weights=w)
        linear(f"{hf}.self_attn.o_proj", f"{ours}.self_attn.o_proj", bias=c.attention_out_bias, weights=w)
        for theirs, mine in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            linear(f"{hf}.mlp.{theirs}", f"{ours}.mlp.{mine}", bias=c.mlp_bias, weights=w)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = rule("lm_head.weight", fn=transposed)
    return w


register_adapter(HFAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    config_from_hf=config_from_hf,
    weight_map=weight_map,
    # Rotary inverse frequencies (old checkpoints saved them); a tied head's saved copy of the embedding.
    ignore=(r"(.*\.)?rotary_emb\.inv_freq", r"lm_head\.weight"),
    base_prefixes=("model.",),
))
