"""Fusions of elementwise formulas: softmax, LayerNorm, RMSNorm and GELU.

Each rule is one pattern over the spelling `canonicalize` leaves (-O2 runs it first):
divisions by constants are Muls by the inverse, ``x * (1/y)`` and ``x * Reciprocal(y)``
are ``x / y``, ``x ** 2`` is ``x * x``. What is left to tell apart is structure the
formula really has in several shapes (a norm with or without gamma and beta, computed in
float32 between Casts or not; GELU's erf or tanh form and where its 0.5 sits); those are
`Or`/`optional` inside the one pattern. The rewrites produce standard ONNX ops (Softmax,
LayerNormalization-17, RMSNormalization-23, Gelu-20).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from tgraph.ir import Builder, DType, Graph

from .base import register_pass
from .constants import scalar_of
from .pattern import Match, OpBuilder, Or, Pattern, RewritePass, Rule, Var, optional

#: dtypes whose norms exporters compute in float32 between Casts (HF LLaMA in fp16).
HALF = (DType.float16, DType.bfloat16)


def _last_axis(axes, rank: Optional[int]) -> Optional[int]:
    """The single reduced axis as a negative index, if it is the last one."""
    if axes is None or len(axes) != 1 or rank is None:
        return None
    return -1 if axes[0] % rank == rank - 1 else None


def _vector_for(graph: Graph, v, x) -> Optional[str]:
    """A reason unless `v` is a 1-D weight of x's last dim and dtype."""
    if v.type.dtype != x.type.dtype:
        return f"{v.name} has dtype {v.type.dtype.name}, input is {x.type.dtype.name}"
    if v.shape is None or len(v.shape) != 1 or v.shape[0] != x.shape[-1]:
        return f"{v.name} is {v.type}, not a vector over the last axis of {x.type}"
    return None


def _to_float32(to) -> bool:
    return to is not None and DType.of(to) is DType.float32


def float32_island(op: OpBuilder, normalized, x: Var) -> Or:
    """``normalized(x)``, or the same computed in float32 between Casts:
    ``Cast(normalized(Cast(x, to=float32)), to=narrow)``. Alternative 0 (bound as
    "island") is the Cast form; `island_refusal` checks that it casts back to x's dtype.

    LayerNormalization and RMSNormalization with stash_type=1 (the default) compute
    exactly that: the ONNX spec casts X to float32, normalises, and casts ``Normalized``
    back to X's type before the scale and bias, so the island fuses into the op on the
    half-precision x (a scale applied inside the island does not: it is not that op)."""
    wide = op.Cast(x, to=Var("", predicate=_to_float32, describe="float32"))
    return Or(op.Cast(normalized(wide), to=Var("narrow")), normalized(x), name="island")


def island_refusal(m: Match) -> Optional[str]:
    if m.get("island") != 0:
        return None
    x, narrow = m.x, DType.of(m.narrow)
    if x.type.dtype not in HALF:
        return f"float32 island over {x.type.dtype.name} input {x.name}"
    if narrow is not x.type.dtype:
        return f"float32 island casts back to {narrow.name}, input {x.name} is {x.type.dtype.name}"
    return None


def _norm_refusal(m: Match, graph: Graph, *weights: str) -> Optional[str]:
    """What LayerNorm and RMSNorm refuse: non-float input, other than the last axis, a
    computed epsilon, a bad island, weights that are not vectors over the last axis."""
    x = m.x
    if not x.type.dtype.is_float:
        return "not a float tensor"
    if _last_axis(m.axes, x.type.rank) is None:
        return f"normalises over axes {m.axes}, not the last one"
    if scalar_of(m.get("eps")) is None:
        return "epsilon is not a scalar constant"
    reason = island_refusal(m)
    for name in weights:
        if reason is None and m.get(name) is not None:
            reason = _vector_for(graph, m.get(name), x)
    return reason


# ------------------------------------------------------------------------------ softmax
class SoftmaxRule(Rule):
    """Exp(x - ReduceMax(x)) / ReduceSum(Exp(..)) -> Softmax(x); also without the max.

    In an fp16 graph's float32 island the formula fuses into a float32 Softmax and the
    Casts stay: ONNX's Softmax on float16 does not promise a float32 accumulation."""

    name = "softmax"

    def pattern(self, op: OpBuilder) -> Pattern:
        x, axes = Var("x"), Var("axes")
        e = op.Exp(optional(lambda v: op.Sub(v, op.ReduceMax(v, axes=axes, keepdims=1)), x))
        return op.Div(e, op.ReduceSum(e, axes=axes, keepdims=1))

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        if m.axes is None or len(m.axes) != 1:
            return f"softmax over axes {m.axes}"
        return None

    def rewrite(self, b: Builder, m: Match):
        return b.op("Softmax", m.x, axis=int(m.axes[0]))


@register_pass
class FuseSoftmax(RewritePass):
    """exp/sum/div (with or without max-subtraction) -> Softmax.

    Before:  %m = ReduceMax(%x){axes=[-1]}; %e = Exp(Sub(%x, %m)); %y = Div(%e, ReduceSum(%e){axes=[-1]})
    After:   %y = Softmax(%x){axis=-1}
    """

    name = "fuse-softmax"

    def rules(self):
        return [SoftmaxRule()]


