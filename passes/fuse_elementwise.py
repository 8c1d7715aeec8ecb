"""Fusions of elementwise formulas: softmax, LayerNorm, RMSNorm and GELU.

Each rule lists the spellings it recognises (tgraph's own layers, and what PyTorch and
Hugging Face exports write); the rewrites produce standard ONNX ops (Softmax,
LayerNormalization-17, RMSNormalization-23, Gelu-20).
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional

import numpy as np

from tgraph.ir import Builder, Graph

from .base import register_pass
from .pattern import Match, OpBuilder, OpPat, RewritePass, Rule, Var


def _last_axis(axes, rank: Optional[int]) -> Optional[int]:
    """The single reduced axis as a negative index, if it is the last one."""
    if axes is None or len(axes) != 1 or rank is None:
        return None
    return -1 if axes[0] % rank == rank - 1 else None


def _scalar(m: Match, name: str) -> Optional[float]:
    arr = m.get(name)
    return None if arr is None or np.size(arr) != 1 else float(np.asarray(arr).reshape(-1)[0])


def _vector_for(graph: Graph, v, x) -> Optional[str]:
    """A reason unless `v` is a 1-D weight of x's last dim and dtype."""
    if v.type.dtype != x.type.dtype:
        return f"{v.name} has dtype {v.type.dtype.name}, input is {x.type.dtype.name}"
    if v.shape is None or len(v.shape) != 1 or v.shape[0] != x.shape[-1]:
        return f"{v.name} is {v.type}, not a vector over the last axis of {x.type}"
    return None


# ------------------------------------------------------------------------------ softmax
class SoftmaxRule(Rule):
    """Exp(x - ReduceMax(x)) / ReduceSum(Exp(..)) -> Softmax(x); also without the max."""

    name = "softmax"

    def patterns(self, op: OpBuilder) -> List[OpPat]:
        x, axes, axes2 = Var("x"), Var("axes"), Var("axes")
        stable = op.Exp(op.Sub(x, op.ReduceMax(x, axes=axes, keepdims=1)))
        plain = op.Exp(x)
        return [op.Div(e, op.ReduceSum(e, axes=axes2, keepdims=1)) for e in (stable, plain)]

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        if _last_axis(m.axes, m.x.type.rank) is None and (m.axes is None or len(m.axes) != 1):
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
    """(x - mean) / sqrt(var + eps) [* gamma] [+ beta] -> LayerNormalization."""

    name = "layer-norm"

    def patterns(self, op: OpBuilder) -> List[OpPat]:
        out = []
        for square, divide, tail in itertools.product(("mul", "pow"), ("div", "recip"), ("affine", "scale", "none")):
            x, axes = Var("x"), Var("axes")
            d = op.Sub(x, op.ReduceMean(x, axes=axes, keepdims=1))
            sq = op.Mul(d, d) if square == "mul" else op.Pow(d, op.const(2.0))
            std = op.Sqrt(op.Add(op.ReduceMean(sq, axes=Var("axes"), keepdims=1), op.const(name="eps")))
            y = op.Div(d, std) if divide == "div" else op.Mul(d, op.Reciprocal(std))
            if tail in ("affine", "scale"):
                y = op.Mul(y, Var("gamma"))
            if tail == "affine":
                y = op.Add(y, Var("beta"))
            out.append(y)
        return out

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        x = m.x
        if not x.type.dtype.is_float:
            return "not a float tensor"
        if _last_axis(m.axes, x.type.rank) is None:
            return f"normalises over axes {m.axes}, not the last one"
        if _scalar(m, "eps") is None:
            return "epsilon is not a scalar constant"
        for name in ("gamma", "beta"):
            if m.get(name) is not None:
                reason = _vector_for(graph, m.get(name), x)
                if reason:
                    return reason
        return None

    def rewrite(self, b: Builder, m: Match):
        x = m.x
        gamma = m.get("gamma")
        if gamma is None:
            gamma = b.const(np.ones(x.shape[-1], x.type.dtype.numpy), hint="ln_scale")
        ins = [x, gamma] + ([m.beta] if m.get("beta") is not None else [])
        return b.op("LayerNormalization", *ins, axis=-1, epsilon=_scalar(m, "eps"))


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
    """x / sqrt(mean(x²) + eps) * gamma -> RMSNormalization (LLaMA, T5)."""

    name = "rms-norm"

    def patterns(self, op: OpBuilder) -> List[OpPat]:
        out = []
        for square, divide in itertools.product(("mul", "pow"), ("recip", "div", "one-div")):
            x = Var("x")
            sq = op.Mul(x, x) if square == "mul" else op.Pow(x, op.const(2.0))
            std = op.Sqrt(op.Add(op.ReduceMean(sq, axes=Var("axes"), keepdims=1), op.const(name="eps")))
            if divide == "recip":
                normed = op.Mul(x, op.Reciprocal(std))
            elif divide == "div":
                normed = op.Div(x, std)
            else:
                normed = op.Mul(x, op.Div(op.const(1.0), std))
            out.append(op.Mul(normed, Var("gamma")))
        return out

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        x = m.x
        if not x.type.dtype.is_float:
            return "not a float tensor"
        if _last_axis(m.axes, x.type.rank) is None:
            return f"normalises over axes {m.axes}, not the last one"
        if _scalar(m, "eps") is None:
            return "epsilon is not a scalar constant"
        return _vector_for(graph, m.gamma, x)

    def rewrite(self, b: Builder, m: Match):
        return b.op("RMSNormalization", m.x, m.gamma, axis=-1, epsilon=_scalar(m, "eps"))


