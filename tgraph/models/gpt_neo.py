"""GPT-Neo (EleutherAI, 2021): GPT-2's pre-LN decoder with GPT-3's alternating dense and
locally banded attention.

Layers follow `attention_layers`, a repeating pattern of "global" (causal over every earlier
token) and "local" (causal over the last `window_size` tokens, itself included); the released
models alternate "global,local". Attention is not scaled by 1/sqrt(head_dim); q/k/v
projections have no bias, the output projection has one; MLP c_fc -> gelu_new -> c_proj;
learned positions; the LM head tied to the token embedding.

Hugging Face: model_type "gpt_neo", `GPTNeoModel` (keys `h.0...`) and `GPTNeoForCausalLM`
(keys `transformer.h.0...`) checkpoints, torch `nn.Linear` weights ([out, in]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..checkpoints import HFAdapter, WeightRule, hf_get, linear, register_adapter, rule
from ..dsl import Embedding, FeedForward, LayerNorm, LearnedPositions, Linear, Module, ModuleList, MultiHeadAttention
from ..errors import ConfigError
from . import gpt_common
from .config_checks import bounded, check_fields, epsilon, repeated
from .decoding import cache_length, check_cache_options, decoder_input_specs
from .gpt2 import HF_ACTIVATIONS
from .registry import register_model
from .windows import layer_windows, parse_pattern, shortest_pattern

LAYER_KINDS = ("global", "local")


@dataclass
class GPTNeoConfig:
    vocab_size: int = 50257            # GPT-Neo 125M, as released
    max_position_embeddings: int = 2048
    hidden_size: int = 768
    num_layers: int = repeated(12)
    num_heads: int = 12
    intermediate_size: Optional[int] = None      # None: 4 * hidden_size
    window_size: int = bounded(256, ge=1)        # keys a local layer's query sees, itself included
    attention_layers: str = "global,local"       # repeating pattern of global / local layers
    activation: str = "gelu_tanh"                # HF "gelu_new"
    layer_norm_epsilon: float = epsilon(1e-5)
    tie_word_embeddings: bool = True
    use_attention_mask: bool = True         # adds the `attention_mask` input (padding)
    use_cache: bool = False                 # KV-cache inputs/outputs (tgraph.dsl.cache): past_key_values.*, present.*
    use_position_ids: Optional[bool] = None  # explicit position_ids input; None: = use_cache
    kv_cache: str = "dynamic"               # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                   # positions of a static cache (0: the model's, capped at 4096)

    def __post_init__(self):
        check_fields(self, "gpt_neo")
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"gpt_neo: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"gpt_neo: hidden_size ({self.hidden_size}) is not divisible by num_heads "
                              f"({self.num_heads})")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"gpt_neo: intermediate_size must be positive or None, got {self.intermediate_size}")
        if self.activation not in set(HF_ACTIVATIONS.values()):
            raise ConfigError(f"gpt_neo: activation {self.activation!r} unknown")
        parse_pattern(self.attention_layers, LAYER_KINDS, "gpt_neo: attention_layers")
        check_cache_options(self, "gpt_neo")
        cache_length(self, self.max_position_embeddings)

    @property
    def d_ff(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def windows(self):
        """Each layer's attention window (0: global). A window covering every position is global."""
        pattern = parse_pattern(self.attention_layers, LAYER_KINDS, "gpt_neo: attention_layers")
        window = self.window_size if self.window_size < self.max_position_embeddings else 0
        return layer_windows(pattern, "local", window, self.num_layers)


class Block(Module):
    def __init__(self, c: GPTNeoConfig, window: int):
        super().__init__()
        self.ln_1 = LayerNorm(c.hidden_size, c.layer_norm_epsilon)
        self.attn = MultiHeadAttention(c.hidden_size, c.num_heads, bias=False, out_bias=True, causal=True,
                                       scale=1.0, window=window)
        self.ln_2 = LayerNorm(c.hidden_size, c.layer_norm_epsilon)
        self.mlp = FeedForward(c.hidden_size, c.d_ff, act=c.activation)

    def forward(self, x, keep, cache=None):                   # x: (B, T, C)
        x = x + self.attn(self.ln_1(x), keep_mask=keep, cache=cache)
        return x + self.mlp(self.ln_2(x))


