"""Activation-aware weight scaling (AWQ, Lin et al. 2023) for `quantize-weights`, no training.

Block quantization errs about equally on every weight row, so the rows that meet a large input
channel dominate the output error: on all-MiniLM-L6-v2 one channel of the post-LayerNorm
activation has E[x^2] ~100x the mean. For each group of linears reading one activation x
(q/k/v, gate/up, one linear alone) the pass picks per-input-channel scales
``s = mean|x|^alpha`` (alpha on a grid in [0, 1], alpha=0 is plain quantization), keeping the
alpha with the least calibration output error ``sum E||x (W - Q(diag(s) W) / s)||^2``, computed
from the activations' Gram matrix. The linears then quantize ``diag(s) W`` and read ``x / s``:
``1/s`` is folded where that is exact and free, else a ``Mul(x, 1/s)`` is inserted:

* into a LayerNormalization / RMSNormalization's scale (and bias) when x is its output and feeds
  only the group (pre-LN decoders: GPT-2, LLaMA);
* into the output columns (and bias) of a linear whose output is one factor of ``x = a * b``
  read only by that product (LLaMA's ``down(silu(gate) * up)``: up's columns), or the value of
  the Attention producing x when query and key/value heads are as many (o_proj: v_proj's columns);
* else ``Mul(x, 1/s)`` before the group (post-LN encoders such as BERT/MiniLM, whose LayerNorm
  output also feeds the residual; GELU outputs; o_proj under grouped-query attention).

A weight read by several MatMuls (ALBERT's shared layers) is left unscaled: one stored copy
cannot carry two input scalings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from tgraph.ir import Graph
from tgraph.ir.core import Node, Value

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")


class Moments(NamedTuple):
    """Calibration statistics of one activation: ``E|x|`` [K] and a factor R [r, K] of its Gram
    matrix, ``R^T R = E[x x^T]``: the tokens / sqrt(n) while there are at most K of them (the
    output error ``||R D||^2`` then costs n K N instead of K^2 N), else a Cholesky factor."""

    abs_mean: np.ndarray
    factor: np.ndarray

    @property
    def gram(self) -> np.ndarray:
        return self.factor.T @ self.factor


def gram_factor(gram: Optional[np.ndarray], tokens: Optional[np.ndarray] = None) -> np.ndarray:
    """R with ``R^T R = gram``: ``tokens / sqrt(n)`` if given, else a (lightly damped) Cholesky factor."""
    if tokens is not None:
        return np.asarray(tokens, np.float64) / np.sqrt(len(tokens))
    H = np.asarray(gram, np.float64)
    damp = 1e-9 * max(float(np.mean(np.diag(H))), 1e-30)
    return np.linalg.cholesky(H + damp * np.eye(len(H))).T


@dataclass
class Scaled:
    """What scaling did to a group: the alpha chosen, the scales, where ``1/s`` went."""

    alpha: float
    scales: np.ndarray
    folded_into: str          # "norm", "linear" or "mul"


def candidate_scales(abs_mean: np.ndarray, alpha: float) -> np.ndarray:
    """``mean|x|^alpha``, normalised to geometric-mid 1 (AWQ's rule); dead channels clamped."""
    a = np.asarray(abs_mean, np.float64)
    a = np.maximum(a, max(a.max(), 1e-12) * 1e-4)
    s = a ** alpha
    return s / np.sqrt(s.max() * s.min())


def choose_scales(weights: Sequence[np.ndarray], moments: Moments,
                  quantize: Callable[[np.ndarray, int], np.ndarray], bits: Sequence[int],
                  alphas: Sequence[float] = ALPHAS) -> Tuple[float, np.ndarray, List[float]]:
    """(alpha, s, errors per alpha): the grid point with the least summed output error of the
    group's [K, N] weights, `quantize(w, bits)` being the round trip the pass will apply."""
    R = moments.factor
    ws = [np.asarray(w, np.float64) for w in weights]
    errors = []
    best = (np.inf, 0.0, np.ones(len(moments.abs_mean)))
    for alpha in alphas:
        s = candidate_scales(moments.abs_mean, alpha)
        err = 0.0
        for w, b in zip(ws, bits):
            d = w - quantize((w * s[:, None]).astype(np.float32), b) / s[:, None]
            err += float(np.sum((R @ d) ** 2))          # E||x d||^2 = tr(d^T E[x x^T] d)
        errors.append(err)
        if err < best[0]:
            best = (err, float(alpha), s)
    return best[1], best[2], errors


# ---------------------------------------------------------------- folding 1/s into the graph
def _only_users(x: Value, nodes: Sequence[Node], graph: Graph) -> bool:
    ids = {id(n) for n in nodes}
    return all(id(u) in ids for u in x.users) and not any(o is x for o in graph.outputs)


def _fold_into_norm(graph: Graph, x: Value, inv: np.ndarray, group: Sequence[Node]) -> bool:
    """Scale a normalization's gamma (and beta) by 1/s: exact, and free at run time."""
    norm = x.producer
    if norm is None or norm.op not in NORMS or not _only_users(x, group, graph) or norm.outputs[0] is not x:
        return False
    if any(o.users for o in norm.outputs[1:]) or norm.attrs.get("axis", -1) not in (-1, len(x.shape or ()) - 1):
        return False
    params = list(norm.inputs[1:3])
    if not params or any(p is not None and (p.const is None or p.const.shape != inv.shape) for p in params):
        return False
    for i, p in enumerate(params, start=1):
        if p is not None:
            value = (np.asarray(p.const, np.float64) * inv).astype(p.dtype.numpy)
            norm.replace_input_with(i, graph.add_constant(value, p.name + "_awq", is_param=p.is_param))
    return True


def _channel_factors(node: Node) -> List[Value]:
    """Inputs of `node` whose channel c scales output channel c alone (scaling them by 1/s scales
    the output by 1/s): either factor of a Mul; the value of a 3-D Attention without a cache
    whose query and key/value head counts are equal (the output is P V per head, channel for channel)."""
    if node.domain:
        return []
    if node.op == "Mul" and node.inputs[0] is not node.inputs[1]:
        return list(node.inputs)
    if node.op == "Attention" and len(node.outputs) == 1 and len([v for v in node.inputs if v is not None]) <= 4 \
            and node.attrs.get("q_num_heads") and node.attrs.get("q_num_heads") == node.attrs.get("kv_num_heads") \
            and node.attrs.get("qk_matmul_output_mode") is None and node.inputs[2] is not None \
            and len(node.inputs[2].shape or ()) == 3 and node.inputs[2] is not node.inputs[0] \
            and node.inputs[2] is not node.inputs[1]:
        return [node.inputs[2]]
    return []


def _fold_into_linear(graph: Graph, x: Value, inv: np.ndarray, group: Sequence[Node], linears: Dict) -> bool:
    """x = a * b, or Attention(q, k, v), with b / v a linear's output read only there: scale that
    linear's output columns (and bias) by 1/s instead."""
    node = x.producer
    if node is None or not _only_users(x, group, graph):
        return False
    for factor in _channel_factors(node):
        lin = linears.get(id(factor))
        if lin is not None and factor.users == [node] and factor.shape and factor.shape[-1] == len(inv) \
                and all(o is not factor for o in graph.outputs):
            lin.weight = np.asarray(lin.weight, np.float32) * inv[None, :].astype(np.float32)
            if lin.bias is not None:
                bias = (np.asarray(lin.bias, np.float64) * inv).astype(lin.bias.dtype)
                old = lin.bias_add.inputs[1] if lin.bias_add.inputs[0] is lin.matmul.output else lin.bias_add.inputs[0]
                new = graph.add_constant(bias, old.name + "_awq", is_param=old.is_param)
                lin.bias_add.replace_input_with(list(lin.bias_add.inputs).index(old), new)
                lin.bias = bias
            return True
    return False


def _insert_mul(graph: Graph, x: Value, inv: np.ndarray, group: Sequence[Node]) -> None:
    """``Mul(x, 1/s)`` before the group's first MatMul, read by the group alone."""
    first = min(group, key=graph.nodes.index)
    const = graph.add_constant(inv.astype(x.dtype.numpy), f"{first.name}_awq_inv_scale")
    y = graph.new_value(x.type, f"{first.name}_awq_input")
    graph.insert_before(first, Node("Mul", [x, const], [y], {}, name=f"{first.name}_awq_mul"))
    for node in group:
        for i, v in enumerate(node.inputs):
            if v is x and i == 0:
                node.replace_input_with(0, y)


def scale_linears(graph: Graph, groups: Sequence[Tuple[Value, List]], stats: Dict[str, Moments],
                  quantize: Callable[[np.ndarray, int], np.ndarray], bits_for: Callable,
                  all_linears: Sequence, alphas: Sequence[float] = ALPHAS) -> Dict[str, Scaled]:
    """Scale each group's weights in place (``lin.weight``) and fold ``1/s`` into the graph; returns
    ``{first MatMul name: Scaled}`` for the groups whose best alpha is not 0."""
    by_output = {}
    for lin in all_linears:
        by_output[id(lin.bias_add.output if lin.bias_add is not None else lin.matmul.output)] = lin
    done: Dict[str, Scaled] = {}
    for x, lins in groups:
        moments = stats.get(lins[0].matmul.name)
        if moments is None:
            continue
        alpha, s, _ = choose_scales([lin.weight for lin in lins], moments, quantize, [bits_for(lin) for lin in lins],
                                    alphas)
        if alpha == 0.0:
            continue
        for lin in lins:
            lin.weight = np.asarray(lin.weight, np.float32) * s[:, None].astype(np.float32)
        inv = 1.0 / s
        nodes = [lin.matmul for lin in lins]
        if _fold_into_norm(graph, x, inv, nodes):
            how = "norm"
        elif _fold_into_linear(graph, x, inv, nodes, by_output):
            how = "linear"
        else:
            _insert_mul(graph, x, inv, nodes)
            how = "mul"
        done[lins[0].matmul.name] = Scaled(alpha, s, how)
    return done


def scaled_gram(gram: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The Gram matrix of ``x / s``: what GPTQ sees after scaling."""
    return gram / np.outer(s, s)
