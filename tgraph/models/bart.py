"""BART (Lewis et al. 2019) and mBART (Liu et al. 2020): encoder-decoders with learned positions.

    x = LayerNorm_emb(E[ids] · s + P[pos + 2])                 s = √d_model if scale_embedding, else 1
    BART (post-LN):   h = LN(x + SelfAttn(x));  h = LN(h + CrossAttn(h, memory));  y = LN(h + FFN(h))
    mBART (pre-LN):   h = x + SelfAttn(LN(x));  h = h + CrossAttn(LN(h), memory);  y = h + FFN(LN(h))
                      and each stack ends with a final LayerNorm
    logits = y Eᵀ + final_logits_bias                           (tied head; an untied one has its own W)

The position table has max_position_embeddings + 2 rows: fairseq reserved the first two for
its padding scheme and HF keeps the offset, so position p reads row p + 2. Positions count
from 0 at the first column (padding is not skipped), in the encoder and in the decoder, as in
HF. Attention is softmax(QKᵀ/√d + mask)V with biases on every projection; the FFN is
fc2(act(fc1(x))) with `activation_function` (gelu = exact erf GELU). All LayerNorms use
eps 1e-5 (torch's default, which HF BART does not make configurable).

Inputs: input_ids, attention_mask (source padding, also masks cross-attention) and
decoder_input_ids (+ decoder_attention_mask with use_decoder_attention_mask, needed only for
left-padded targets). Outputs: logits (BartModel: last_hidden_state) and
encoder_last_hidden_state.

Generation (`part`, `use_cache`): part="encoder" with use_cache returns last_hidden_state and
every decoder layer's cross-attention keys/values (`tgraph.dsl.cache.CROSS`), computed once per
source; part="decoder" with use_cache reads them (and encoder_attention_mask) instead of the
encoder states, and caches its self-attention keys/values (`past_key_values.*` / `present.*`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional

import numpy as np

from ..checkpoints import HFAdapter, WeightRule, linear, register_adapter, rule, transposed
from ..dsl import (Embedding, FeedForward, InputSpec, LayerNorm, LearnedPositions, Linear, Module, ModuleList,
                   MultiHeadAttention, Parameter, padding_keep_mask)
from ..dsl.cache import cross_attention_caches, cross_attention_outputs, cross_attention_specs, layer_caches, positions
from ..errors import CheckpointError, ConfigError
from ..ir import DType
from .config_checks import check_fields, epsilon, repeated
from .decoding import (cache_length, check_cache_options, decoder_input_specs, decoder_state, encoder_states_specs,
                       last_tokens, token_positions)
from .hf_options import HF_ACTIVATIONS
from .registry import register_model

POSITION_OFFSET = 2          # fairseq's two reserved rows at the start of the position table


@dataclass
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = repeated(12)         # encoder blocks
    decoder_layers: int = repeated(12)         # decoder blocks
    encoder_attention_heads: int = 16          # heads of the encoder's self-attention
    decoder_attention_heads: int = 16          # heads of the decoder's self- and cross-attention
    encoder_ffn_dim: int = 4096                # the encoder's feed-forward width
    decoder_ffn_dim: int = 4096                # the decoder's feed-forward width
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"          # ours: gelu (erf), gelu_tanh, relu, silu
    layer_norm_eps: float = epsilon(1e-5)
    scale_embedding: bool = False              # token embeddings times √d_model
    normalize_before: bool = False             # mBART: pre-LN blocks and a final LayerNorm per stack
    tie_word_embeddings: bool = True           # LM head = the decoder's token embedding (else its own lm_head)
    shared_embeddings: bool = True             # encoder and decoder read one token table (else one each)
    final_logits_bias: bool = True             # the head adds a learned [1, vocab] bias
    lm_head: bool = True                       # False: BartModel, outputs the decoder's last_hidden_state
    use_decoder_attention_mask: bool = False   # adds `decoder_attention_mask` (only needed for left-padded targets)
    part: str = "full"                         # "encoder" | "decoder": one half (generation runs the encoder once)
    use_cache: bool = False                    # KV-cache decoder (self-attention cache, reads cross K/V); encoder: returns cross K/V
    kv_cache: str = "dynamic"                  # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                      # positions of a static cache (0: max_position_embeddings, capped at 4096)
    family: ClassVar[str] = "bart"             # the name in messages

    def __post_init__(self):
        check_fields(self, self.family)
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                     "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{self.family}: {name} must be positive, got {getattr(self, name)}")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ConfigError(f"{self.family}: d_model ({self.d_model}) is not divisible by {heads} "
                                  f"({getattr(self, heads)})")
        if self.activation_function not in set(HF_ACTIVATIONS.values()):
            raise ConfigError(f"{self.family}: activation_function {self.activation_function!r} is not supported "
                              f"(supported: {', '.join(sorted(set(HF_ACTIVATIONS.values())))})")
        check_cache_options(self, self.family, encoder_decoder=True)
        cache_length(self, self.max_position_embeddings)

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads


# ---------------------------------------------------------------- blocks
def sublayer(x, norm: LayerNorm, fn, pre_norm: bool):
    """BART's post-LN LN(x + f(x)), or mBART's pre-LN x + f(LN(x))."""
    return x + fn(norm(x)) if pre_norm else norm(x + fn(x))


class EncoderLayer(Module):
    def __init__(self, c: BartConfig):
        super().__init__()
        self.pre_norm = c.normalize_before
        self.self_attn = MultiHeadAttention(c.d_model, c.encoder_attention_heads)
        self.self_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.ffn = FeedForward(c.d_model, c.encoder_ffn_dim, act=c.activation_function)
        self.ffn_norm = LayerNorm(c.d_model, c.layer_norm_eps)

    def forward(self, x, keep):                                          # x: (B, S, C)
        x = sublayer(x, self.self_attn_norm, lambda h: self.self_attn(h, keep_mask=keep), self.pre_norm)
        return sublayer(x, self.ffn_norm, self.ffn, self.pre_norm)


class DecoderLayer(Module):
    def __init__(self, c: BartConfig):
        super().__init__()
        self.pre_norm = c.normalize_before
        self.self_attn = MultiHeadAttention(c.d_model, c.decoder_attention_heads, causal=True)
        self.self_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(c.d_model, c.decoder_attention_heads)
        self.cross_attn_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.ffn = FeedForward(c.d_model, c.decoder_ffn_dim, act=c.activation_function)
        self.ffn_norm = LayerNorm(c.d_model, c.layer_norm_eps)

    def forward(self, y, keep, memory, memory_keep, cache=None, cross=None):   # y: (B, T, C), memory: (B, S, C)
        y = sublayer(y, self.self_attn_norm, lambda h: self.self_attn(h, keep_mask=keep, cache=cache), self.pre_norm)
        y = sublayer(y, self.cross_attn_norm,
                     lambda h: self.cross_attn(h, kv=memory, keep_mask=memory_keep, cache=cross), self.pre_norm)
        return sublayer(y, self.ffn_norm, self.ffn, self.pre_norm)


class Stack(Module):
    """Token + position embeddings, `layernorm_embedding`, the layers (+ mBART's final norm)."""

    def __init__(self, c: BartConfig, decoder: bool):
        super().__init__()
        self.scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.positions = LearnedPositions(c.max_position_embeddings + POSITION_OFFSET, c.d_model)
        self.embed_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        layer = DecoderLayer if decoder else EncoderLayer
        self.layers = ModuleList([layer(c) for _ in range(c.decoder_layers if decoder else c.encoder_layers)])
        if c.normalize_before:
            self.final_norm = LayerNorm(c.d_model, c.layer_norm_eps)
        self.has_final_norm = c.normalize_before

    def embed(self, tokens: Embedding, ids, pos=None):
        pos = positions(ids) if pos is None else pos                     # (T,) from 0, or a cache's (T,) / (B, T)
        x = tokens(ids)                                                  # (B, T, C)
        x = x * self.scale if self.scale != 1.0 else x
        return self.embed_norm(x + self.positions(pos + POSITION_OFFSET))   # (B, T, C) + ((B,) T, C)

    def finish(self, x):
        return self.final_norm(x) if self.has_final_norm else x


class Bart(Module):
    def __init__(self, config: BartConfig):
        super().__init__()
        c = self.config = config
        self.shared = Embedding(c.vocab_size, c.d_model)                 # the encoder's (and, shared, the decoder's)
        if not c.shared_embeddings:
            self.decoder_embed = Embedding(c.vocab_size, c.d_model)
        self.encoder = Stack(c, decoder=False)
        self.decoder = Stack(c, decoder=True)
        if c.lm_head and not c.tie_word_embeddings:
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)
        if c.lm_head and c.final_logits_bias:
            self.logits_bias = Parameter((1, c.vocab_size), init="zeros")

    @property
    def decoder_tokens(self) -> Embedding:
        return self.shared if self.config.shared_embeddings else self.decoder_embed

    def input_specs(self):
        c = self.config
        src = InputSpec(DType.int64, ("batch", "seq"))
        if c.part == "encoder":
            return {"input_ids": src, "attention_mask": src}
        if c.part == "decoder":
            specs = decoder_input_specs(c, c.decoder_layers, c.decoder_attention_heads, c.decoder_head_dim,
                                        mask=c.use_decoder_attention_mask, positions=False)
            # with a cache, the encoder's cross-attention K/V (computed once per source) instead of its states
            cross = cross_attention_specs(c.decoder_layers, c.decoder_attention_heads, c.decoder_head_dim) \
                if c.use_cache else {}
            return {**specs, **cross, **encoder_states_specs(c.d_model, states=not c.use_cache)}
        tgt = InputSpec(DType.int64, ("batch", "decoder_seq"))
        specs = {"input_ids": src, "attention_mask": src, "decoder_input_ids": tgt}
        if c.use_decoder_attention_mask:
            specs["decoder_attention_mask"] = tgt
        return specs

    def encode(self, input_ids, keep):
        x = self.encoder.embed(self.shared, input_ids)                   # (B, S, C)
        for layer in self.encoder.layers:
            x = layer(x, keep)
        return self.encoder.finish(x)                                    # (B, S, C)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, **past):
        c = self.config
        if c.part == "decoder":           # input_ids are the decoder's; attention_mask its own padding
            past = dict(past)
            cross = cross_attention_caches(past, c.decoder_layers) if c.use_cache else None
            keep, cache, _ = decoder_state(c, c.decoder_layers, attention_mask, past, input_ids)
            out = self.decode(input_ids, keep, encoder_hidden_states,
                              padding_keep_mask(encoder_attention_mask), cache, cross)
            return {**out, **(cache.outputs() if cache else {})}
        keep = padding_keep_mask(attention_mask)                         # (B, 1, 1, S)
        memory = self.encode(input_ids, keep)                            # (B, S, C)
        if c.part == "encoder":
            cross = cross_attention_outputs([layer.cross_attn for layer in self.decoder.layers], memory) \
                if c.use_cache else {}
            return {"last_hidden_state": memory, **cross}
        target_keep = padding_keep_mask(decoder_attention_mask) if decoder_attention_mask is not None else None
        return {**self.decode(decoder_input_ids, target_keep, memory, keep), "encoder_last_hidden_state": memory}

    def decode(self, ids, target_keep, memory, memory_keep, cache=None, cross=None):
        """target_keep: (B, 1, 1, P + T) or None; a static cache reads valid lengths instead and
        computes logits at each row's last token only."""
        c = self.config
        y = self.decoder.embed(self.decoder_tokens, ids, token_positions(cache, ids))   # (B, T, C)
        for layer, layer_cache, layer_cross in zip(self.decoder.layers, layer_caches(cache, c.decoder_layers),
                                                   cross or [None] * c.decoder_layers):
            y = layer(y, target_keep, memory, memory_keep, layer_cache, layer_cross)
        y = last_tokens(cache, self.decoder.finish(y))                   # (B, T, C); static cache: (B, 1, C)
        if not c.lm_head:
            return {"last_hidden_state": y}
        logits = y @ self.decoder_tokens.weight.swap_last() if c.tie_word_embeddings else self.lm_head(y)  # (B, T, V)
        return {"logits": logits + self.logits_bias if c.final_logits_bias else logits}


