"""T5 (Raffel et al. 2020): an encoder-decoder with pre-norm RMS blocks and relative position bias.

    h = x + SelfAttn(RMSNorm(x), bias=relative_position_bias)      scores are QKᵀ + bias, no 1/√d
    h = h + CrossAttn(RMSNorm(h), encoder output)                   decoder only, no position bias
    y = h + FFN(RMSNorm(h))                                         relu (T5 v1.0) or GeGLU (v1.1)

Norms are T5LayerNorm = RMSNorm (no mean, no bias; HF's float32 variance is what a float32
graph computes anyway), projections have no biases, and each stack ends with a final norm. The position bias is a learned [num_buckets, H] table indexed
by a log-bucketed relative distance j - i (bidirectional in the encoder, causal-only in the
decoder); it is computed once per stack and shared by all its layers, exactly as HF's
block 0 computes it and hands it down. Inner attention width is num_heads · d_kv, which
need not equal d_model.

Head: `tie_word_embeddings` multiplies the decoder output by d_model^-0.5 and projects on
the shared embedding; an untied checkpoint has its own `lm_head` and (HF `scale_decoder_outputs`)
no rescaling. Defaults are t5-small.

Inputs: input_ids, attention_mask (source padding, also masks cross-attention) and
decoder_input_ids. `decoder_attention_mask` is an input only with use_decoder_attention_mask:
the causal mask already keeps a right-padded target row's real tokens exact, so only
left-padded targets need it. Outputs: logits (T5Model: last_hidden_state) and
encoder_last_hidden_state. For generation, part="encoder" with use_cache also returns every
decoder layer's cross-attention keys/values, which the cached decoder (part="decoder") reads
instead of the encoder states (`tgraph.dsl.cache.CROSS`): projected once per source. With
kv_cache="static" the decoder's self-attention is GroupQueryAttention over fixed buffers and the
position bias its `attention_bias` over the buffer's columns (`RelativePositionBias.over_buffer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..checkpoints import HFAdapter, WeightRule, linear, register_adapter, rule, transposed
from ..dsl import (Embedding, FeedForward, InputSpec, Linear, Module, ModuleList, MultiHeadAttention, Parameter,
                   RMSNorm, Tensor, arange, padding_keep_mask, where)
from ..dsl.cache import cross_attention_caches, cross_attention_outputs, cross_attention_specs, layer_caches
from ..dsl.tracer import current
from ..errors import CheckpointError, ConfigError
from ..ir import DType
from .hf_options import HF_ACTIVATIONS
from .decoding import (cache_length, check_cache_options, decoder_input_specs, decoder_state, encoder_states_specs,
                       last_tokens)
from .config_checks import check_fields, epsilon, repeated
from .registry import register_model

# HF feed_forward_proj "[gated-]ACT" -> (gated, our activation). HF reads "gated-gelu" as gelu_new
# (the tanh approximation), plain "gelu" as the exact erf GELU.
FEED_FORWARD = {
    "relu": (False, "relu"),
    "gated-gelu": (True, "gelu_tanh"),
    "gelu": (False, "gelu"),
    "gated-relu": (True, "relu"),
    "gated-silu": (True, "silu"),
}


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64                             # per-head width; num_heads * d_kv may differ from d_model
    d_ff: int = 2048
    num_heads: int = 8
    num_layers: int = repeated(6)                       # encoder blocks
    num_decoder_layers: Optional[int] = repeated(None)  # None: = num_layers
    relative_attention_num_buckets: int = 32           # buckets of the relative-position attention bias
    relative_attention_max_distance: int = 128         # distance from which positions share the last bucket
    layer_norm_epsilon: float = epsilon(1e-6)
    feed_forward_proj: str = "relu"            # one of FEED_FORWARD: "relu" (v1.0), "gated-gelu" (v1.1) ...
    tie_word_embeddings: bool = True           # LM head = shared embedding (else its own lm_head)
    scale_decoder_outputs: Optional[bool] = None   # y * d_model^-0.5 before the head; None: = tie_word_embeddings
    lm_head: bool = True                       # False: T5Model, outputs the decoder's last_hidden_state
    use_decoder_attention_mask: bool = False   # adds `decoder_attention_mask` (only needed for left-padded targets)
    part: str = "full"                         # "encoder" | "decoder": export one half (generation runs the encoder once)
    use_cache: bool = False                    # KV-cache decoder (self-attention cache, reads cross K/V); encoder: returns cross K/V
    kv_cache: str = "dynamic"                  # with use_cache: "dynamic" (Concat) or "static" (buffers written in place)
    cache_length: int = 0                      # positions of a static cache (0: models.decoding.DEFAULT_CACHE_LENGTH)

    def __post_init__(self):
        check_fields(self, "t5")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"t5: {name} must be positive, got {getattr(self, name)}")
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ConfigError(f"t5: num_decoder_layers must be positive, got {self.num_decoder_layers}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(f"t5: relative_attention_num_buckets must be >= 4 (a bidirectional stack splits them "
                              f"in two, then in exact and log buckets), got {self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ConfigError(f"t5: relative_attention_max_distance ({self.relative_attention_max_distance}) must "
                              f"exceed relative_attention_num_buckets // 2 "
                              f"({self.relative_attention_num_buckets // 2}), where the log buckets start")
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ConfigError(f"t5: feed_forward_proj {self.feed_forward_proj!r} is not supported "
                              f"(supported: {', '.join(FEED_FORWARD)})")
        check_cache_options(self, "t5", encoder_decoder=True)
        cache_length(self)

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def scales_decoder_output(self) -> bool:
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs


# ---------------------------------------------------------------- relative position buckets
def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """T5's bucket of each relative position j - i (Mesh TensorFlow's formula, as in HF).

    Half the buckets of a direction are exact distances 0 .. max_exact-1; the rest grow
    logarithmically up to max_distance, beyond which everything shares the last bucket.
    The log term is evaluated in float32 like the reference, with a correctly rounded log
    so the table does not depend on the platform's libm. (torch's float32 log is not
    correctly rounded: for a few (num_buckets, max_distance) pairs, none of them T5's
    (32, 128), one distance falls on a bucket boundary and HF's bucket there depends on
    the machine.)
    """
    r = np.asarray(relative_position, dtype=np.int64)
    n = num_buckets
    buckets = np.zeros_like(r)
    if bidirectional:
        n //= 2
        buckets += (r > 0).astype(np.int64) * n
        distance = np.abs(r)
    else:
        distance = -np.minimum(r, 0)                   # future positions (r > 0) fold into bucket 0
    max_exact = n // 2
    ratio = np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact)
    log_ratio = np.log(ratio.astype(np.float64)).astype(np.float32)
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(n - max_exact)).astype(np.int64)
    large = np.minimum(large, n - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class RelativePositionBias(Module):
    """Learned bias [1, H, Tq, Tk] from the bucket of j - i, for runtime lengths Tq, Tk.

    The bucket depends only on r = j - i, and is constant for |r| >= max_distance, so a
    constant table of buckets for r in [-max_distance, max_distance] covers every length:
    at run time r is clipped to that range and looked up; no sequence-length cap.
    """

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int, bidirectional: bool,
                 std: float = 0.02):
        super().__init__()
        self.max_distance = max_distance
        self.weight = Parameter((num_buckets, num_heads), std=std)
        r = np.arange(-max_distance, max_distance + 1)
        self.table = relative_position_bucket(r, bidirectional, num_buckets, max_distance)  # (2M+1,) int64

    def forward(self, q_len, k_len, q_offset=None):                      # 0-d int64 runtime lengths
        """Queries sit at q_offset .. q_offset + Tq - 1 (a KV cache's past length; default 0)."""
        rows = arange(0, q_len) if q_offset is None else arange(q_offset, q_offset + q_len)   # (Tq,)
        rel = arange(0, k_len).unsqueeze(0) - rows.unsqueeze(1)            # (1, Tk) - (Tq, 1) -> (Tq, Tk): j - i
        return self.lookup(rel).transpose(2, 0, 1).unsqueeze(0)             # (Tq, Tk, H) -> (1, H, Tq, Tk)

    def over_buffer(self, offsets):
        """The bias of a static cache: `offsets` j - p (B, S, L) -> (B, H, S, L), one row per
        batch entry since each row's queries sit at its own position p."""
        return self.lookup(offsets).transpose(0, 3, 1, 2)                  # (B, S, L, H) -> (B, H, S, L)

    def lookup(self, rel):
        """rel (..., Tk) int64 relative positions -> (..., Tk, H) learned biases."""
        m = self.max_distance
        rel = where(rel < -m, -m, where(rel > m, m, rel))                   # clipped to [-M, M]
        table = Tensor(current().builder.const(self.table, hint="relative_buckets"))      # (2M+1,) int64
        buckets = table.gather(rel + m)                                     # (2M+1,)[rel] -> rel's shape
        return self.weight.gather(buckets)                                  # (nb, H)[buckets] -> (..., H)


# ---------------------------------------------------------------- blocks
class T5Block(Module):
    def __init__(self, c: T5Config, decoder: bool):
        super().__init__()
        self.decoder = decoder
        gated, act = FEED_FORWARD[c.feed_forward_proj]
        std = c.d_model ** -0.5

        def attn(causal):
            return MultiHeadAttention(c.d_model, c.num_heads, head_dim=c.d_kv, bias=False, causal=causal,
                                      scale=1.0, std=std)

        self.self_attn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.self_attn = attn(causal=decoder)
        if decoder:
            self.cross_attn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
            self.cross_attn = attn(causal=False)
        self.ffn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
        self.ffn = FeedForward(c.d_model, c.d_ff, act=act, gated=gated, bias=False, std=std)

    def forward(self, x, keep, bias, memory=None, memory_keep=None, cache=None, cross=None):
        """x: (B, T, C), bias: (1, H, T, P+T), memory: (B, S, C) or `cross` (the cached cross K/V)."""
        x = x + self.self_attn(self.self_attn_norm(x), keep_mask=keep, bias=bias, cache=cache)
        if self.decoder:                                                   # memory: (B, S, C), or cross K/V
            x = x + self.cross_attn(self.cross_attn_norm(x), kv=memory, keep_mask=memory_keep, cache=cross)
        return x + self.ffn(self.ffn_norm(x))


class T5Stack(Module):
    """Blocks sharing one relative position bias, then a final norm."""

    def __init__(self, c: T5Config, decoder: bool):
        super().__init__()
        layers = c.decoder_layers if decoder else c.num_layers
        self.relative_bias = RelativePositionBias(c.relative_attention_num_buckets, c.num_heads,
                                                  c.relative_attention_max_distance, bidirectional=not decoder,
                                                  std=c.d_model ** -0.5)
        self.blocks = ModuleList([T5Block(c, decoder) for _ in range(layers)])
        self.final_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, keep, memory=None, memory_keep=None, cache=None, cross=None):   # x: (B, T, C)
        length = x.shape_of(1, 2).squeeze(0)                              # [T] -> T (0-d)
        if cache is None:
            bias = self.relative_bias(length, length)                     # (1, H, T, T)
        elif cache.layout == "static":                                    # over the buffer's columns
            bias = self.relative_bias.over_buffer(cache.key_offsets())    # (B, H, T, total_sequence_length)
        else:                                                             # new queries follow the past
            past = cache.past_length()
            bias = self.relative_bias(length, past + length, q_offset=past)   # (1, H, T, P + T)
        for block, layer_cache, layer_cross in zip(self.blocks, layer_caches(cache, len(self.blocks)),
                                                   cross or [None] * len(self.blocks)):
            x = block(x, keep, bias, memory, memory_keep, layer_cache, layer_cross)
        return self.final_norm(x)


