"""`quantize-weights`: linear layers (MatMul by a constant weight) become com.microsoft.MatMulNBits.

Decode reads every weight once per token, so its speed is set by weight bytes; int4 block-wise
weights are ~6x smaller than float32. The pass rewrites ``MatMul(x, W)`` (``W`` a constant
[K, N], or ``Transpose`` of a constant [N, K] such as a tied LM head) and folds a following
``Add`` of a constant [N] bias into the op's bias input. Quantization is block-wise along K
(the layout of onnxruntime's ContribOperators.md, see `tgraph.ir.contrib`):

* round-to-nearest (``method=rtn``, the default): per block, asymmetric ``[min, max]`` (widened
  to include 0 so the zero point is representable) or symmetric, onnxruntime's rule (scale =
  the signed value of largest magnitude / -2^(bits-1)) with the op's default zero point
  2^(bits-1) (no zero_points input);
* ``method=search``: per block, the clipping ratio of that range is searched on a grid to
  minimise the block's output error ``sum_k E[x_k^2] (w_k - w'_k)^2``; ``E[x_k^2]`` comes from
  calibration prompts (``calibration=FILE``), else it is 1 (plain weight MSE);
* ``method=gptq``: GPTQ's error feedback through the calibration activations' Gram matrix;
* ``method=awq`` / ``awq+gptq``: activation-aware per-input-channel scales first
  (`passes/quant_awq.py`), then round-to-nearest or GPTQ on the scaled weights.

K that is not a multiple of the block size is padded: the op defines n_blocks = ceil(K /
block), and the padded tail of the last block is zeros that the op ignores. Embedding tables
(Gather) stay float: MatMulNBits quantizes only MatMul weights. The LM head (a MatMul whose
result is a graph output) is quantized unless ``head=false``. In a float16/bfloat16 graph the
scales take the activations' dtype, as the op requires.

Mixed precision (the ``bits=8`` form of the same op, no new kernel): ``head-bits=8`` keeps the LM
head at 8 bits, and ``int8-layers=v_proj+down_proj`` every linear whose MatMul name contains one of
the ``+``-separated fragments as whole ``_``-separated words (node names follow the checkpoint's module paths). On random
12-layer LLaMA weights the value and down projections carry most of the int4 logit error (see
README); llama.cpp's Q4_K_M mix keeps the same two at higher precision.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Mapping, Optional, Tuple

import numpy as np

from tgraph.errors import ConfigError
from tgraph.ir import DType, Graph, TensorType
from tgraph.ir.core import Node, Value

from .base import Pass, register_pass
from .pattern import NearMiss
from .rewrite import replace_value

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
METHODS = ("rtn", "search", "gptq", "awq", "awq+gptq")
CALIBRATED = ("gptq", "awq", "awq+gptq")        # methods that cannot run without calibration statistics
SEARCH_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 21), 4))
MIN_K = 16


# ---------------------------------------------------------------- block quantization (pure NumPy)
@dataclass
class Quantized:
    """One weight in MatMulNBits form: q [N, n_blocks, block] codes, scales and zero points [N, n_blocks]."""

    q: np.ndarray
    scales: np.ndarray
    zero: Optional[np.ndarray]          # None: symmetric, the op's default 2^(bits-1)
    bits: int
    block_size: int
    K: int

    def dequantize(self) -> np.ndarray:
        """The [K, N] float32 weight these codes stand for."""
        zero = np.float32(1 << (self.bits - 1)) if self.zero is None else self.zero[..., None].astype(np.float32)
        w = (self.q.astype(np.float32) - zero) * self.scales[..., None].astype(np.float32)
        return w.reshape(w.shape[0], -1)[:, :self.K].T


def blocks_of(w: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, n_blocks, block], K zero-padded up to a multiple of the block size."""
    K, N = w.shape
    n_blocks = -(-K // block_size)
    wt = np.zeros((N, n_blocks * block_size), np.float32)
    wt[:, :K] = np.asarray(w, np.float32).T
    return wt.reshape(N, n_blocks, block_size)


def _codes(wb: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool):
    """Codes, scales and zero points of blocks `wb` for the range [lo, hi] (per block, [N, nb, 1])."""
    qmax = (1 << bits) - 1
    if symmetric:
        # onnxruntime's (MLAS) rule: the value of largest magnitude, with its sign, maps to code 0,
        # so all 2^bits codes are used (max|w| / (2^(bits-1) - 1) would leave one unused); the
        # scale is negative when that value is positive.
        mid = 1 << (bits - 1)
        scale = np.where(-lo > hi, lo, hi) / -mid
        scale = np.where(scale != 0, scale, 1.0).astype(np.float32)
        zero = np.full(scale.shape, mid, np.float32)
    else:
        scale = (hi - lo) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, qmax).astype(np.float32)
    q = np.clip(np.round(wb / scale) + zero, 0, qmax)
    return q, scale, zero