@register_model("bart", BartConfig)
def build(config: BartConfig) -> Bart:
    return Bart(config)


@dataclass
class MBartConfig(BartConfig):
    """mBART's defaults (mbart-large-cc25): pre-LN blocks, scaled token embeddings."""

    normalize_before: bool = True
    scale_embedding: bool = True
    family: ClassVar[str] = "mbart"


@register_model("mbart", MBartConfig)
def build_mbart(config: MBartConfig) -> Bart:
    return Bart(config)


# ---------------------------------------------------------------- Hugging Face checkpoints
# model_type -> {architecture: has an LM head}
ARCHITECTURES = {
    "bart": {"BartForConditionalGeneration": True, "BartModel": False},
    "mbart": {"MBartForConditionalGeneration": True, "MBartModel": False},
}
# Options of old (transformers 3) configs that change the numbers: (bart's value, mbart's value).
# Each must be absent or equal the model type's own.
LEGACY_OPTIONS = {
    "normalize_before": (False, True),
    "add_final_layer_norm": (False, True),
    "normalize_embedding": (True, True),
    "static_position_embeddings": (False, False),
    "add_bias_logits": (False, False),
    "extra_pos_embeddings": (POSITION_OFFSET, POSITION_OFFSET),
}


def accepts(hf: Mapping[str, Any]) -> Optional[str]:
    model_type = hf.get("model_type")
    known = ARCHITECTURES[model_type]
    archs = hf.get("architectures") or [next(iter(known))]
    if not isinstance(archs, list) or archs[0] not in known:
        return f"{model_type}: architectures={archs!r} is not supported (supported: {', '.join(known)})"
    for key, values in LEGACY_OPTIONS.items():
        want = values[model_type == "mbart"]
        if key in hf and hf[key] is not None and hf[key] != want:
            return f"{model_type}: config option {key}={hf[key]!r} is not supported (only {want!r})"
    return None


