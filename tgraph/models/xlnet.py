"""XLNet (Yang et al. 2019) in inference: the content stream of its relative-position encoder.

With no permutation mask and no target mapping (what inference passes), XLNet is a post-LN
encoder whose attention score between query i and key j is

    s_ij = [(q_i + r_w)·k_j  +  (q_i + r_r)·R_{i-j}  +  (q_i + r_s)·S_{seg(i)≠seg(j)}] / √d

  content term      (q + r_w) Kᵀ: a plain attention on queries shifted by a per-head bias;
  position term     R_p = W_r · [sin(p θ), cos(p θ)], θ_k = 10000^(-2k/d_model), for the relative
                    distances p = T .. -T+1; HF computes (q + r_r) Rᵀ against all 2T of them and
                    `rel_shift`s the [T, 2T] scores so that column j of row i holds p = i - j;
  segment term      one of two learned per-head vectors, by whether i and j are in the same segment.

So the layer is Attention(q + r_w, K, V, scale=1/√d, attn_mask = (position + segment terms)/√d,
with the padding mask), which `fuse-attention` turns into Attention-23 with an additive mask,
like T5's position bias. The rel_shift is a `GatherElements` of column T - i + j from row i:
HF's reshape [T, 2T] -> [2T, T], drop a row, reshape [T, 2T-1], keep T columns computes the
same entries (flat index T + i(2T-1) + j = 2T·i + (T - i + j)), and the gather's shapes stay
symbolic in the sequence length.

Padding: HF masks key j for query i when j is padding and j ≠ i (a pad query still sees
itself), so no row is ever fully masked. `token_type_ids` are an input unless
`use_token_type_ids=False`, which is HF called without them (no segment term; the same
outputs as all-zero segments, whose term is constant along each row of scores).

`attn_type='uni'` (causal XLNet) sees keys j <= i, and the distances run T .. 0 (T + 1 of them;
the gather index is clipped where j > i, which the mask drops). Refused by name: `bi_data=True`
and uni with `same_length=True` (both change the outputs). `mem_len`,
`reuse_len` and `use_mems_*` only shape the `mems` HF returns; no mems are exported, so
they do not change anything here. Heads: XLNetModel (last_hidden_state) and XLNetLMHeadModel
(logits; `lm_loss` tied to the word embedding with its own bias, or untied).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np

from ..checkpoints import HFAdapter, WeightRule, hf_get, linear, refuse_if, register_adapter, rule, transposed
from ..dsl import (ACTIVATIONS, Embedding, InputSpec, LayerNorm, Linear, Module, ModuleList, Parameter, Tensor,
                   arange, attention, concat, padding_keep_mask, where)
from ..dsl.tensor import _op
from ..dsl.tracer import current
from ..errors import ConfigError
from ..ir import DType
from ..ir.lazy import contiguous
from .bert import head_from_architectures
from .config_checks import check_fields, epsilon, repeated
from .hf_options import activation_from_hf
from .registry import register_model

HEADS = ("base", "lm")
ATTN_TYPES = ("bi", "uni")


@dataclass
class XLNetConfig:
    vocab_size: int = 32000
    d_model: int = 768
    num_layers: int = repeated(12)
    num_heads: int = 12
    d_inner: int = 3072                    # feed-forward width
    ff_activation: str = "gelu"            # feed-forward activation (HF names: gelu, relu, gelu_new, ...)
    layer_norm_eps: float = epsilon(1e-12)
    clamp_len: int = -1                      # > 0: relative distances clipped to ±clamp_len
    attn_type: str = "bi"                    # "bi": bidirectional; "uni": key j <= query i
    use_token_type_ids: bool = True          # False: no segment term (HF called without token_type_ids)
    head: str = "lm"                         # "base": XLNetModel, "lm": XLNetLMHeadModel
    tie_word_embeddings: bool = True

    def __post_init__(self):
        check_fields(self, "xlnet")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_inner"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"xlnet: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"xlnet: d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads})")
        if self.d_model % 2:
            raise ConfigError(f"xlnet: d_model ({self.d_model}) must be even (sin/cos position features)")
        if self.ff_activation not in ACTIVATIONS:
            raise ConfigError(f"xlnet: ff_activation {self.ff_activation!r} unknown "
                              f"(known: {', '.join(sorted(ACTIVATIONS))})")
        if self.attn_type not in ATTN_TYPES:
            raise ConfigError(f"xlnet: attn_type must be one of {', '.join(ATTN_TYPES)}, got {self.attn_type!r}")
        if self.head not in HEADS:
            raise ConfigError(f"xlnet: head must be one of {', '.join(HEADS)}, got {self.head!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads


def relative_positions(ids: Tensor, d_model: int, clamp_len: int, uni: bool = False) -> Tensor:
    """[sin(p θ), cos(p θ)] for p = T, T-1, .., -T+1 (HF's `relative_positional_encoding`, bi
    attention, no mems; uni: p = T .. 0): (2T or T+1, d_model), built once per trace from the run's length."""
    def make():
        seq = ids.shape_of(1, 2).squeeze(0)                                 # () int64: T
        pos = seq - arange(0, seq + 1 if uni else seq * 2)                  # (2T,) or (T+1,): T - c
        if clamp_len > 0:
            pos = where(pos > clamp_len, np.array(clamp_len, np.int64), pos)
            pos = where(pos < -clamp_len, np.array(-clamp_len, np.int64), pos)
        inv = 1.0 / np.power(10000.0, np.arange(0, d_model, 2, dtype=np.float64) / d_model)
        angle = pos.cast(DType.float32).unsqueeze(1) * inv.astype(np.float32)   # (2T, 1) * (C/2,) -> (2T, C/2)
        return concat([angle.sin(), angle.cos()], axis=-1).value            # (2T, C)
    return Tensor(current().cached(("xlnet-positions", ids._value().name, d_model, clamp_len, uni), make))


