"""RoPE scaling: the inverse frequencies (and cos/sin factor) of the long-context RoPE variants.

Every variant changes only θ_i (and, for YaRN and LongRoPE, multiplies cos and sin by an
"attention factor"); the rotation itself is the plain one of `tgraph.dsl.rotary`, so the
`fuse-rotary` pass still sees its formula. The formulas follow transformers'
`modeling_rope_utils` (one function per `rope_type`), with d = rotary_dim and
θ_i = theta^(-2i/d), i < d/2:

  linear    θ_i / factor                                     (position interpolation)
  llama3    θ_i / factor for long wavelengths, θ_i for short ones, a smooth blend between
            (Llama 3.1: factor 8, low/high_freq_factor 1/4, original length 8192)
  yarn      blend of θ_i and θ_i/factor over a linear ramp between the dims that make
            beta_fast and beta_slow rotations in the original length; cos/sin × attention
            factor (0.1·ln(factor) + 1 unless given)
  dynamic   NTK-aware: base' = theta · (factor·L/L₀ − (factor − 1))^(d/(d−2)), L = max(length, L₀)
  longrope  θ_i / short_factor_i, or θ_i / long_factor_i once the length exceeds L₀;
            cos/sin × sqrt(1 + ln(factor)/ln(L₀)) unless given

`linear`, `llama3` and `yarn` are constants, computed here at build time. `dynamic` and
`longrope` depend on the length L of the run (HF: max(position_ids) + 1), so the graph
computes them from L at run time (`graph_inv_freq`): an exported graph matches HF at every
length, including lengths beyond the original L₀, without being rebuilt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..errors import ConfigError

TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
LENGTH_DEPENDENT = ("dynamic", "longrope")


def plain_inv_freq(dim: int, theta: float) -> np.ndarray:
    """θ_i = theta^(-2i/d), i < d/2: shape (d/2,), float64."""
    return 1.0 / np.power(float(theta), np.arange(0, dim, 2, dtype=np.float64) / dim)


@dataclass(frozen=True)
class RopeScaling:
    """One `rope_type` with its parameters. `original_max_positions` is L₀: the length the
    model was pre-trained at (for `dynamic`, HF's max_position_embeddings)."""

    rope_type: str
    factor: float = 1.0
    original_max_positions: Optional[int] = None
    low_freq_factor: Optional[float] = None           # llama3
    high_freq_factor: Optional[float] = None          # llama3
    attention_factor: Optional[float] = None          # yarn, longrope: None = the paper's default
    beta_fast: float = 32.0                           # yarn
    beta_slow: float = 1.0                            # yarn
    mscale: Optional[float] = None                    # yarn (DeepSeek form)
    mscale_all_dim: Optional[float] = None            # yarn (DeepSeek form)
    truncate: bool = True                             # yarn: round the ramp's ends to whole dims
    short_factor: Optional[Tuple[float, ...]] = None  # longrope, one per frequency
    long_factor: Optional[Tuple[float, ...]] = None   # longrope

    def __post_init__(self):
        t = self.rope_type
        if t not in TYPES:
            raise ConfigError(f"rope scaling: rope_type {t!r} is not supported "
                              f"(supported: default, {', '.join(TYPES)})")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"rope scaling ({t}): factor must be a positive number, got {self.factor!r}")
        if t != "linear":
            lo = self.original_max_positions
            if not isinstance(lo, int) or isinstance(lo, bool) or lo <= 0:
                raise ConfigError(f"rope scaling ({t}): original_max_position_embeddings must be a positive integer, "
                                  f"got {lo!r}")
        if t == "llama3":
            if self.low_freq_factor is None or self.high_freq_factor is None:
                raise ConfigError("rope scaling (llama3): low_freq_factor and high_freq_factor are required")
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ConfigError(f"rope scaling (llama3): need 0 < low_freq_factor < high_freq_factor, got "
                                  f"{self.low_freq_factor!r} and {self.high_freq_factor!r}")
        if t == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ConfigError("rope scaling (longrope): short_factor and long_factor are required")
        if t == "dynamic" and self.factor < 1:
            raise ConfigError(f"rope scaling (dynamic): factor must be >= 1, got {self.factor!r}")
        try:
            scale = self.cos_sin_factor()
        except (ValueError, ZeroDivisionError, OverflowError):
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"rope scaling ({t}): the cos/sin attention factor from these parameters is "
                              f"{scale!r}, not a positive number")

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in LENGTH_DEPENDENT

    def check_dim(self, dim: int) -> None:
        if dim <= 2 and self.rope_type == "dynamic":
            raise ConfigError(f"rope scaling (dynamic): rotary_dim must exceed 2, got {dim}")
        for name in ("short_factor", "long_factor"):
            f = getattr(self, name)
            if f is not None and len(f) != dim // 2:
                raise ConfigError(f"rope scaling (longrope): {name} has {len(f)} entries, rotary_dim {dim} needs "
                                  f"{dim // 2}")

    def check(self, dim: int, theta: float) -> None:
        """ConfigError unless these parameters give finite, positive frequencies for (dim, theta)."""
        self.check_dim(dim)
        if self.rope_type == "yarn" and not (self.beta_fast > 0 and self.beta_slow > 0 and theta > 1):
            raise ConfigError(f"rope scaling (yarn): needs beta_fast, beta_slow > 0 and rope_theta > 1, got "
                              f"{self.beta_fast!r}, {self.beta_slow!r}, {theta!r}")
        try:
            with np.errstate(all="ignore"):
                tables = [self.inv_freq(dim, theta)] + ([self.long_inv_freq(dim, theta)] if self.long_factor else [])
        except (ValueError, ZeroDivisionError, OverflowError):       # a log or ratio out of its domain
            tables = [np.array([np.nan])]
        if not all(np.all(np.isfinite(t)) and np.all(t >= 0) for t in tables):
            raise ConfigError(f"rope scaling ({self.rope_type}): these parameters give non-finite frequencies")

    # ---- build-time constants -------------------------------------------------------------------
    def inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """(d/2,) float64 inverse frequencies; for the length-dependent types, those of a run no
        longer than L₀ (dynamic: the plain ones; longrope: the short factors)."""
        self.check_dim(dim)
        inv = plain_inv_freq(dim, theta)
        t = self.rope_type
        if t == "linear":
            return inv / self.factor
        if t == "llama3":
            return self._llama3(inv)
        if t == "yarn":
            return self._yarn(dim, theta)
        if t == "longrope":
            return inv / np.asarray(self.short_factor, np.float64)
        return inv                                     # dynamic at L <= L₀

    def long_inv_freq(self, dim: int, theta: float) -> np.ndarray:
        """longrope beyond L₀."""
        return plain_inv_freq(dim, theta) / np.asarray(self.long_factor, np.float64)

    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by (HF's `attention_scaling`)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        f = self.factor
        if self.rope_type == "yarn":
            def get_mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            if self.mscale and self.mscale_all_dim:
                return get_mscale(f, self.mscale) / get_mscale(f, self.mscale_all_dim)
            return get_mscale(f)
        if self.rope_type == "longrope":
            return 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(self.original_max_positions))
        return 1.0

    def _llama3(self, inv: np.ndarray) -> np.ndarray:
        old = float(self.original_max_positions)
        low, high = float(self.low_freq_factor), float(self.high_freq_factor)
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / self.factor, inv)          # long wavelengths: interpolate
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, blended, scaled)

    def _yarn(self, dim: int, theta: float) -> np.ndarray:
        base, old = float(theta), float(self.original_max_positions)
        beta_fast, beta_slow = self.beta_fast or 32.0, self.beta_slow or 1.0   # HF: `or` (0 means the default)

        def correction_dim(rotations: float) -> float:      # the dim that turns `rotations` times in L₀
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001                                    # HF: prevent a singular ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp                             # 1: keep θ_i (fast dims), 0: θ_i / factor
        pos = np.power(base, np.arange(0, dim, 2, dtype=np.float64) / dim)
        return (1.0 / (self.factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation

    # ---- run-time (length-dependent) --------------------------------------------------------------
    def graph_inv_freq(self, length, dim: int, theta: float):
        """(d,) float32 tensor, both halves equal, of the inverse frequencies for a run of `length`
        positions (a traced int64 scalar): dynamic NTK's base from the length, or longrope's
        short/long choice. Built from elementwise ops only, so `fuse-rotary` can prove the
        halves equal."""
        from ..ir import DType
        from .tensor import Tensor, where
        from .tracer import current

        self.check_dim(dim)
        b = current().builder
        l0 = self.original_max_positions
        if self.rope_type == "longrope":
            short, long_ = (np.tile(f(dim, theta), 2).astype(np.float32)
                            for f in (self.inv_freq, self.long_inv_freq))
            return where(length > l0, Tensor(b.const(long_, hint="inv_freq_long")),
                         Tensor(b.const(short, hint="inv_freq_short")))
        # dynamic NTK, in float32 as HF computes it from the run's length
        seq = where(length > l0, length, np.array(l0, np.int64)).cast(DType.float32)      # max(L, L₀)
        scale = (seq * self.factor / float(l0) - (self.factor - 1)) ** (dim / (dim - 2))
        base = scale * float(theta)                                                        # () float32
        exponents = np.tile(np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim), 2)   # (d,)
        return (base ** Tensor(b.const(exponents, hint="rope_exponents"))).reciprocal()   # (d,)