class T5(Module):
    def __init__(self, config: T5Config):
        super().__init__()
        c = self.config = config
        self.shared = Embedding(c.vocab_size, c.d_model, std=1.0)
        self.encoder = T5Stack(c, decoder=False)
        self.decoder = T5Stack(c, decoder=True)
        if c.lm_head and not c.tie_word_embeddings:
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, std=1.0)

    def input_specs(self):
        c = self.config
        src = InputSpec(DType.int64, ("batch", "seq"))
        if c.part == "encoder":
            return {"input_ids": src, "attention_mask": src}
        if c.part == "decoder":           # with a cache, the encoder's cross-attention K/V instead of its states
            specs = decoder_input_specs(c, c.decoder_layers, c.num_heads, c.d_kv,
                                        mask=c.use_decoder_attention_mask, positions=False)
            cross = cross_attention_specs(c.decoder_layers, c.num_heads, c.d_kv) if c.use_cache else {}
            return {**specs, **cross, **encoder_states_specs(c.d_model, states=not c.use_cache)}
        tgt = InputSpec(DType.int64, ("batch", "decoder_seq"))
        specs = {"input_ids": src, "attention_mask": src, "decoder_input_ids": tgt}
        if c.use_decoder_attention_mask:
            specs["decoder_attention_mask"] = tgt
        return specs

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
        keep = padding_keep_mask(attention_mask)                          # (B, 1, 1, S)
        memory = self.encoder(self.shared(input_ids), keep)               # (B, S, C)
        if c.part == "encoder":
            cross = cross_attention_outputs([b.cross_attn for b in self.decoder.blocks], memory) if c.use_cache else {}
            return {"last_hidden_state": memory, **cross}
        target_keep = padding_keep_mask(decoder_attention_mask) if decoder_attention_mask is not None else None
        return {**self.decode(decoder_input_ids, target_keep, memory, keep), "encoder_last_hidden_state": memory}

    def decode(self, ids, target_keep, memory, memory_keep, cache=None, cross=None):
        """target_keep: (B, 1, 1, P + T) or None; a static cache reads valid lengths instead and
        computes logits at each row's last token only."""
        c = self.config
        y = self.decoder(self.shared(ids), target_keep, memory, memory_keep, cache, cross)   # (B, T, C)
        y = last_tokens(cache, y)                                         # static cache: (B, 1, C)
        if not c.lm_head:
            return {"last_hidden_state": y}
        if c.scales_decoder_output:
            y = y * (c.d_model ** -0.5)
        if c.tie_word_embeddings:
            return {"logits": y @ self.shared.weight.swap_last()}        # (B, T, C) @ (C, V) -> (B, T, V)
        return {"logits": self.lm_head(y)}                                # (B, T, V)