def quantize_weight(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                    method: str = "rtn", act_sq: Optional[np.ndarray] = None,
                    scale_dtype=np.float32) -> Quantized:
    """Block-quantize a [K, N] weight (see the module docstring for the methods)."""
    K = w.shape[0]
    wb = blocks_of(w, block_size)
    lo = np.minimum(wb.min(axis=-1, keepdims=True), 0)
    hi = np.maximum(wb.max(axis=-1, keepdims=True), 0)
    # rtn: the full range. search: the range shrunk by each ratio of the grid, keeping per block
    # the ratio with the least activation-weighted squared error. (Shrinking lo and hi
    # independently, an 11 x 11 grid, gained < 0.001 logit cosine for 7x the time.)
    pairs = [(r, r) for r in SEARCH_RATIOS] if method == "search" else [(1.0, 1.0)]
    if len(pairs) > 1:
        weight = np.ones((1, 1, block_size), np.float32) if act_sq is None else \
            blocks_of(np.asarray(act_sq, np.float32).reshape(K, 1), block_size)   # [1, nb, block]
    best = best_err = None
    for r_lo, r_hi in pairs:
        q, scale, zero = _codes(wb, lo * r_lo, hi * r_hi, bits, symmetric)
        if len(pairs) == 1:
            best = (q, scale, zero)
            break
        err = np.sum(weight * ((q - zero) * scale - wb) ** 2, axis=-1, keepdims=True)
        if best is None:
            best, best_err = (q, scale, zero), err
            continue
        better = err < best_err
        best = tuple(np.where(better, new, old) for new, old in zip((q, scale, zero), best))
        best_err = np.minimum(err, best_err)
    q, scale, zero = best
    scales = scale[..., 0].astype(scale_dtype)
    # Dequantization uses the stored (possibly half-precision) scales: recompute codes for them.
    if np.dtype(scale_dtype) != np.float32:
        s32 = scales.astype(np.float32)[..., None]
        q = np.clip(np.round(wb / np.where(s32 != 0, s32, 1)) + zero, 0, (1 << bits) - 1)
    return Quantized(q.astype(np.uint8), scales, None if symmetric else zero[..., 0].astype(np.uint8),
                     bits, block_size, K)


def gptq_factor(gram: np.ndarray, damp: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of the damped inverse Gram matrix, ``inv(H) = U^T U``,
    and the input channels that never fire. Computed once per activation: layers reading the
    same input (q/k/v, gate/up) share it, and it is most of GPTQ's time."""
    H = np.asarray(gram, np.float64).copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(H.shape[0])] += damp * float(np.mean(np.diag(H)))
    return np.linalg.cholesky(np.linalg.inv(H)).T, dead