def config_from_hf(hf: Dict[str, Any]) -> BartConfig:
    model_type = hf.get("model_type")
    act = hf.get("activation_function", "gelu")
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise ConfigError(f"{model_type}: config option activation_function={act!r} is not supported "
                          f"(supported: {', '.join(sorted(HF_ACTIVATIONS))})")
    archs = hf.get("architectures") or [next(iter(ARCHITECTURES[model_type]))]
    defaults = BartConfig()

    def get(key):
        value = hf.get(key)
        return getattr(defaults, key) if value is None else value
    tie = hf.get("tie_word_embeddings", True)
    cls = MBartConfig if model_type == "mbart" else BartConfig      # (HF's defaults are the same for both)
    return cls(
        vocab_size=get("vocab_size"), d_model=get("d_model"),
        encoder_layers=get("encoder_layers"), decoder_layers=get("decoder_layers"),
        encoder_attention_heads=get("encoder_attention_heads"), decoder_attention_heads=get("decoder_attention_heads"),
        encoder_ffn_dim=get("encoder_ffn_dim"), decoder_ffn_dim=get("decoder_ffn_dim"),
        max_position_embeddings=get("max_position_embeddings"),
        activation_function=HF_ACTIVATIONS[act],
        scale_embedding=get("scale_embedding"),
        normalize_before=model_type == "mbart",
        tie_word_embeddings=True if tie is None else tie,
        lm_head=ARCHITECTURES[model_type].get(archs[0], True),
    )