@register_model("t5", T5Config)
def build(config: T5Config) -> T5:
    return T5(config)


# ---------------------------------------------------------------- Hugging Face checkpoints
ARCHITECTURES = {"T5ForConditionalGeneration": True, "T5Model": False}    # -> has an LM head


def accepts(hf: Mapping[str, Any]) -> Optional[str]:
    archs = hf.get("architectures") or ["T5ForConditionalGeneration"]
    if archs[0] not in ARCHITECTURES:
        return (f"t5: architectures={archs!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})")
    return None


def _feed_forward_from_hf(hf: Mapping[str, Any]) -> str:
    """HF's `dense_act_fn`/`is_gated_act` (written next to feed_forward_proj, and winning over it
    when present) must agree with the feed_forward_proj we implement."""
    proj = hf.get("feed_forward_proj", "relu")
    if not isinstance(proj, str) or proj not in FEED_FORWARD:
        raise ConfigError(f"t5: config option feed_forward_proj={proj!r} is not supported "
                          f"(supported: {', '.join(repr(p) for p in FEED_FORWARD)})")
    gated, act = FEED_FORWARD[proj]
    hf_act = hf.get("dense_act_fn")
    if hf_act is not None and (not isinstance(hf_act, str) or HF_ACTIVATIONS.get(hf_act) != act):
        raise ConfigError(f"t5: config option dense_act_fn={hf_act!r} is not supported with "
                          f"feed_forward_proj={proj!r} (expected the activation it names)")
    if hf.get("is_gated_act") is not None and bool(hf["is_gated_act"]) != gated:
        raise ConfigError(f"t5: config option is_gated_act={hf['is_gated_act']!r} contradicts "
                          f"feed_forward_proj={proj!r}")
    return proj


