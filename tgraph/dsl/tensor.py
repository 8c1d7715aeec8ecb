"""Symbolic tensors: Python operators and methods that append IR nodes.

A `Tensor` is a thin handle on an IR `Value` in the current trace. Every operation
goes through the op table's eager inference, so `x @ w` with mismatched dims fails at
that line with the module path and source location in the message.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ..ir import DType, TensorType, Value
from .tracer import current

Scalar = Union[int, float, bool]


def _op(op: str, *inputs, domain: str = "", **attrs):
    return current().builder.op(op, *inputs, domain=domain, **attrs)


class TensorOps:
    """Operator overloads shared by `Tensor` and `Parameter` (anything with `_value()`)."""

    def _value(self) -> Value:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- metadata ----------------------------------------------------------
    @property
    def type(self) -> TensorType:
        return self._value().type

    @property
    def shape(self):
        return self._value().type.shape

    @property
    def dtype(self) -> DType:
        return self._value().type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # ---- arithmetic -----------------------------------------------------------
    def _binary(self, op: str, other, reverse: bool = False) -> "Tensor":
        a, b = self._value(), as_value(other, like=self._value())
        return Tensor(_op(op, b, a) if reverse else _op(op, a, b))

    def __add__(self, o): return self._binary("Add", o)
    def __radd__(self, o): return self._binary("Add", o, True)
    def __sub__(self, o): return self._binary("Sub", o)
    def __rsub__(self, o): return self._binary("Sub", o, True)
    def __mul__(self, o): return self._binary("Mul", o)
    def __rmul__(self, o): return self._binary("Mul", o, True)
    def __truediv__(self, o): return self._binary("Div", o)
    def __rtruediv__(self, o): return self._binary("Div", o, True)
    def __pow__(self, o): return self._binary("Pow", o)
    def __matmul__(self, o): return self._binary("MatMul", o)
    def __rmatmul__(self, o): return self._binary("MatMul", o, True)
    def __neg__(self): return Tensor(_op("Neg", self._value()))
    def __lt__(self, o): return self._binary("Less", o)
    def __gt__(self, o): return self._binary("Greater", o)
    def eq(self, o): return self._binary("Equal", o)

    # ---- elementwise functions ----------------------------------------------
    def exp(self): return Tensor(_op("Exp", self._value()))
    def log(self): return Tensor(_op("Log", self._value()))
    def sqrt(self): return Tensor(_op("Sqrt", self._value()))
    def reciprocal(self): return Tensor(_op("Reciprocal", self._value()))
    def tanh(self): return Tensor(_op("Tanh", self._value()))
    def erf(self): return Tensor(_op("Erf", self._value()))
    def sigmoid(self): return Tensor(_op("Sigmoid", self._value()))
    def relu(self): return Tensor(_op("Relu", self._value()))
    def cos(self): return Tensor(_op("Cos", self._value()))
    def sin(self): return Tensor(_op("Sin", self._value()))
    def logical_not(self): return Tensor(_op("Not", self._value()))

    def cast(self, dtype) -> "Tensor":
        dtype = DType.of(dtype)
        return self if dtype == self.dtype else Tensor(_op("Cast", self._value(), to=dtype))

    # ---- reductions -------------------------------------------------------------
    def mean(self, axis: Union[int, Sequence[int]] = -1, keepdims: bool = True):
        return Tensor(_op("ReduceMean", self._value(), axes=_axes(axis), keepdims=int(keepdims)))

    def sum(self, axis: Union[int, Sequence[int]] = -1, keepdims: bool = True):
        return Tensor(_op("ReduceSum", self._value(), axes=_axes(axis), keepdims=int(keepdims)))

    def max(self, axis: Union[int, Sequence[int]] = -1, keepdims: bool = True):
        return Tensor(_op("ReduceMax", self._value(), axes=_axes(axis), keepdims=int(keepdims)))

    def softmax(self, axis: int = -1):
        return Tensor(_op("Softmax", self._value(), axis=axis))

    def cumsum(self, axis: int, exclusive: bool = False, reverse: bool = False):
        return Tensor(_op("CumSum", self._value(), axis=axis, exclusive=int(exclusive), reverse=int(reverse)))

    # ---- shape manipulation -----------------------------------------------------
    def reshape(self, *dims) -> "Tensor":
        """ONNX semantics: 0 copies the input dim, -1 is inferred. A Tensor argument is a
        dynamic shape."""
        if len(dims) == 1 and isinstance(dims[0], (TensorOps, list, tuple)):
            dims = dims[0]
        shape = dims._value() if isinstance(dims, TensorOps) else const(np.array(list(dims), dtype=np.int64))
        return Tensor(_op("Reshape", self._value(), shape))

    def transpose(self, *perm) -> "Tensor":
        if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
            perm = perm[0]
        return Tensor(_op("Transpose", self._value(), perm=list(perm)))

    def swap_last(self) -> "Tensor":
        """Swap the last two axes (K -> Kᵀ)."""
        rank = self.ndim
        return self.transpose(list(range(rank - 2)) + [rank - 1, rank - 2])

    def unsqueeze(self, *axes) -> "Tensor":
        return Tensor(_op("Unsqueeze", self._value(), axes=list(axes)))

    def squeeze(self, *axes) -> "Tensor":
        return Tensor(_op("Squeeze", self._value(), axes=list(axes) if axes else None))

    def split(self, sizes: Sequence[int], axis: int = -1):
        outs = _op("Split", self._value(), axis=axis, split=list(sizes))
        return tuple(Tensor(v) for v in (outs if isinstance(outs, tuple) else (outs,)))

    def gather(self, indices, axis: int = 0) -> "Tensor":
        return Tensor(_op("Gather", self._value(), as_value(indices, dtype=DType.int64), axis=axis))

    def slice(self, axis: int, start, end, step: int = 1) -> "Tensor":
        def bound(b):
            return as_value(b, dtype=DType.int64) if isinstance(b, TensorOps) else const(np.array([b], np.int64))
        return Tensor(_op("Slice", self._value(), bound(start), bound(end), const(np.array([axis], np.int64)),
                          const(np.array([step], np.int64))))

    def expand(self, shape) -> "Tensor":
        s = shape._value() if isinstance(shape, TensorOps) else const(np.array(list(shape), np.int64))
        return Tensor(_op("Expand", self._value(), s))

    def shape_of(self, start: int = 0, end: Optional[int] = None) -> "Tensor":
        """The runtime shape (int64), with symbolic contents tracked for inference."""
        return Tensor(_op("Shape", self._value(), start=start, end=end))


class Tensor(TensorOps):
    __slots__ = ("value",)

    def __init__(self, value: Value):
        self.value = value

    def _value(self) -> Value:
        return self.value

    def __repr__(self) -> str:
        return f"Tensor(%{self.value.name}: {self.value.type})"


# ---- free functions ----------------------------------------------------------------
def _axes(axis) -> list:
    return [axis] if isinstance(axis, int) else list(axis)


def const(array, dtype=None) -> Value:
    return current().builder.const(array, dtype=dtype)


def as_value(x, like: Optional[Value] = None, dtype=None) -> Value:
    """Tensors pass through; Python scalars and arrays become constants of `like`'s dtype."""
    if isinstance(x, TensorOps):
        return x._value()
    if isinstance(x, Value):
        return x
    target = DType.of(dtype) if dtype is not None else like.type.dtype if like is not None else None
    array = np.asarray(x) if target is None else np.asarray(x, dtype=target.numpy)
    return const(array)


