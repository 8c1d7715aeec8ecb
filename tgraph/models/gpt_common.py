"""What GPT-1 and GPT-2 share, so neither family copies the other.

Both stack the same block layout (ln_1, attn, ln_2, mlp; only the order of the residual
and the LayerNorm differs), embed tokens plus learned positions, tie the LM head to the
token embedding, and ship OpenAI's `Conv1D` weights: already [in, out] (no transpose),
with Q, K and V fused column-wise in `c_attn`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from ..checkpoints import WeightRule, hf_get, rule, transposed
from ..ir.lazy import contiguous
from ..dsl import ACTIVATIONS, Embedding, FeedForward, LayerNorm, LearnedPositions, Module, MultiHeadAttention
from ..dsl.cache import positions as cache_positions
from ..errors import ConfigError
from .decoding import decoder_state, last_tokens, lm_logits, token_positions


# ---------------------------------------------------------------- config checks
def validate(config: Any, family: str) -> None:
    """The checks every GPT config needs; raises ConfigError naming the family and field."""
    for name in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{family}: {name} must be positive, got {getattr(config, name)}")
    if config.n_embd % config.n_head:
        raise ConfigError(f"{family}: n_embd ({config.n_embd}) is not divisible by n_head ({config.n_head})")
    if config.activation not in ACTIVATIONS:
        raise ConfigError(f"{family}: activation {config.activation!r} is not one of {', '.join(sorted(ACTIVATIONS))}")


# ---------------------------------------------------------------- modules
class Block(Module):
    """The parameters of one GPT block; subclasses say where the LayerNorms go."""

    def __init__(self, n_embd: int, n_head: int, d_ff: int, eps: float, activation: str, scale: float):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, eps)
        self.attn = MultiHeadAttention(n_embd, n_head, causal=True, scale=scale)
        self.ln_2 = LayerNorm(n_embd, eps)
        self.mlp = FeedForward(n_embd, d_ff, act=activation)


def embed(tokens: Embedding, positions: LearnedPositions, input_ids, past_length=None, position_ids=None) -> Any:
    """Token embedding plus learned positions 0..T-1 (right padding leaves real tokens' positions
    alone), past..past+T-1 after a KV cache's past, or explicit position ids ((B, T))."""
    ids = cache_positions(input_ids, past_length, position_ids)   # (T,) or (B, T)
    return tokens(input_ids) + positions(ids)                 # (B, T, C) + ((B,) T, C) -> (B, T, C)


# ---------------------------------------------------------------- Hugging Face checkpoints
def pre_ln_forward(model: Any, num_layers: int, input_ids, attention_mask, position_ids, past) -> Dict[str, Any]:
    """The forward of a GPT-2-layout decoder (`wte`, `wpe`, blocks `h`, `ln_f`, tied or own
    `lm_head`), shared by gpt2 and gpt_neo: learned positions, pre-LN blocks, a final norm."""
    keep, cache, layer_slots = decoder_state(model.config, num_layers, attention_mask, past, input_ids)  # (B, 1, 1, P + T)
    pos = token_positions(cache, input_ids, position_ids)            # None, (T,) or (B, T)
    x = embed(model.wte, model.wpe, input_ids, position_ids=pos)     # (B, T, C)
    for block, layer_cache in zip(model.h, layer_slots):
        x = block(x, keep, layer_cache)
    x = model.ln_f(last_tokens(cache, x))                            # static cache: (B, 1, C)
    logits = lm_logits(x, model.wte, model.lm_head)
    return {"logits": logits, **(cache.outputs() if cache else {})}  # (B, T, V)


def columns(i: int, n: int, width: int) -> Callable[[np.ndarray], np.ndarray]:
    """The i-th of n column blocks of a fused [..., n*width] tensor (Q, K, V of `c_attn`)."""
    def take(x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != n * width:
            raise ValueError(f"expected last dim {n * width} = {n} x {width}")
        return contiguous(x[..., i * width:(i + 1) * width])
    return take


def conv1d(hf: str, ours: str, weights: Dict[str, WeightRule]) -> None:
    """OpenAI's Conv1D is x @ W + b with W already [in, out]: copied as is."""
    weights[f"{ours}.weight"] = rule(f"{hf}.weight")
    weights[f"{ours}.bias"] = rule(f"{hf}.bias")


def block_weights(i: int, n_embd: int, weights: Dict[str, WeightRule]) -> None:
    """HF `h.{i}` (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj) -> our Block."""
    hf, ours = f"h.{i}", f"h.{i}"
    for ln in ("ln_1", "ln_2"):
        weights[f"{ours}.{ln}.weight"] = rule(f"{hf}.{ln}.weight")
        weights[f"{ours}.{ln}.bias"] = rule(f"{hf}.{ln}.bias")
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        weights[f"{ours}.attn.{proj}.weight"] = rule(f"{hf}.attn.c_attn.weight", fn=columns(j, 3, n_embd))
        weights[f"{ours}.attn.{proj}.bias"] = rule(f"{hf}.attn.c_attn.bias", fn=columns(j, 3, n_embd))
    conv1d(f"{hf}.attn.c_proj", f"{ours}.attn.o_proj", weights)
    conv1d(f"{hf}.mlp.c_fc", f"{ours}.mlp.up", weights)
    conv1d(f"{hf}.mlp.c_proj", f"{ours}.mlp.down", weights)


def head_weights(tied: bool, weights: Dict[str, WeightRule]) -> None:
    """An untied `lm_head` is a torch Linear ([V, C], transposed); a tied one is not saved at all."""
    if not tied:
        weights["lm_head.weight"] = rule("lm_head.weight", fn=transposed)


# Buffers older transformers versions saved: the causal mask, its fill value, position ids.
IGNORED_BUFFERS = (r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias", r"position_ids")


def activation_from_hf(hf: Mapping[str, Any], key: str, table: Mapping[str, str], default: str,
                       model_type: str) -> str:
    """Map HF's activation name to ours; an activation we do not implement is refused by name."""
    value = hf_get(hf, key, default)
    if not isinstance(value, str) or value not in table:
        raise ConfigError(f"{model_type}: config option {key}={value!r} is not supported "
                          f"(supported: {', '.join(repr(a) for a in table)})")
    return table[value]


def refuse_architectures(hf: Mapping[str, Any], allowed: Sequence[str]) -> Optional[str]:
    """Head models we do not implement (double heads, classifiers) carry extra weights and outputs."""
    archs = hf.get("architectures") or []
    bad = [a for a in archs if a not in allowed]
    if bad:
        return f"architecture {bad[0]!r} is not supported (supported: {', '.join(allowed)})"
    return None


def common_config(hf: Mapping[str, Any], defaults: Any) -> Dict[str, Any]:
    """The fields GPT-1 and GPT-2 configs name alike (with the HF attribute_map aliases)."""
    return dict(
        vocab_size=hf_get(hf, "vocab_size", defaults.vocab_size),
        n_positions=hf_get(hf, "n_positions", defaults.n_positions, "max_position_embeddings"),
        n_embd=hf_get(hf, "n_embd", defaults.n_embd, "hidden_size"),
        n_layer=hf_get(hf, "n_layer", defaults.n_layer, "num_hidden_layers"),
        n_head=hf_get(hf, "n_head", defaults.n_head, "num_attention_heads"),
        layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", defaults.layer_norm_epsilon),
        tie_word_embeddings=hf_get(hf, "tie_word_embeddings", True),
    )
