"""Rotary position embeddings (RoFormer, Su et al. 2021), in the "rotate_half" layout that
LLaMA, GPT-NeoX and Hugging Face use.

For a head vector x (its first `rotary_dim` entries, the rest pass through unrotated) at
position p:  x·cos(pθ) + rotate_half(x)·sin(pθ),  rotate_half(x) = concat(-x₂, x₁) of the
two halves, θ_i = theta^(-2i/rotary_dim), each frequency used for both halves.

The cos/sin tables are built in the graph from the runtime sequence length
(Shape → Range → Cast → Mul by the inv_freq constant → Cos/Sin), once per trace, so the
graph works for any length and a `fuse-rotary` pass sees the formula in primitive ops.

A `scaling` (`tgraph.dsl.rope_scaling`: linear, llama3, yarn, dynamic NTK, longrope) changes
only the inverse frequencies and multiplies the tables by its attention factor; the
length-dependent types compute their frequencies in the graph from the run's length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from ..ir import DType
from .rope_scaling import RopeScaling, plain_inv_freq
from .tensor import Tensor, TensorOps, arange, concat
from .tracer import current


def inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """θ_i = theta^(-2i/d) for i < d/2, repeated for the second half: shape (d,)."""
    half = plain_inv_freq(rotary_dim, theta)
    return np.concatenate([half, half]).astype(np.float32)


def rotate_half(x: TensorOps) -> Tensor:
    """concat(-x₂, x₁) over the last axis."""
    d = x.shape[-1]
    x1, x2 = x.split([d // 2, d // 2], axis=-1)                        # (..., R) -> 2 x (..., R/2)
    return concat([-x2, x1], axis=-1)                                 # (..., R)


def apply_rotary(x: TensorOps, cos: TensorOps, sin: TensorOps) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, R) with R <= D. Rotates the first R dims of each head."""
    d, r = x.shape[-1], cos.shape[-1]
    if r == d:
        return x * cos + rotate_half(x) * sin                         # (B, H, T, D)
    x_rot, x_pass = x.split([r, d - r], axis=-1)                      # (B, H, T, R), (B, H, T, D-R)
    return concat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], axis=-1)   # (B, H, T, D)


@dataclass(frozen=True)
class RotaryEmbedding:
    """Rotary settings of one model: which dims rotate and at which base frequency.

    `bind(ids)` builds the tables for the sequence length of `ids` (B, T) and returns the
    `rotary(q, k)` callable that `MultiHeadAttention` takes.
    """

    head_dim: int
    rotary_dim: Optional[int] = None        # None: the whole head (LLaMA); GPT-NeoX rotates a fraction
    theta: float = 10000.0
    scaling: Optional[RopeScaling] = None   # None: plain RoPE

    def __post_init__(self):
        r = self.dim
        if r <= 0 or r > self.head_dim or r % 2:
            raise ConfigError(f"rotary: rotary_dim ({r}) must be even and in 1..head_dim ({self.head_dim})")
        if not self.theta > 0:
            raise ConfigError(f"rotary: theta must be positive, got {self.theta}")
        if self.scaling is not None:
            self.scaling.check_dim(r)

    @property
    def dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def _half_inv_freq(self) -> np.ndarray:
        """(R/2,) float64 build-time θ_i (for a length-dependent scaling: those of a run no
        longer than its original length)."""
        if self.scaling is None:
            return plain_inv_freq(self.dim, self.theta)
        return self.scaling.inv_freq(self.dim, self.theta)

    def inv_freq(self) -> np.ndarray:
        """(R,) float32: θ_i repeated for the second half."""
        return np.tile(self._half_inv_freq(), 2).astype(np.float32)

    @property
    def table_factor(self) -> float:
        """What cos and sin are multiplied by (YaRN's and LongRoPE's attention factor)."""
        return 1.0 if self.scaling is None else self.scaling.cos_sin_factor()

    def table_arrays(self, max_positions: int, dtype=np.float32) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """cos/sin [max_positions, R/2] constants (a static cache's op tables), or None when the
        frequencies depend on the run's length and cannot be tabulated once."""
        if self.scaling is not None and self.scaling.length_dependent:
            return None
        freqs = np.arange(max_positions, dtype=np.float64)[:, None] * self._half_inv_freq()
        f = self.table_factor
        return (np.cos(freqs) * f).astype(dtype), (np.sin(freqs) * f).astype(dtype)

    def tables(self, ids: TensorOps, seq_axis: int = 1, positions: Optional[TensorOps] = None) -> Tuple[Tensor, Tensor]:
        """cos, sin: (T, R) for positions 0..T-1, T = ids.shape[seq_axis] at run time; or for
        explicit `positions` (a KV cache's offsets): (T,) ids give (T, R), (B, T) ids give
        (B, 1, T, R), which broadcasts over the heads of (B, H, T, D)."""
        tracer = current()
        settings = (self.dim, float(self.theta), self.scaling)
        if positions is not None:
            key = ("rotary", positions._value().name) + settings

            def make_freqs():
                # the run's length for length-dependent scaling, as HF counts it: max(position_ids) + 1
                return self._freqs(positions, lambda: positions.max(list(range(positions.ndim)), keepdims=False) + 1)
        else:
            key = ("rotary", ids._value().name, seq_axis) + settings

            def make_freqs():
                seq = ids.shape_of(seq_axis, seq_axis + 1).squeeze(0)         # [T] -> () int64
                return self._freqs(arange(0, seq), lambda: seq)
        freqs = Tensor(tracer.cached(key + ("freqs",), make_freqs))
        f = self.table_factor
        scaled = (lambda t: t) if f == 1.0 else (lambda t: t * f)        # noqa: E731
        cos = Tensor(tracer.cached(key + ("cos",), lambda: scaled(freqs.cos()).value))
        sin = Tensor(tracer.cached(key + ("sin",), lambda: scaled(freqs.sin()).value))
        return cos, sin

    def _freqs(self, positions: TensorOps, length: Callable[[], TensorOps]):
        """positions (T,) -> (T, R); (B, T) -> (B, 1, T, R): position · θ_i. `length` gives the
        run's length (a () int64 tensor), read only by length-dependent scaling."""
        if self.scaling is not None and self.scaling.length_dependent:
            freq = self.scaling.graph_inv_freq(length(), self.dim, self.theta)    # (R,), computed per run
        else:
            freq = Tensor(current().builder.const(self.inv_freq(), hint="inv_freq"))
        pos = positions.cast(DType.float32).unsqueeze(positions.ndim)          # (..., T, 1)
        freqs = pos * freq                                                     # (..., T, 1) * (R,) -> (..., T, R)
        return (freqs.unsqueeze(1) if positions.ndim == 2 else freqs).value

    def bind(self, ids: TensorOps, seq_axis: int = 1,
             positions: Optional[TensorOps] = None) -> Callable[[TensorOps, TensorOps], Tuple[Tensor, Tensor]]:
        cos, sin = self.tables(ids, seq_axis, positions)

        def rotary(q: TensorOps, k: TensorOps):
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return rotary