class GPTNeo(Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        c = self.config = config
        self.wte = Embedding(c.vocab_size, c.hidden_size)
        self.wpe = LearnedPositions(c.max_position_embeddings, c.hidden_size, std=0.01)
        self.h = ModuleList([Block(c, w) for w in c.windows()])
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, bias=False)

    def input_specs(self):
        c = self.config
        return decoder_input_specs(c, c.num_layers, c.num_heads, c.hidden_size // c.num_heads,
                                   mask=c.use_attention_mask)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **past):
        return gpt_common.pre_ln_forward(self, self.config.num_layers, input_ids, attention_mask, position_ids, past)


@register_model("gpt_neo", GPTNeoConfig)
def build(config: GPTNeoConfig) -> GPTNeo:
    return GPTNeo(config)


# ---------------------------------------------------------------- Hugging Face
def attention_layers_from_hf(hf: Dict[str, Any]) -> str:
    """HF's `attention_types` ([[["global", "local"], 12]]: a pattern and its repeat count) or
    its expanded `attention_layers` -> our repeating pattern, checked against num_layers."""
    types = hf.get("attention_layers")
    if types is None:
        spec = hf.get("attention_types", [[["global", "local"], 12]])
        try:
            types = [kind for kinds, count in spec for _ in range(int(count)) for kind in kinds]
        except (TypeError, ValueError):
            raise ConfigError(f"gpt_neo: config option attention_types={spec!r} is not a list of "
                              "[[kinds...], count] pairs") from None
    if not isinstance(types, list) or not types or any(t not in LAYER_KINDS for t in types):
        raise ConfigError(f"gpt_neo: config option attention_layers={types!r} must list 'global' / 'local' layers")
    layers = hf_get(hf, "num_layers", 12, "num_hidden_layers")
    if len(types) != layers:
        raise ConfigError(f"gpt_neo: config option attention_types gives {len(types)} layers, num_layers is {layers}")
    return shortest_pattern(types)


def config_from_hf(hf: Dict[str, Any]) -> GPTNeoConfig:
    d = GPTNeoConfig
    return GPTNeoConfig(
        vocab_size=hf_get(hf, "vocab_size", d.vocab_size),
        max_position_embeddings=hf_get(hf, "max_position_embeddings", d.max_position_embeddings),
        hidden_size=hf_get(hf, "hidden_size", d.hidden_size),
        num_layers=hf_get(hf, "num_layers", 12, "num_hidden_layers"),
        num_heads=hf_get(hf, "num_heads", d.num_heads, "num_attention_heads"),
        intermediate_size=hf_get(hf, "intermediate_size", None),
        window_size=hf_get(hf, "window_size", 256),
        attention_layers=attention_layers_from_hf(hf),
        activation=gpt_common.activation_from_hf(hf, "activation_function", HF_ACTIVATIONS, "gelu_new", "gpt_neo"),
        layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf_get(hf, "tie_word_embeddings", True),
    )


def weight_map(c: GPTNeoConfig) -> Dict[str, WeightRule]:
    w: Dict[str, WeightRule] = {name: rule(name) for name in
                                ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(c.num_layers):
        hf = ours = f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            w[f"{ours}.{ln}.weight"] = rule(f"{hf}.{ln}.weight")
            w[f"{ours}.{ln}.bias"] = rule(f"{hf}.{ln}.bias")
        for p in ("q_proj", "k_proj", "v_proj"):
            linear(f"{hf}.attn.attention.{p}", f"{ours}.attn.{p}", bias=False, weights=w)
        linear(f"{hf}.attn.attention.out_proj", f"{ours}.attn.o_proj", bias=True, weights=w)
        linear(f"{hf}.mlp.c_fc", f"{ours}.mlp.up", bias=True, weights=w)
        linear(f"{hf}.mlp.c_proj", f"{ours}.mlp.down", bias=True, weights=w)
    gpt_common.head_weights(c.tie_word_embeddings, w)
    return w


register_adapter(HFAdapter(
    family="gpt_neo", model_types=("gpt_neo",), config_from_hf=config_from_hf, weight_map=weight_map,
    # the causal/local mask buffers older transformers versions saved
    ignore=(r"h\.\d+\.attn\.attention\.bias", r"h\.\d+\.attn\.attention\.masked_bias"),
    base_prefixes=("transformer.",),
    accepts=lambda hf: gpt_common.refuse_architectures(hf, ("GPTNeoModel", "GPTNeoForCausalLM")),
))