def _differs(source, name: str, other: str) -> bool:
    return not np.array_equal(np.asarray(source.get(name)), np.asarray(source.get(other)))


def refine(config: BartConfig, source) -> BartConfig:
    """Choices only the tensors reveal. Stored copies of the token table in each stack that
    differ from `shared.weight` (transformers >= 5 unties all three with tie_word_embeddings=false)
    are the stacks' own tables; a stored `lm_head.weight` is the head; no `final_logits_bias`
    (HF lets it be missing) means none."""
    changes: Dict[str, Any] = {}
    copies = [n for n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") if n in source]
    if copies and ("shared.weight" not in source or any(_differs(source, n, "shared.weight") for n in copies)):
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if name not in source:
                raise CheckpointError(f"{source.directory}: missing tensor {name!r} (the stacks have their own "
                                      "token tables, so both must be stored)")
        changes["shared_embeddings"] = False
    if config.lm_head and config.tie_word_embeddings and "lm_head.weight" in source:
        changes["tie_word_embeddings"] = False
    if changes.get("shared_embeddings") is False and config.lm_head and \
            changes.get("tie_word_embeddings", config.tie_word_embeddings):
        raise CheckpointError(f"{source.directory}: the stacks have their own token tables but the head is tied to "
                              "'shared.weight', a third table (not supported; store lm_head.weight)")
    if config.lm_head and "final_logits_bias" not in source:
        changes["final_logits_bias"] = False
    return dataclasses.replace(config, **changes) if changes else config


def weight_map(c: BartConfig) -> Dict[str, WeightRule]:
    if c.shared_embeddings:
        w: Dict[str, WeightRule] = {"shared.weight": rule("shared.weight")}
    else:
        w = {"shared.weight": rule("encoder.embed_tokens.weight"),
             "decoder_embed.weight": rule("decoder.embed_tokens.weight")}
    for stack, layers, decoder in (("encoder", c.encoder_layers, False), ("decoder", c.decoder_layers, True)):
        w[f"{stack}.positions.weight"] = rule(f"{stack}.embed_positions.weight")
        w[f"{stack}.embed_norm.weight"] = rule(f"{stack}.layernorm_embedding.weight")
        w[f"{stack}.embed_norm.bias"] = rule(f"{stack}.layernorm_embedding.bias")
        if c.normalize_before:
            w[f"{stack}.final_norm.weight"] = rule(f"{stack}.layer_norm.weight")
            w[f"{stack}.final_norm.bias"] = rule(f"{stack}.layer_norm.bias")
        for i in range(layers):
            hf, ours = f"{stack}.layers.{i}", f"{stack}.layers.{i}"
            attentions = [("self_attn", "self_attn")] + ([("encoder_attn", "cross_attn")] if decoder else [])
            for hf_attn, our_attn in attentions:
                for proj, our_proj in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                       ("out_proj", "o_proj")):
                    linear(f"{hf}.{hf_attn}.{proj}", f"{ours}.{our_attn}.{our_proj}", weights=w)
                w[f"{ours}.{our_attn}_norm.weight"] = rule(f"{hf}.{hf_attn}_layer_norm.weight")
                w[f"{ours}.{our_attn}_norm.bias"] = rule(f"{hf}.{hf_attn}_layer_norm.bias")
            linear(f"{hf}.fc1", f"{ours}.ffn.up", weights=w)
            linear(f"{hf}.fc2", f"{ours}.ffn.down", weights=w)
            w[f"{ours}.ffn_norm.weight"] = rule(f"{hf}.final_layer_norm.weight")
            w[f"{ours}.ffn_norm.bias"] = rule(f"{hf}.final_layer_norm.bias")
    if c.lm_head and not c.tie_word_embeddings:
        w["lm_head.weight"] = rule("lm_head.weight", fn=transposed)
    if c.lm_head and c.final_logits_bias:
        w["logits_bias"] = rule("final_logits_bias")
    return w


register_adapter(HFAdapter(
    family="bart",
    model_types=("bart", "mbart"),
    config_from_hf=config_from_hf,
    weight_map=weight_map,
    # The stacks' copies of the shared token table (checked equal in `refine`, else mapped), and
    # `shared.weight` itself when the stacks have their own tables (HF's forward never reads it).
    ignore=(r"(encoder|decoder)\.embed_tokens\.weight", r"shared\.weight"),
    accepts=accepts,
    base_prefixes=("model.",),
    refine=refine,
))
