"""Standard Transformer layers, written as the papers' formulas in primitive ops.

Nothing here emits a fused op: LayerNorm is mean/variance arithmetic, attention is
`softmax(QKᵀ/√d_k + M)V`, GELU is its erf or tanh formula. Fusion is the passes' job,
and they can only prove themselves on graphs that spell the math out.

Weights of `Linear` are stored [in, out] (so `x @ W` needs no transpose); checkpoint
loaders transpose PyTorch's [out, in] layout on load.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from ..errors import ConfigError
from ..ir import DType
from .module import Module, Parameter
from .tensor import Tensor, TensorOps, causal_mask, lowest, where
from .tracer import current


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter((in_features, out_features), std=std)
        if bias:
            self.bias = Parameter((out_features,), init="zeros")
        self.has_bias = bias

    def forward(self, x: TensorOps) -> Tensor:
        y = x @ self.weight                                    # (..., in) @ (in, out) -> (..., out)
        return y + self.bias if self.has_bias else y


class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int, std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter((num_embeddings, dim), std=std)

    def forward(self, ids: TensorOps) -> Tensor:
        return self.weight.gather(ids, axis=0)                 # (B, T) -> (B, T, dim)


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * gamma + beta, over the last axis."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps, self.has_bias = eps, bias
        self.weight = Parameter((dim,), init="ones")
        if bias:
            self.bias = Parameter((dim,), init="zeros")

    def forward(self, x: TensorOps) -> Tensor:
        mu = x.mean(-1)
        d = x - mu
        var = (d * d).mean(-1)
        y = d / (var + self.eps).sqrt() * self.weight
        return y + self.bias if self.has_bias else y


class RMSNorm(Module):
    """x / sqrt(mean(x²) + eps) * gamma (LLaMA, T5: no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter((dim,), init="ones")

    def forward(self, x: TensorOps) -> Tensor:
        ms = (x * x).mean(-1)
        return x * (ms + self.eps).sqrt().reciprocal() * self.weight


# ---- activations -------------------------------------------------------------------
def gelu(x: TensorOps) -> Tensor:
    """Exact GELU: 0.5·x·(1 + erf(x/√2))."""
    return x * 0.5 * ((x * (1.0 / math.sqrt(2.0))).erf() + 1.0)


def gelu_tanh(x: TensorOps) -> Tensor:
    """GPT-2's GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    inner = (x + (x ** 3.0) * 0.044715) * math.sqrt(2.0 / math.pi)
    return x * 0.5 * (inner.tanh() + 1.0)


def silu(x: TensorOps) -> Tensor:
    return x * x.sigmoid()


def relu(x: TensorOps) -> Tensor:
    return x.relu()


ACTIVATIONS: dict = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown activation {name!r} (known: {', '.join(sorted(ACTIVATIONS))})") from None


class FeedForward(Module):
    """Position-wise FFN. `gated=True` gives GLU variants: act(x W_gate) * (x W_up) W_down
    (SwiGLU with act="silu", GeGLU with act="gelu_tanh")."""

    def __init__(self, d_model: int, d_ff: int, act: str = "relu", gated: bool = False, bias: bool = True,
                 std: float = 0.02):
        super().__init__()
        self.act, self.gated = activation(act), gated
        if gated:
            self.gate = Linear(d_model, d_ff, bias=bias, std=std)
        self.up = Linear(d_model, d_ff, bias=bias, std=std)
        self.down = Linear(d_ff, d_model, bias=bias, std=std)

    def forward(self, x: TensorOps) -> Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


# ---- attention ------------------------------------------------------------------------
def padding_keep_mask(attention_mask: TensorOps, extra_dims: int = 2) -> Tensor:
    """int64 [B, Tk] (1 = real token) -> bool [B, 1, (1,) 1, Tk], built once per trace."""
    def make():
        keep = attention_mask.cast(DType.bool)
        return keep.unsqueeze(*range(1, 1 + extra_dims)).value
    return Tensor(current().cached(("padding", attention_mask._value().name, extra_dims), make))


class MultiHeadAttention(Module):
    """softmax(Q Kᵀ · scale + bias, causal/padding masked) V, with optional grouped KV heads.

    `num_kv_heads < num_heads` gives grouped-query attention (1 = multi-query): queries
    are viewed as [B, H_kv, G, T, D] and broadcast against [B, H_kv, 1, T, D] keys, so no
    repeated K/V is ever materialised. `rotary` is a callable applied to (q, k) in
    [B, H, T, D] layout. `scale=None` means 1/√head_dim; T5 passes 1.0. `window` W > 0
    (with `causal`) makes the layer local: each query sees only the last W keys up to itself
    (Mistral's sliding window, GPT-Neo's local layers), also across a KV cache's past.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, out_bias: Optional[bool] = None,
                 causal: bool = False, scale: Optional[float] = None, kv_dim: Optional[int] = None,
                 std: float = 0.02, window: int = 0):
        super().__init__()
        if window < 0 or (window and not causal):
            raise ConfigError(f"attention window must be >= 0 and needs causal=True, got window={window}")
        num_kv_heads = num_kv_heads or num_heads
        if head_dim is None:
            if d_model % num_heads:
                raise ConfigError(f"d_model ({d_model}) is not divisible by num_heads ({num_heads})")
            head_dim = d_model // num_heads
        if num_heads % num_kv_heads:
            raise ConfigError(f"num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.window = causal, int(window)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        kv_dim = kv_dim or d_model
        self.q_proj = Linear(d_model, num_heads * head_dim, bias=bias, std=std)
        self.k_proj = Linear(kv_dim, num_kv_heads * head_dim, bias=bias, std=std)
        self.v_proj = Linear(kv_dim, num_kv_heads * head_dim, bias=bias, std=std)
        self.o_proj = Linear(num_heads * head_dim, d_model, bias=bias if out_bias is None else out_bias, std=std)

    def split_heads(self, x: TensorOps, heads: int) -> Tensor:
        return x.reshape(0, 0, heads, self.head_dim).transpose(0, 2, 1, 3)   # (B, T, H*D) -> (B, H, T, D)

    def forward(self, x: TensorOps, kv: Optional[TensorOps] = None, keep_mask: Optional[TensorOps] = None,
                bias: Optional[TensorOps] = None, rotary: Optional[Callable] = None, cache=None) -> Tensor:
        """`cache` (a `tgraph.dsl.cache.LayerCache`) prepends the past keys/values to this call's
        and records the result as the layer's present; the causal mask, aligned to the end of the
        key axis, then lets query i see the whole past plus new tokens up to i. A
        `CrossLayerCache` instead gives the keys/values themselves (a cross-attention's, computed
        once from the encoder output), and `kv` is not read."""
        layout = getattr(cache, "layout", None)
        if layout == "static":
            return self.o_proj(self._attend_static(x, cache, rotary, bias))
        q = self.split_heads(self.q_proj(x), self.num_heads)                  # (B, H, Tq, D)
        if layout == "cross":                 # keys/values of the encoder output, projected once per source
            k, v = cache.key, cache.value                                      # (B, Hkv, S, D)
        else:
            k, v = self.key_values(x if kv is None else kv)                    # (B, Hkv, Tk, D)
        if rotary is not None:
            q, k = rotary(q, k)
        if cache is not None and layout != "cross":
            k, v = cache.update(k, v)                                          # (B, Hkv, P + Tk, D)
        context = attention(q, k, v, scale=self.scale, causal=self.causal, keep_mask=keep_mask, bias=bias,
                            window=self.window)
        merged = context.transpose(0, 2, 1, 3).reshape(0, 0, self.num_heads * self.head_dim)  # (B, Tq, H*D)
        return self.o_proj(merged)

    def key_values(self, kv: TensorOps):
        """The keys and values [B, Hkv, Tk, D] that `kv` [B, Tk, C] gives (what a cross-attention
        cache holds: `tgraph.dsl.cache.cross_attention_outputs`)."""
        k = self.split_heads(self.k_proj(kv), self.num_kv_heads)              # (B, Hkv, Tk, D)
        v = self.split_heads(self.v_proj(kv), self.num_kv_heads)              # (B, Hkv, Tk, D)
        return k, v

    def _attend_static(self, x: TensorOps, cache, rotary, bias=None) -> Tensor:
        """Causal self-attention over a static cache (`tgraph.dsl.cache.StaticLayerCache`):
        q/k/v stay [B, T, H*D]; `rotary` is the op's (cos, sin) tables, or a callable applied
        to the split heads here; `bias` spans the buffer's columns [.., T, total_sequence_length]."""
        if not self.causal:
            raise ConfigError("a static KV cache is for causal self-attention")
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)             # (B, T, H*D), (B, T, Hkv*D)
        tables = rotary if isinstance(rotary, tuple) else None
        if rotary is not None and tables is None:
            qh, kh = rotary(self.split_heads(q, self.num_heads), self.split_heads(k, self.num_kv_heads))
            q = qh.transpose(0, 2, 1, 3).reshape(0, 0, self.num_heads * self.head_dim)
            k = kh.transpose(0, 2, 1, 3).reshape(0, 0, self.num_kv_heads * self.head_dim)
        return cache.attend(q, k, v, self.num_heads, self.num_kv_heads, self.scale, tables, window=self.window,
                            bias=bias)