def shift_index(ids: Tensor, heads: int, uni: bool = False) -> Tensor:
    """(B, H, T, T) int64, entry T - i + j: where HF's rel_shift finds distance i - j in a row of 2T
    (uni: of T + 1, so clipped to T where j > i: entries the causal mask drops)."""
    def make():
        seq = ids.shape_of(1, 2).squeeze(0)                                 # () T
        steps = arange(0, seq)                                              # (T,)
        index = seq - steps.unsqueeze(1) + steps.unsqueeze(0)               # (T, T): T - i + j
        if uni:
            index = where(index > seq, seq, index)
        batch = ids.shape_of(0, 1)                                          # [B]
        shape = concat([batch, np.array([heads], np.int64), ids.shape_of(1, 2), ids.shape_of(1, 2)], axis=0)
        return index.expand(shape).value                                    # (B, H, T, T)
    return Tensor(current().cached(("xlnet-shift", ids._value().name, heads, uni), make))


def keep_mask(ids: Tensor, attention_mask: Tensor, uni: bool = False) -> Tensor:
    """bool (B, 1, T, T): key j is kept for query i when j is a real token (uni: and j <= i) or
    j = i (HF's non_tgt_mask: a padding query still attends to itself)."""
    def make():
        steps = arange(0, ids.shape_of(1, 2).squeeze(0))                    # (T,)
        query, key = steps.unsqueeze(1), steps.unsqueeze(0)                 # (T, 1), (1, T)
        keep = padding_keep_mask(attention_mask)                            # (B, 1, 1, T)
        if uni:
            keep = Tensor(_op("And", keep.value, (key > query).logical_not().value))   # (B, 1, T, T)
        return Tensor(_op("Or", keep.value, query.eq(key).value)).value     # (B, 1, T, T)
    return Tensor(current().cached(("xlnet-keep", attention_mask._value().name, uni), make))


def other_segment(token_type_ids: Tensor) -> Tensor:
    """bool (B, 1, T, T): whether tokens i and j are in different segments."""
    def make():
        return (token_type_ids.unsqueeze(1, 3).eq(token_type_ids.unsqueeze(1, 2))).logical_not().value
    return Tensor(current().cached(("xlnet-segments", token_type_ids._value().name), make))