def gptq_quantize(w: np.ndarray, gram: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                  damp: float = 0.01, scale_dtype=np.float32,
                  factor: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Quantized:
    """GPTQ (Frantar et al. 2022) with block-wise scales: quantize W [K, N] row by row along K,
    spreading each row's rounding error over the rows not yet quantized through the inverse of
    the activations' Gram matrix ``X^T X`` [K, K]. Each block's scale and zero point are taken
    from its rows as updated by the error feedback, just before they are quantized."""
    K, N = w.shape
    qmax = (1 << bits) - 1
    W = np.asarray(w, np.float64).copy()
    U, dead = factor if factor is not None else gptq_factor(gram, damp)
    W[dead, :] = 0.0
    n_blocks = -(-K // block_size)
    Q = np.zeros((n_blocks * block_size, N), np.float64)
    scales = np.zeros((N, n_blocks), np.float64)
    zeros = np.zeros((N, n_blocks), np.float64)
    for j in range(n_blocks):
        b0, b1 = j * block_size, min((j + 1) * block_size, K)
        Wb = W[b0:b1].copy()
        lo, hi = np.minimum(Wb.min(axis=0), 0), np.maximum(Wb.max(axis=0), 0)
        _, scale, zero = _codes(Wb[:1], lo[None], hi[None], bits, symmetric)
        scale = scale.reshape(N).astype(scale_dtype).astype(np.float64)
        scale = np.where(scale != 0, scale, 1.0)
        zero = zero.reshape(N).astype(np.float64)
        err_block = np.zeros_like(Wb)
        for i in range(b1 - b0):
            row = Wb[i]
            q = np.clip(np.round(row / scale) + zero, 0, qmax)
            err = (row - (q - zero) * scale) / U[b0 + i, b0 + i]
            Wb[i + 1:] -= np.outer(U[b0 + i, b0 + i + 1:b1], err)
            err_block[i] = err
            Q[b0 + i] = q
        Q[b1:(j + 1) * block_size] = zero                       # the padded tail dequantizes to 0
        W[b1:] -= U[b0:b1, b1:].T @ err_block
        scales[:, j], zeros[:, j] = scale, zero
    q = Q.T.reshape(N, n_blocks, block_size).astype(np.uint8)
    return Quantized(q, scales.astype(scale_dtype), None if symmetric else zeros.astype(np.uint8),
                     bits, block_size, K)


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, first value in the low bits (ContribOperators.md)."""
    per_byte = 8 // bits
    q = np.asarray(q, np.uint8)
    pad = (-q.shape[-1]) % per_byte
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), np.uint8)], axis=-1)
    q = q.reshape(q.shape[:-1] + (-1, per_byte))
    out = np.zeros(q.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= (q[..., i] << np.uint8(i * bits)).astype(np.uint8)
    return out


def matmul_nbits_inputs(qw: Quantized) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(B [N, n_blocks, blob], scales [N * n_blocks], zero_points [N * ceil(n_blocks * bits / 8)] or None)."""
    B = pack_codes(qw.q, qw.bits)
    zp = None if qw.zero is None else pack_codes(qw.zero, qw.bits).reshape(-1)
    return B, qw.scales.reshape(-1), zp


# ---------------------------------------------------------------- finding linear layers
@dataclass
class LinearLayer:
    """A MatMul by a constant weight: the node, the [K, N] weight, an Add of a [N] bias, head or not."""

    matmul: Node
    weight: np.ndarray
    bias_add: Optional[Node]
    bias: Optional[np.ndarray]
    is_head: bool


def _const_weight(v: Optional[Value]) -> Optional[np.ndarray]:
    """The [K, N] array of `v` if it is a constant, or a Transpose of one (a tied LM head)."""
    if v is None:
        return None
    if v.const is not None:
        return v.const if v.const.ndim == 2 else None
    p = v.producer
    if (p is not None and p.op == "Transpose" and not p.domain and p.inputs[0] is not None
            and p.inputs[0].const is not None and p.inputs[0].const.ndim == 2
            and list(p.attrs.get("perm") or [1, 0]) == [1, 0]):
        return p.inputs[0].const.T
    return None


def _reaches_output(v: Value, outputs: set, depth: int = 2) -> bool:
    if id(v) in outputs:
        return True
    return depth > 0 and any(_reaches_output(o, outputs, depth - 1)
                             for u in v.users if u.op in ("Add", "Reshape", "Identity", "Cast")
                             for o in u.outputs)


def find_linears(graph: Graph) -> List[LinearLayer]:
    """Every MatMul whose second input is a constant 2-D float weight and whose first is an activation."""
    outputs = {id(v) for v in graph.outputs}
    found = []
    for node in graph.nodes:
        if node.op != "MatMul" or node.domain or node.inputs[0] is None or node.inputs[0].const is not None:
            continue
        w = _const_weight(node.inputs[1])
        if w is None or not DType.of(w.dtype).is_float or node.inputs[0].dtype is DType.float64:
            continue
        out = node.output
        bias_add = bias = None
        users = out.users
        if len(users) == 1 and users[0].op == "Add" and not users[0].domain and id(out) not in outputs:
            add = users[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if other is not None and other.const is not None and other.const.shape == (w.shape[1],) \
                    and other.dtype is out.dtype:
                bias_add, bias = add, other.const
        found.append(LinearLayer(node, w, bias_add, bias, _reaches_output(out, outputs)))
    return found


# ---------------------------------------------------------------- the pass
@register_pass
class QuantizeWeights(Pass):
    """Weight-only quantization: MatMul by a constant weight -> com.microsoft.MatMulNBits (int4/int8)."""

    name: ClassVar[str] = "quantize-weights"
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 0
    method: str = "rtn"
    head: bool = True
    calibration: str = ""
    head_bits: int = 0          # 0: the same as `bits`; 8: the LM head at 8 bits
    int8_layers: str = ""       # "+"-separated MatMul name fragments kept at 8 bits

    def __post_init__(self):
        self.bits, self.block_size, self.accuracy_level = int(self.bits), int(self.block_size), int(self.accuracy_level)
        self.symmetric, self.head = bool(self.symmetric), bool(self.head)
        if self.bits not in BITS:
            raise ConfigError(f"quantize-weights: bits must be one of {BITS}, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"quantize-weights: block-size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError(f"quantize-weights: accuracy-level must be 0..4, got {self.accuracy_level}")
        self.head_bits = int(self.head_bits)
        if self.head_bits not in (0,) + BITS:
            raise ConfigError(f"quantize-weights: head-bits must be 0 (same as bits), 4 or 8, got {self.head_bits}")
        self.int8_fragments = tuple(f.strip() for f in str(self.int8_layers or "").split("+") if f.strip())
        if self.method not in METHODS:
            raise ConfigError(f"quantize-weights: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.act_stats: Optional[Mapping[str, np.ndarray]] = None     # set by callers, or from `calibration`
        self.refused: List[str] = []
        self.scaled: Dict = {}                    # awq: {first MatMul of a group: quant_awq.Scaled}
        self.near_misses: List[NearMiss] = []     # the refusals again, for the pass manager's --report

    def run(self, graph: Graph) -> Dict[str, int]:
        self.refused, self.near_misses = [], []
        linears = find_linears(graph)
        stats = self.act_stats
        if stats is None and self.calibration and self.method != "rtn":
            from tgraph.quantize_report import calibration_stats, read_calibration_ids

            stats = calibration_stats(graph, read_calibration_ids(self.calibration), [l.matmul for l in linears],
                                      self.method)
        if self.method in CALIBRATED and stats is None:
            raise ConfigError(f"quantize-weights: method={self.method} needs calibration prompts (calibration=FILE)")
        unmatched = [f for f in self.int8_fragments if not any(self._matches(f, lin) for lin in linears)]
        if unmatched:
            raise ConfigError(f"quantize-weights: int8-layers {'+'.join(unmatched)} names no linear layer "
                              f"(linears are named like {linears[0].matmul.name if linears else 'nothing: none found'})")
        done = padded = promoted = 0
        todo = []
        for lin in linears:
            reason = self._refusal(lin)
            if reason:
                self.refused.append(f"{lin.matmul.name}: {reason}")
                self.near_misses.append(NearMiss(self.name, lin.matmul.name, reason))
            else:
                todo.append(lin)
        self.scaled = self._awq(graph, todo, stats) if self.method.startswith("awq") else {}
        shared: Dict = {}
        for lin in todo:
            padded += lin.weight.shape[0] % self.block_size != 0
            promoted += self.bits_for(lin) != self.bits
            self._rewrite(graph, lin, None if stats is None else stats.get(lin.matmul.name), shared)
            done += 1
        graph.remove_unused_constants()
        # A refusal is not a change: a second run, refusing the same layer again, changes nothing.
        counts = {"quantized": done, "padded": padded}
        if promoted:
            counts["at_8_bits" if self.bits == 4 else "at_4_bits"] = promoted
        for scaled in self.scaled.values():
            key = f"awq_into_{scaled.folded_into}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _awq(self, graph: Graph, linears: List[LinearLayer], stats: Mapping) -> Dict:
        """Activation-aware scales for each group of linears sharing an input (see quant_awq); the
        weights are scaled in place and each group's statistics become those of ``x / s``."""
        from . import quant_awq

        def weight_key(lin: LinearLayer) -> int:
            w_in = lin.matmul.inputs[1]
            return id(w_in if w_in.const is not None else w_in.producer.inputs[0])

        readers: Dict[int, int] = {}
        for lin in linears:
            readers[weight_key(lin)] = readers.get(weight_key(lin), 0) + 1
        groups: Dict[int, Tuple[Value, List[LinearLayer]]] = {}
        for lin in linears:
            if readers[weight_key(lin)] == 1:      # one stored copy read twice cannot carry two scalings
                x = lin.matmul.inputs[0]
                groups.setdefault(id(x), (x, []))[1].append(lin)

        def round_trip(w: np.ndarray, bits: int) -> np.ndarray:
            return quantize_weight(w, bits, self.block_size, self.symmetric).dequantize()

        eligible = [lin for _, group in groups.values() for lin in group]
        scaled = quant_awq.scale_linears(graph, list(groups.values()), stats, round_trip, self.bits_for, eligible)
        self._gram = {}                    # awq+gptq: one Gram matrix of x / s per activation
        if self.method == "awq+gptq":
            by_moments: Dict[int, np.ndarray] = {}
            for lin in linears:
                moments = stats[lin.matmul.name]
                if id(moments) not in by_moments:
                    by_moments[id(moments)] = moments.gram
                self._gram[lin.matmul.name] = by_moments[id(moments)]
            for _, group in groups.values():
                done = scaled.get(group[0].matmul.name)
                if done is not None:
                    gram = quant_awq.scaled_gram(self._gram[group[0].matmul.name], done.scales)
                    self._gram.update({lin.matmul.name: gram for lin in group})
        return scaled

    def _refusal(self, lin: LinearLayer) -> str:
        K, N = lin.weight.shape
        if lin.is_head and not self.head:
            return "LM head kept in float (head=false)"
        if K < MIN_K:
            return f"input dimension K={K} is below {MIN_K}"
        if lin.matmul.inputs[0].dtype not in (DType.float32, DType.float16, DType.bfloat16):
            return f"activations are {lin.matmul.inputs[0].dtype.name}"
        return ""

    def bits_for(self, lin: LinearLayer) -> int:
        """The layer's bits: `head-bits` for the LM head, 8 for an `int8-layers` match, else `bits`."""
        if lin.is_head and self.head_bits:
            return self.head_bits
        if any(self._matches(f, lin) for f in self.int8_fragments):
            return 8
        return self.bits

    @staticmethod
    def _matches(fragment: str, lin: LinearLayer) -> bool:
        """`fragment` is a run of whole ``_``-separated words of the MatMul's name (v_proj, mlp_down)."""
        return re.search(rf"(^|[_.]){re.escape(fragment)}($|[_.])", lin.matmul.name) is not None

    def _rewrite(self, graph: Graph, lin: LinearLayer, act_sq: Optional[np.ndarray], shared: Dict) -> None:
        node, x = lin.matmul, lin.matmul.inputs[0]
        dtype = x.dtype
        w_in = node.inputs[1]
        bits = self.bits_for(lin)
        key = (id(w_in.producer.inputs[0]) if w_in.const is None else id(w_in), dtype, bits)
        if key not in shared:      # a weight shared by several MatMuls (ALBERT) is stored once
            if self.method.endswith("gptq"):
                if self.method == "awq+gptq":
                    act_sq = self._gram[node.name]          # the Gram matrix of x / s
                factors = shared.setdefault("gptq factors", {})       # one per shared activation
                if id(act_sq) not in factors:
                    factors[id(act_sq)] = (act_sq, gptq_factor(act_sq))
                qw = gptq_quantize(lin.weight, act_sq, bits, self.block_size, self.symmetric,
                                   scale_dtype=dtype.numpy, factor=factors[id(act_sq)][1])
            else:
                qw = quantize_weight(np.asarray(lin.weight, np.float32), bits, self.block_size, self.symmetric,
                                     "rtn" if self.method == "awq" else self.method, act_sq, scale_dtype=dtype.numpy)
            B, scales, zp = matmul_nbits_inputs(qw)
            base = w_in.name if w_in.const is not None else f"{node.name}.weight"
            shared[key] = [graph.add_constant(B, f"{base}_q{bits}", is_param=True),
                           graph.add_constant(scales, f"{base}_scales", is_param=True),
                           None if zp is None else graph.add_constant(zp, f"{base}_zero_points", is_param=True)]
        K, N = lin.weight.shape
        ins = [x] + shared[key]
        out = node.output
        if lin.bias_add is not None:
            bias = lin.bias_add.inputs[1] if lin.bias_add.inputs[0] is node.output else lin.bias_add.inputs[0]
            ins += [None, bias]
            out = lin.bias_add.output
        attrs = {"K": K, "N": N, "bits": bits, "block_size": self.block_size,
                 "accuracy_level": self.accuracy_level}
        new_out = graph.new_value(TensorType(dtype, out.shape), node.name + "_nbits")
        anchor = lin.bias_add or node
        new = Node("MatMulNBits", ins, [new_out], attrs, domain="com.microsoft", name=node.name + "_nbits",
                   meta=dict(node.meta))
        graph.insert_after(anchor, new)
        replace_value(graph, out, new_out)
        for dead in ([lin.bias_add] if lin.bias_add is not None else []) + [node]:
            graph.remove_node(dead)
        if w_in is not None and w_in.producer is not None and not w_in.users:
            graph.remove_node(w_in.producer)