def attention(q: TensorOps, k: TensorOps, v: TensorOps, scale: float, causal: bool = False,
              keep_mask: Optional[TensorOps] = None, bias: Optional[TensorOps] = None, window: int = 0) -> Tensor:
    """Scaled dot-product attention on [B, H, Tq, D] queries and [B, Hkv, Tk, D] keys/values.
    `window` W > 0 (causal only): query i sees keys i + past - W < j <= i + past.

    keep_mask: bool, broadcastable to [B, 1, 1, Tk] (True = attend). bias: additive,
    broadcastable to [B, H, Tq, Tk] (T5's relative position bias).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    grouped = kv_heads != heads
    if grouped:
        group = heads // kv_heads
        d = q.shape[-1]
        q = q.reshape(0, kv_heads, group, -1, d)                               # (B, Hkv, G, Tq, D)
        k, v = k.unsqueeze(2), v.unsqueeze(2)                                  # (B, Hkv, 1, Tk, D)
    scores = (q @ k.swap_last()) * scale if scale != 1.0 else q @ k.swap_last()  # (..., Tq, Tk)
    if bias is not None:
        if grouped:
            bias = bias.reshape(0, kv_heads, group, -1, bias.shape[-1]) if bias.shape[1] != 1 else bias.unsqueeze(2)
        scores = scores + bias
    if causal:
        scores = causal_mask(scores, window)
    if keep_mask is not None:
        if grouped:
            keep_mask = keep_mask.unsqueeze(1)                                 # (B, 1, 1, 1, Tk)
        scores = where(keep_mask, scores, lowest(scores.dtype))
    probs = scores.softmax(-1)
    if causal or keep_mask is not None:
        probs = zero_fully_masked_rows(probs, scores)
    out = probs @ v                                                            # (..., Tq, D)
    if grouped:
        out = out.reshape(0, heads, -1, out.shape[-1])                         # (B, H, Tq, D)
    return out


def zero_fully_masked_rows(probs: TensorOps, masked_scores: TensorOps) -> Tensor:
    """A query row whose keys are all masked attends to nothing: its probabilities are zero,
    as ONNX Attention-23 specifies (softmax alone would average every value).

    Masks fill scores with the dtype's lowest value, so such a row's best score is that
    fill. Equality (not "<= fill") keeps a NaN row NaN, so an overflow is never hidden.
    """
    fill = lowest(masked_scores.dtype)
    return where(masked_scores.max(-1).eq(fill), 0.0, probs)


# ---- positions -------------------------------------------------------------------------
def sinusoid_table(max_len: int, dim: int, base: float = 10000.0) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / base^(2i/d)), PE[pos, 2i+1] = cos(...), as in the paper."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    i = np.arange(0, dim, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(base, i / dim)
    table = np.zeros((max_len, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : dim // 2])
    return table.astype(np.float32)


class SinusoidalPositions(Module):
    """Adds the fixed sinusoidal table's first T rows (a constant, not a parameter)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.dim, self.max_len = dim, max_len

    def forward(self, x: TensorOps, offset=0, position_ids: Optional[TensorOps] = None) -> Tensor:
        """Rows offset .. offset + T - 1 (offset: an int or a 0-d runtime past length), or the
        rows of explicit position ids ((T,) or (B, T))."""
        table = current().cached(("sinusoid", self.max_len, self.dim),
                                 lambda: current().builder.const(sinusoid_table(self.max_len, self.dim), hint="sinusoid_table"))
        if position_ids is not None:
            return x + Tensor(table).gather(position_ids)                       # (B, T, C) + ((B,) T, C)
        seq = x.shape_of(1, 2)                                                  # [T]
        rows = Tensor(table).slice(0, offset, seq if isinstance(offset, int) and offset == 0 else seq + offset)
        return x + rows                                                         # (B, T, C) + (T, C)


class LearnedPositions(Module):
    """A learned table indexed by position ids (BERT, GPT-2)."""

    def __init__(self, max_len: int, dim: int, std: float = 0.02):
        super().__init__()
        self.weight = Parameter((max_len, dim), std=std)

    def forward(self, position_ids: TensorOps) -> Tensor:
        return self.weight.gather(position_ids, axis=0)