class RelativeAttention(Module):
    """One XLNet attention block, content stream: attention with the position and segment
    terms as an additive bias, then the output projection, residual and LayerNorm."""

    def __init__(self, c: XLNetConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.d_head
        inner = c.num_heads * c.d_head
        self.q = Linear(c.d_model, inner, bias=False)
        self.k = Linear(c.d_model, inner, bias=False)
        self.v = Linear(c.d_model, inner, bias=False)
        self.r = Linear(c.d_model, inner, bias=False)
        self.o = Linear(inner, c.d_model, bias=False)
        self.r_w_bias = Parameter((c.num_heads, 1, c.d_head))           # HF [H, D], viewed per head
        self.r_r_bias = Parameter((c.num_heads, 1, c.d_head))
        self.r_s_bias = Parameter((c.num_heads, 1, c.d_head))
        self.seg_embed = Parameter((c.num_heads, c.d_head, 2))          # HF [2, H, D] as [H, D, 2]
        self.layer_norm = LayerNorm(c.d_model, c.layer_norm_eps)

    def heads(self, x: Tensor) -> Tensor:
        return x.reshape(0, 0, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)   # (B, T, H*D) -> (B, H, T, D)

    def forward(self, h, positions, shift, keep, segments=None):       # h: (B, T, C); positions: (2T, C)
        q, k, v = self.heads(self.q(h)), self.heads(self.k(h)), self.heads(self.v(h))      # (B, H, T, D)
        kr = self.r(positions.unsqueeze(0))                                 # (1, 2T, H*D)
        kr = self.heads(kr)                                                 # (1, H, 2T, D)
        bd = (q + self.r_r_bias) @ kr.swap_last()                           # (B, H, T, 2T)
        bias = Tensor(_op("GatherElements", bd.value, shift.value, axis=3))  # (B, H, T, T): distance i - j
        if segments is not None:
            ef = (q + self.r_s_bias) @ self.seg_embed                       # (B, H, T, D) @ (H, D, 2) -> (B, H, T, 2)
            same, other = ef.split([1, 1], axis=-1)                         # (B, H, T, 1) each
            bias = bias + where(segments, other, same)                      # (B, H, T, T)
        scale = 1.0 / math.sqrt(self.head_dim)
        context = attention(q + self.r_w_bias, k, v, scale=scale, keep_mask=keep, bias=bias * scale)
        merged = context.transpose(0, 2, 1, 3).reshape(0, 0, self.num_heads * self.head_dim)   # (B, T, H*D)
        return self.layer_norm(self.o(merged) + h)


class FeedForward(Module):
    def __init__(self, c: XLNetConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.ff_activation]
        self.layer_1 = Linear(c.d_model, c.d_inner)
        self.layer_2 = Linear(c.d_inner, c.d_model)
        self.layer_norm = LayerNorm(c.d_model, c.layer_norm_eps)

    def forward(self, x):
        return self.layer_norm(self.layer_2(self.act(self.layer_1(x))) + x)


class XLNetLayer(Module):
    def __init__(self, c: XLNetConfig):
        super().__init__()
        self.rel_attn = RelativeAttention(c)
        self.ff = FeedForward(c)

    def forward(self, h, positions, shift, keep, segments):
        return self.ff(self.rel_attn(h, positions, shift, keep, segments))


class XLNet(Module):
    def __init__(self, config: XLNetConfig):
        super().__init__()
        c = self.config = config
        self.word_embedding = Embedding(c.vocab_size, c.d_model)
        self.layers = ModuleList([XLNetLayer(c) for _ in range(c.num_layers)])
        if c.head == "lm":
            if not c.tie_word_embeddings:
                self.lm_loss = Linear(c.d_model, c.vocab_size, bias=False)
            self.lm_bias = Parameter((c.vocab_size,), init="zeros")

    def input_specs(self):
        ids = InputSpec(DType.int64, ("batch", "seq"))
        specs = {"input_ids": ids, "attention_mask": ids}
        if self.config.use_token_type_ids:
            specs["token_type_ids"] = ids
        return specs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        c = self.config
        uni = c.attn_type == "uni"
        positions = relative_positions(input_ids, c.d_model, c.clamp_len, uni)   # (2T or T+1, C)
        shift = shift_index(input_ids, c.num_heads, uni)                    # (B, H, T, T)
        keep = keep_mask(input_ids, attention_mask, uni)                    # (B, 1, T, T)
        segments = other_segment(token_type_ids) if token_type_ids is not None else None   # (B, 1, T, T)
        h = self.word_embedding(input_ids)                                  # (B, T, C)
        for layer in self.layers:
            h = layer(h, positions, shift, keep, segments)
        if c.head == "base":
            return {"last_hidden_state": h}
        weight = self.word_embedding.weight.swap_last() if c.tie_word_embeddings else self.lm_loss.weight
        return {"logits": h @ weight + self.lm_bias}                         # (B, T, V)


@register_model("xlnet", XLNetConfig)
def build(config: XLNetConfig) -> XLNet:
    return XLNet(config)


# ---------------------------------------------------------------- Hugging Face checkpoints
XLNET_HEADS = {"XLNetModel": "base", "XLNetLMHeadModel": "lm"}


def config_from_hf(hf: Dict[str, Any]) -> XLNetConfig:
    mt = "xlnet"
    refuse_if(hf, "attn_type", list(ATTN_TYPES), mt)
    refuse_if(hf, "bi_data", [False], mt)                  # forward + backward position streams
    if hf.get("attn_type") == "uni":
        refuse_if(hf, "same_length", [False], mt)          # uni + same_length: a sliding causal window
    d_model, heads = hf_get(hf, "d_model", 1024), hf_get(hf, "n_head", 16)
    d_head = hf_get(hf, "d_head", None)
    if d_head is not None and isinstance(d_model, int) and isinstance(heads, int) and heads > 0 \
            and d_head != d_model // heads:
        raise ConfigError(f"{mt}: config option d_head={d_head!r} is not d_model // n_head ({d_model // heads})")
    clamp = hf_get(hf, "clamp_len", -1)
    return XLNetConfig(
        vocab_size=hf_get(hf, "vocab_size", 32000),
        d_model=d_model,
        num_layers=hf_get(hf, "n_layer", 24),
        num_heads=heads,
        d_inner=hf_get(hf, "d_inner", 4096),
        ff_activation=activation_from_hf(hf, mt, "gelu", key="ff_activation"),
        layer_norm_eps=hf_get(hf, "layer_norm_eps", 1e-12),
        clamp_len=clamp,
        attn_type=hf_get(hf, "attn_type", "bi"),
        head=head_from_architectures(hf, XLNET_HEADS, mt),
        tie_word_embeddings=hf_get(hf, "tie_word_embeddings", True),
    )


def weight_map(c: XLNetConfig) -> Dict[str, WeightRule]:
    """Our names -> HF names (the LM head's "transformer." prefix stripped). HF keeps q/k/v/r/o
    as [C, H, D] einsum operands: flattened to our [C, H*D] Linear weights (o transposed)."""
    inner = c.num_heads * c.d_head

    def flat(x):                                   # [C, H, D] -> [C, H*D]
        return contiguous(x.reshape(c.d_model, inner))

    def flat_t(x):                                 # [C, H, D] -> [H*D, C]
        return contiguous(x.reshape(c.d_model, inner).T)

    def per_head(x):                               # [H, D] -> [H, 1, D]
        return contiguous(x.reshape(c.num_heads, 1, c.d_head))

    def segment(x):                                # [2, H, D] -> [H, D, 2]
        return contiguous(x.transpose(1, 2, 0))

    w: Dict[str, WeightRule] = {"word_embedding.weight": rule("word_embedding.weight")}
    for i in range(c.num_layers):
        ours, hf = f"layers.{i}", f"layer.{i}"
        for p in ("q", "k", "v", "r"):
            w[f"{ours}.rel_attn.{p}.weight"] = rule(f"{hf}.rel_attn.{p}", fn=flat)
        w[f"{ours}.rel_attn.o.weight"] = rule(f"{hf}.rel_attn.o", fn=flat_t)
        for b in ("r_w_bias", "r_r_bias", "r_s_bias"):
            w[f"{ours}.rel_attn.{b}"] = rule(f"{hf}.rel_attn.{b}", fn=per_head)
        w[f"{ours}.rel_attn.seg_embed"] = rule(f"{hf}.rel_attn.seg_embed", fn=segment)
        for norm in ("rel_attn.layer_norm", "ff.layer_norm"):
            w[f"{ours}.{norm}.weight"] = rule(f"{hf}.{norm}.weight")
            w[f"{ours}.{norm}.bias"] = rule(f"{hf}.{norm}.bias")
        linear(f"{hf}.ff.layer_1", f"{ours}.ff.layer_1", weights=w)
        linear(f"{hf}.ff.layer_2", f"{ours}.ff.layer_2", weights=w)
    if c.head == "lm":
        w["lm_bias"] = rule("lm_loss.bias")
        if not c.tie_word_embeddings:
            w["lm_loss.weight"] = rule("lm_loss.weight", fn=transposed)
    return w


register_adapter(HFAdapter(
    family="xlnet",
    model_types=("xlnet",),
    config_from_hf=config_from_hf,
    weight_map=weight_map,
    # mask_emb feeds only the query stream (pre-training); a tied head's saved copy of the embedding
    ignore=(r"mask_emb", r"lm_loss\.weight"),
    base_prefixes=("transformer.",),
))