# ------------------------------------------------------------------------------ LayerNorm
class LayerNormRule(Rule):
    """(x - mean) / sqrt(var + eps) [* gamma] [+ beta] -> LayerNormalization, also in
    float32 between Casts (see `float32_island`)."""

    name = "layer-norm"

    def pattern(self, op: OpBuilder) -> Pattern:
        x, axes, eps = Var("x"), Var("axes"), op.const(name="eps")

        def normalized(v):
            d = op.Sub(v, op.ReduceMean(v, axes=axes, keepdims=1))
            var = op.ReduceMean(op.Mul(d, d), axes=axes, keepdims=1)
            return op.Div(d, op.Sqrt(op.Add(var, eps)))

        y = float32_island(op, normalized, x)
        y = optional(lambda v: op.Mul(v, Var("gamma")), y)
        return optional(lambda v: op.Add(v, Var("beta")), y)

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        return _norm_refusal(m, graph, "gamma", "beta")

    def rewrite(self, b: Builder, m: Match):
        x = m.x
        gamma = m.get("gamma")
        if gamma is None:
            gamma = b.const(np.ones(x.shape[-1], x.type.dtype.numpy), hint="ln_scale")
        ins = [x, gamma] + ([m.beta] if m.get("beta") is not None else [])
        return b.op("LayerNormalization", *ins, axis=-1, epsilon=scalar_of(m.get("eps")))


@register_pass
class FuseLayerNorm(RewritePass):
    """Mean/variance arithmetic -> LayerNormalization-17.

    Before:  %mu = ReduceMean(%x){axes=[-1]}; %d = Sub(%x, %mu); %var = ReduceMean(Mul(%d, %d))
             %y = Add(Mul(Div(%d, Sqrt(Add(%var, 1e-5))), %gamma), %beta)
    After:   %y = LayerNormalization(%x, %gamma, %beta){epsilon=1e-5}
    """

    name = "fuse-layer-norm"

    def rules(self):
        return [LayerNormRule()]


# ------------------------------------------------------------------------------ RMSNorm
class RMSNormRule(Rule):
    """x / sqrt(mean(x²) + eps) * gamma -> RMSNormalization (LLaMA, T5), also in float32
    between Casts as HF LLaMA computes it in fp16 (see `float32_island`)."""

    name = "rms-norm"

    def pattern(self, op: OpBuilder) -> Pattern:
        x, axes, eps = Var("x"), Var("axes"), op.const(name="eps")

        def normalized(v):
            ms = op.ReduceMean(op.Mul(v, v), axes=axes, keepdims=1)
            return op.Div(v, op.Sqrt(op.Add(ms, eps)))

        return op.Mul(float32_island(op, normalized, x), Var("gamma"))

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        return _norm_refusal(m, graph, "gamma")

    def rewrite(self, b: Builder, m: Match):
        return b.op("RMSNormalization", m.x, m.gamma, axis=-1, epsilon=scalar_of(m.get("eps")))


@register_pass
class FuseRMSNorm(RewritePass):
    """Root-mean-square normalisation -> RMSNormalization-23.

    Before:  %ms = ReduceMean(Mul(%x, %x)){axes=[-1]}; %y = Mul(Div(%x, Sqrt(Add(%ms, 1e-6))), %gamma)
    After:   %y = RMSNormalization(%x, %gamma){epsilon=1e-6}
    """

    name = "fuse-rms-norm"

    def rules(self):
        return [RMSNormRule()]


# ------------------------------------------------------------------------------ GELU
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_TANH_C = math.sqrt(2.0 / math.pi)
#: GELU's constants are compared within float16's rounding (half an ulp is 4.9e-4), so
#: the formula in an fp16 graph fuses too.
_RTOL = 1e-3


class GeluRule(Rule):
    """0.5·x·(1 + erf(x/√2)) -> Gelu; 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) -> Gelu(tanh)."""

    name = "gelu"

    def pattern(self, op: OpBuilder) -> Pattern:
        x, c = Var("x"), (lambda value: op.const(value, rtol=_RTOL))
        # x/√2 is x·(1/√2) after canonicalize, except in float16/bfloat16, where 1/√2 is
        # not exact and the Div stays.
        erf = op.Erf(Or(op.Mul(x, c(_SQRT_HALF)), op.Div(x, c(math.sqrt(2.0)))))
        tanh = op.Tanh(op.Mul(op.Add(x, op.Mul(op.Pow(x, c(3.0)), c(0.044715))), c(_TANH_C)))
        act = op.Add(Or(erf, tanh, name="form"), c(1.0))
        half = c(0.5)
        return Or(op.Mul(op.Mul(x, half), act),          # (x * 0.5) * act
                  op.Mul(x, op.Mul(act, half)),          # x * (act * 0.5)
                  op.Mul(op.Mul(x, act), half))          # (x * act) * 0.5

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        return None if m.x.type.dtype.is_float else "not a float tensor"

    def rewrite(self, b: Builder, m: Match):
        return b.op("Gelu", m.x, approximate="tanh" if m.form == 1 else "none")


@register_pass
class FuseGelu(RewritePass):
    """The erf and tanh GELU formulas -> Gelu-20.

    Before:  %y = Mul(Mul(%x, 0.5), Add(Erf(Mul(%x, 0.7071)), 1.0))
    After:   %y = Gelu(%x)                       (approximate="tanh" for the tanh formula)
    """

    name = "fuse-gelu"

    def rules(self):
        return [GeluRule()]