def tensor(x, dtype=None) -> Tensor:
    """A constant tensor."""
    return Tensor(as_value(x, dtype=dtype))


def where(cond, a, b) -> Tensor:
    like = a._value() if isinstance(a, TensorOps) else b._value() if isinstance(b, TensorOps) else None
    return Tensor(_op("Where", as_value(cond), as_value(a, like=like), as_value(b, like=like)))


def concat(tensors: Sequence, axis: int) -> Tensor:
    return Tensor(_op("Concat", *[as_value(t) for t in tensors], axis=axis))


def causal_mask(scores: TensorOps, window: int = 0) -> Tensor:
    """Mark attention scores as causal; see `tgraph.CausalMask` (a pass may later turn this
    into `is_causal` on a fused attention op or an explicit mask). `window` W > 0 makes it
    local: each query sees only the last W keys up to itself (sliding-window attention)."""
    attrs = {"window": int(window)} if window else {}
    return Tensor(_op("CausalMask", scores._value(), domain="tgraph", **attrs))


def arange(start, end, dtype=DType.int64) -> Tensor:
    """`Range(start, end, 1)`; `end` may be a 0-d Tensor (a runtime length)."""
    return Tensor(_op("Range", as_value(start, dtype=dtype), as_value(end, dtype=dtype), as_value(1, dtype=dtype)))


def lowest(dtype: DType) -> float:
    return float(np.finfo(DType.of(dtype).numpy).min)