@register_pass
class FuseRMSNorm(RewritePass):
    """Root-mean-square normalisation -> RMSNormalization-23.

    Before:  %ms = ReduceMean(Mul(%x, %x)){axes=[-1]}; %r = Reciprocal(Sqrt(Add(%ms, 1e-6)))
             %y = Mul(Mul(%x, %r), %gamma)
    After:   %y = RMSNormalization(%x, %gamma){epsilon=1e-6}
    """

    name = "fuse-rms-norm"

    def rules(self):
        return [RMSNormRule()]


# ------------------------------------------------------------------------------ GELU
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_TANH_C = math.sqrt(2.0 / math.pi)


class GeluRule(Rule):
    """0.5·x·(1 + erf(x/√2)) -> Gelu; 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) -> Gelu(tanh)."""

    name = "gelu"

    def patterns(self, op: OpBuilder) -> List[OpPat]:
        out = []
        for form in ("erf", "tanh"):
            for inner_kind, outer in itertools.product(("mul", "div"), ("a", "b", "c")):
                x = Var("x")
                if form == "erf":
                    scaled = op.Mul(x, op.const(_SQRT_HALF, rtol=1e-4)) if inner_kind == "mul" \
                        else op.Div(x, op.const(math.sqrt(2.0), rtol=1e-4))
                    act = op.Add(op.Erf(scaled), op.const(1.0))
                else:
                    if inner_kind == "div":
                        continue
                    cube = op.Pow(x, op.const(3.0))
                    poly = op.Add(x, op.Mul(cube, op.const(0.044715, rtol=1e-4)))
                    act = op.Add(op.Tanh(op.Mul(poly, op.const(_TANH_C, rtol=1e-4))), op.const(1.0))
                half = op.const(0.5)
                if outer == "a":                       # (x * 0.5) * act
                    root = op.Mul(op.Mul(x, half), act)
                elif outer == "b":                     # x * (act * 0.5)
                    root = op.Mul(x, op.Mul(act, half))
                else:                                  # (x * act) * 0.5
                    root = op.Mul(op.Mul(x, act), half)
                root.name = form                      # records which form matched
                out.append(root)
        return out

    def check(self, m: Match, graph: Graph) -> Optional[str]:
        return None if m.x.type.dtype.is_float else "not a float tensor"

    def rewrite(self, b: Builder, m: Match):
        approximate = "tanh" if "tanh" in m.bindings else "none"
        return b.op("Gelu", m.x, approximate=approximate)


@register_pass
class FuseGelu(RewritePass):
    """The erf and tanh GELU formulas -> Gelu-20.

    Before:  %y = Mul(Mul(%x, 0.5), Add(Erf(Mul(%x, 0.7071)), 1.0))
    After:   %y = Gelu(%x)                       (approximate="tanh" for the tanh formula)
    """

    name = "fuse-gelu"

    def rules(self):
        return [GeluRule()]