def config_from_hf(hf: Dict[str, Any]) -> T5Config:
    """HF T5 config.json -> T5Config. transformers >= 5 always writes tie_word_embeddings=true and
    records the old meaning of `false` as scale_decoder_outputs=false; whether the head is the
    shared embedding is then told by the weights (see `refine`)."""
    tie = hf.get("tie_word_embeddings", True)
    tie = True if tie is None else tie
    scale = hf.get("scale_decoder_outputs")
    archs = hf.get("architectures") or ["T5ForConditionalGeneration"]
    return T5Config(
        vocab_size=hf.get("vocab_size", 32128),
        d_model=hf.get("d_model", 512),
        d_kv=hf.get("d_kv", 64),
        d_ff=hf.get("d_ff", 2048),
        num_heads=hf.get("num_heads", 8),
        num_layers=hf.get("num_layers", 6),
        num_decoder_layers=hf.get("num_decoder_layers"),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=_feed_forward_from_hf(hf),
        tie_word_embeddings=tie,
        scale_decoder_outputs=tie if scale is None else scale,
        lm_head=ARCHITECTURES.get(archs[0], True),
    )


def refine(config: T5Config, source) -> T5Config:
    """Choices only the tensors reveal. A stored `lm_head.weight` is the head (HF unties it when
    present, whatever the config says); stored copies of the embedding in each stack must equal
    `shared.weight`, since this model (like HF's tying) reads tokens through one table."""
    import dataclasses

    if config.lm_head and config.tie_word_embeddings and "lm_head.weight" in source:
        config = dataclasses.replace(config, tie_word_embeddings=False,
                                     scale_decoder_outputs=config.scales_decoder_output)
    for stored in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if stored in source and "shared.weight" in source:
            if not np.array_equal(source.get(stored), source.get("shared.weight")):
                raise CheckpointError(f"{source.directory}: tensor {source.original(stored)!r} differs from "
                                      "'shared.weight' (separate encoder/decoder embeddings are not supported)")
    return config


