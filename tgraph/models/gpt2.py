"""GPT-2 ("Language Models are Unsupervised Multitask Learners", Radford et al. 2019).

GPT-1's decoder with the LayerNorm moved to the input of each sub-block (pre-LN) and
one more LayerNorm (ln_f) after the last block; tanh-approximated GELU; learned
positions; the LM head tied to the token embedding.

Hugging Face: model_type "gpt2", checkpoints of `GPT2Model` (keys `h.0...`) and
`GPT2LMHeadModel` (keys `transformer.h.0...`, lm_head tied unless
tie_word_embeddings=false). A `GPT2Model` checkpoint still gives logits, from wte.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..checkpoints import HFAdapter, WeightRule, hf_get, refuse_if, register_adapter, rule
from ..dsl import Embedding, LayerNorm, LearnedPositions, Linear, Module, ModuleList
from ..errors import ConfigError
from . import gpt_common
from .decoding import cache_length, check_cache_options, decoder_input_specs
from .config_checks import check_fields, epsilon, repeated
from .registry import register_model


@dataclass
class GPT2Config:
    vocab_size: int = 50257          # GPT-2 small, as released
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = repeated(12)
    n_head: int = 12
    n_inner: Optional[int] = None    # feed-forward width; None = 4 * n_embd
    layer_norm_epsilon: float = epsilon(1e-5)
    activation: str = "gelu_tanh"    # a tgraph.dsl activation name; HF "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True              # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and / (layer index + 1) (Stanford CRFM's Mistral runs)
    use_attention_mask: bool = True  # adds the `attention_mask` input (padding)
    use_cache: bool = False          # KV-cache inputs/outputs (tgraph.dsl.cache): past_key_values.*, present.*
    use_position_ids: Optional[bool] = None   # explicit position_ids input; None: = use_cache
    kv_cache: str = "dynamic"              # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                  # positions of a static cache (0: the model's, capped at 4096)

    def __post_init__(self):
        check_fields(self, "gpt2")
        gpt_common.validate(self, "gpt2")
        check_cache_options(self, "gpt2")
        cache_length(self, self.n_positions)
        if self.n_inner is not None and self.n_inner <= 0:
            raise ConfigError(f"gpt2: n_inner must be positive or None, got {self.n_inner}")

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def attention_scale(self, layer: int) -> float:
        scale = (self.n_embd // self.n_head) ** -0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale


class Block(gpt_common.Block):
    def forward(self, x, keep, cache=None):                   # x: (B, T, C)
        x = x + self.attn(self.ln_1(x), keep_mask=keep, cache=cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        c = self.config = config
        self.wte = Embedding(c.vocab_size, c.n_embd)
        self.wpe = LearnedPositions(c.n_positions, c.n_embd, std=0.01)
        self.h = ModuleList([Block(c.n_embd, c.n_head, c.d_ff, c.layer_norm_epsilon, c.activation,
                                   c.attention_scale(i)) for i in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.n_embd, c.vocab_size, bias=False)

    def input_specs(self):
        c = self.config
        return decoder_input_specs(c, c.n_layer, c.n_head, c.n_embd // c.n_head, mask=c.use_attention_mask)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **past):
        return gpt_common.pre_ln_forward(self, self.config.n_layer, input_ids, attention_mask, position_ids, past)


@register_model("gpt2", GPT2Config)
def build(config: GPT2Config) -> GPT2:
    return GPT2(config)


# ---------------------------------------------------------------- Hugging Face
# HF activation_function -> ours. gelu_new, gelu_pytorch_tanh and gelu_fast are the same tanh formula.
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu", "gelu_python": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def config_from_hf(hf: Dict[str, Any]) -> GPT2Config:
    refuse_if(hf, "reorder_and_upcast_attn", [False], "gpt2")   # mixed-precision reordering: not implemented
    refuse_if(hf, "add_cross_attention", [False], "gpt2")       # encoder-decoder use: not implemented
    return GPT2Config(
        **gpt_common.common_config(hf, GPT2Config),
        n_inner=hf_get(hf, "n_inner", None),
        activation=gpt_common.activation_from_hf(hf, "activation_function", HF_ACTIVATIONS, "gelu_new", "gpt2"),
        scale_attn_weights=hf_get(hf, "scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf_get(hf, "scale_attn_by_inverse_layer_idx", False),
    )


def weight_map(c: GPT2Config) -> Dict[str, WeightRule]:
    weights: Dict[str, WeightRule] = {
        "wte.weight": rule("wte.weight"),
        "wpe.weight": rule("wpe.weight"),
        "ln_f.weight": rule("ln_f.weight"),
        "ln_f.bias": rule("ln_f.bias"),
    }
    for i in range(c.n_layer):
        gpt_common.block_weights(i, c.n_embd, weights)
    gpt_common.head_weights(c.tie_word_embeddings, weights)
    return weights


register_adapter(HFAdapter(
    family="gpt2", model_types=("gpt2",), config_from_hf=config_from_hf, weight_map=weight_map,
    ignore=gpt_common.IGNORED_BUFFERS, base_prefixes=("transformer.",),
    accepts=lambda hf: gpt_common.refuse_architectures(hf, ("GPT2Model", "GPT2LMHeadModel")),
))
