"""GPT-1 ("Improving Language Understanding by Generative Pre-Training", Radford et al. 2018).

A decoder-only Transformer: post-LN blocks, LayerNorm(x + attn(x)) then
LayerNorm(x + mlp(x)), no final LayerNorm; learned token and position embeddings; the
LM head tied to the token embedding. Its "gelu" is the tanh approximation (HF maps
afn="gelu" to gelu_new).

Hugging Face: model_type "openai-gpt", checkpoints of `OpenAIGPTModel` (keys `h.0...`)
and `OpenAIGPTLMHeadModel` (keys `transformer.h.0...`). HF masks future positions with
-1e4 rather than the dtype's lowest value; both give them zero probability in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..checkpoints import HFAdapter, WeightRule, register_adapter, rule
from ..dsl import Embedding, LearnedPositions, Linear, Module, ModuleList
from . import gpt_common
from .decoding import (cache_length, check_cache_options, decoder_input_specs, decoder_state, last_tokens, lm_logits,
                       token_positions)
from .config_checks import check_fields, epsilon, repeated
from .registry import register_model


@dataclass
class GPTConfig:
    vocab_size: int = 40478          # the paper's 40,000 BPE merges plus specials, as released
    n_positions: int = 512
    n_embd: int = 768
    n_layer: int = repeated(12)
    n_head: int = 12
    layer_norm_epsilon: float = epsilon(1e-5)
    activation: str = "gelu_tanh"    # a tgraph.dsl activation name; HF afn "gelu"
    tie_word_embeddings: bool = True
    use_attention_mask: bool = True  # adds the `attention_mask` input (padding)
    use_cache: bool = False          # KV-cache inputs/outputs (tgraph.dsl.cache): past_key_values.*, present.*
    use_position_ids: Optional[bool] = None   # explicit position_ids input; None: = use_cache
    kv_cache: str = "dynamic"              # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                  # positions of a static cache (0: the model's, capped at 4096)

    def __post_init__(self):
        check_fields(self, "gpt")
        gpt_common.validate(self, "gpt")
        check_cache_options(self, "gpt")
        cache_length(self, self.n_positions)


class Block(gpt_common.Block):
    def forward(self, x, keep, cache=None):                   # x: (B, T, C)
        x = self.ln_1(x + self.attn(x, keep_mask=keep, cache=cache))
        return self.ln_2(x + self.mlp(x))


class GPT(Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.tokens_embed = Embedding(c.vocab_size, c.n_embd)
        self.positions_embed = LearnedPositions(c.n_positions, c.n_embd)
        scale = (c.n_embd // c.n_head) ** -0.5
        self.h = ModuleList([Block(c.n_embd, c.n_head, 4 * c.n_embd, c.layer_norm_epsilon, c.activation, scale)
                             for _ in range(c.n_layer)])
        self.lm_head = None if c.tie_word_embeddings else Linear(c.n_embd, c.vocab_size, bias=False)

    def input_specs(self):
        c = self.config
        return decoder_input_specs(c, c.n_layer, c.n_head, c.n_embd // c.n_head, mask=c.use_attention_mask)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **past):
        c = self.config
        keep, cache, layer_slots = decoder_state(c, c.n_layer, attention_mask, past, input_ids)  # (B, 1, 1, P + T)
        pos = token_positions(cache, input_ids, position_ids)            # None, (T,) or (B, T)
        x = gpt_common.embed(self.tokens_embed, self.positions_embed, input_ids, position_ids=pos)  # (B, T, C)
        for block, layer_cache in zip(self.h, layer_slots):
            x = block(x, keep, layer_cache)
        logits = lm_logits(last_tokens(cache, x), self.tokens_embed, self.lm_head)   # static cache: (B, 1, V)
        return {"logits": logits, **(cache.outputs() if cache else {})}     # (B, T, V)


@register_model("gpt", GPTConfig)
def build(config: GPTConfig) -> GPT:
    return GPT(config)


# ---------------------------------------------------------------- Hugging Face
# HF OpenAIGPT's own table (modeling_openai.ACT_FNS): its "gelu" is gelu_new, the tanh formula.
HF_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}


def config_from_hf(hf: Dict[str, Any]) -> GPTConfig:
    return GPTConfig(
        **gpt_common.common_config(hf, GPTConfig),
        activation=gpt_common.activation_from_hf(hf, "afn", HF_ACTIVATIONS, "gelu", "openai-gpt"),
    )


def weight_map(c: GPTConfig) -> Dict[str, WeightRule]:
    weights: Dict[str, WeightRule] = {
        "tokens_embed.weight": rule("tokens_embed.weight"),
        "positions_embed.weight": rule("positions_embed.weight"),
    }
    for i in range(c.n_layer):
        gpt_common.block_weights(i, c.n_embd, weights)
    gpt_common.head_weights(c.tie_word_embeddings, weights)
    return weights


register_adapter(HFAdapter(
    family="gpt", model_types=("openai-gpt",), config_from_hf=config_from_hf, weight_map=weight_map,
    ignore=gpt_common.IGNORED_BUFFERS, base_prefixes=("transformer.",),
    accepts=lambda hf: gpt_common.refuse_architectures(hf, ("OpenAIGPTModel", "OpenAIGPTLMHeadModel")),
))