def weight_map(c: T5Config) -> Dict[str, WeightRule]:
    w: Dict[str, WeightRule] = {"shared.weight": rule("shared.weight")}
    gated, _ = FEED_FORWARD[c.feed_forward_proj]
    for stack, layers, decoder in (("encoder", c.num_layers, False), ("decoder", c.decoder_layers, True)):
        w[f"{stack}.relative_bias.weight"] = rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(layers):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}.blocks.{i}"
            sub = [("0.SelfAttention", "self_attn")] + ([("1.EncDecAttention", "cross_attn")] if decoder else [])
            for hf_sub, our_sub in sub:
                for proj, our_proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
                    linear(f"{hf}.{hf_sub}.{proj}", f"{ours}.{our_sub}.{our_proj}", bias=False, weights=w)
                w[f"{ours}.{our_sub}_norm.weight"] = rule(f"{hf}.{hf_sub.split('.')[0]}.layer_norm.weight")
            ff = f"{hf}.{2 if decoder else 1}"
            if gated:
                linear(f"{ff}.DenseReluDense.wi_0", f"{ours}.ffn.gate", bias=False, weights=w)
                linear(f"{ff}.DenseReluDense.wi_1", f"{ours}.ffn.up", bias=False, weights=w)
            else:
                linear(f"{ff}.DenseReluDense.wi", f"{ours}.ffn.up", bias=False, weights=w)
            linear(f"{ff}.DenseReluDense.wo", f"{ours}.ffn.down", bias=False, weights=w)
            w[f"{ours}.ffn_norm.weight"] = rule(f"{ff}.layer_norm.weight")
        w[f"{stack}.final_norm.weight"] = rule(f"{stack}.final_layer_norm.weight")
    if c.lm_head and not c.tie_word_embeddings:
        w["lm_head.weight"] = rule("lm_head.weight", fn=transposed)
    return w


register_adapter(HFAdapter(
    family="t5",
    model_types=("t5",),
    config_from_hf=config_from_hf,
    weight_map=weight_map,
    # Stack copies of the shared embedding (checked equal in `refine`); an unused cross-attention
    # position table that original T5 checkpoints carry and HF ignores too.
    ignore=(r"(encoder|decoder)\.embed_tokens\.weight",
            r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
    accepts=accepts,
    refine=refine,
))
