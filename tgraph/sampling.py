"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Pure NumPy on the host, so the same numbers come out whatever device ran the model, and a
seeded `numpy.random.Generator` makes sampling reproducible. The warpers run in Hugging
Face's order (temperature, then top-k, then top-p) and follow its conventions:

* top-k keeps every token whose logit is >= the k-th largest (ties at the boundary stay);
* top-p keeps the shortest prefix of the tokens sorted by probability (highest first) whose
  mass reaches p (so at least one token);
* temperature 0 means greedy; a temperature near 0 approaches greedy.

Disallowed tokens get -inf; `sample` can never return one (it draws from a CDF in which they
add no mass, searched so that zero-width steps are never hit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. `do_sample=False` is greedy and ignores the other fields."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                 # 0: no top-k filter
    top_p: float = 1.0             # 1.0: no nucleus filter
    seed: Optional[int] = None     # None: fresh entropy (not reproducible)

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def greedy(logits: np.ndarray) -> np.ndarray:
    """argmax over the last axis (the first index on ties, as torch.argmax on CPU)."""
    return np.argmax(logits, axis=-1).astype(np.int64)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 to scale logits, got {temperature!r} (0 means greedy)")
    return np.asarray(logits, np.float64) / float(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """-inf for every token below the k-th largest logit of its row; k <= 0 or >= vocab keeps all."""
    logits = np.asarray(logits, np.float64)
    if k <= 0 or k >= logits.shape[-1]:
        return logits.copy()
    kth = -np.partition(-logits, k - 1, axis=-1)[..., k - 1:k]     # the k-th largest, per row
    return np.where(logits >= kth, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(top), top, 0.0))
    return e / np.sum(e, axis=-1, keepdims=True)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """-inf outside the shortest highest-probability prefix whose probability mass is >= p."""
    logits = np.asarray(logits, np.float64)
    if p >= 1.0:
        return logits.copy()
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs        # mass of the tokens ranked higher
    keep_sorted = before < p
    keep_sorted[..., 0] = True                                      # always at least the top token
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep & np.isfinite(logits), logits, -np.inf)


def process_logits(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Temperature, then top-k, then top-p: the logits `sample` draws from (float64)."""
    x = apply_temperature(logits, config.temperature)
    x = top_k_filter(x, config.top_k)
    return top_p_filter(x, config.top_p)


def allowed_tokens(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Boolean mask of the tokens `next_tokens` may return for these logits."""
    if config.greedy:
        mask = np.zeros(np.shape(logits), bool)
        np.put_along_axis(mask, greedy(logits)[..., None], True, axis=-1)
        return mask
    return np.isfinite(process_logits(logits, config))


def sample(processed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of [batch, vocab] processed logits, drawn from their softmax."""
    probs = softmax(processed)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # the first index whose CDF exceeds u: a zero-probability token adds a zero-width step,
    # so it can only be hit if u equals the CDF before it, and then side="right" skips it
    picks = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)], np.int64)
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)  # last token with mass, for u ~ 1
    return np.minimum(picks, last)


def next_tokens(logits: np.ndarray, config: SamplingConfig, rng: Optional[np.random.Generator] = None
                ) -> np.ndarray:
    """The next token of every row of [batch, vocab] logits."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ConfigError(f"next_tokens expects [batch, vocab] logits, got shape {logits.shape}")
    if config.greedy:
        return greedy(logits)
    return sample(process_logits(logits, config), rng if rng is not None else config.rng())
