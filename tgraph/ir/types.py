"""Dtypes, dimensions and tensor types.

A dimension is an `int` (static), a `str` (a symbolic name such as ``"batch"`` or
an expression such as ``"past_seq + seq"``; it becomes an ONNX ``dim_param``) or
`None` (unknown). Symbolic arithmetic is deliberately small: it folds integers and
otherwise produces a readable expression string, which is all exporters need.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

Dim = Union[int, str, None]


class DType(enum.Enum):
    """Element types; the value is the ONNX ``TensorProto`` enum number."""

    float32 = 1
    uint8 = 2
    int8 = 3
    int32 = 6
    int64 = 7
    bool = 9
    float16 = 10
    float64 = 11
    bfloat16 = 16

    @property
    def is_float(self) -> bool:
        return self in (DType.float16, DType.float32, DType.float64, DType.bfloat16)

    @property
    def is_int(self) -> bool:
        return self in (DType.uint8, DType.int8, DType.int32, DType.int64)

    @property
    def numpy(self) -> np.dtype:
        if self is DType.bfloat16:
            import ml_dtypes  # shipped with onnx; numpy has no bfloat16

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.name if self is not DType.bool else np.bool_)

    @property
    def onnx(self) -> int:
        return self.value

    @staticmethod
    def of(x: Union["DType", str, np.dtype, type]) -> "DType":
        """Accept a DType, its name, a numpy dtype or an ONNX enum number."""
        if isinstance(x, DType):
            return x
        if isinstance(x, int) and not isinstance(x, bool):
            return DType(x)
        if isinstance(x, str) and x in DType.__members__:
            return DType[x]
        name = np.dtype(x).name
        if name == "bool":
            return DType.bool
        if name in DType.__members__:
            return DType[name]
        raise ValueError(f"unsupported dtype {x!r}")


def is_static(dim: Dim) -> bool:
    return isinstance(dim, int)


def _sym(dim: Dim) -> str:
    text = str(dim)
    return text if text.isidentifier() or isinstance(dim, int) else f"({text})"


def dim_add(a: Dim, b: Dim) -> Dim:
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return f"{a} + {b}"


def dim_mul(a: Dim, b: Dim) -> Dim:
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if a == 1:
        return b
    if b == 1:
        return a
    return f"{_sym(a)}*{_sym(b)}"


def dim_div(a: Dim, b: Dim) -> Dim:
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    if b == 1:
        return a
    return f"{_sym(a)}/{_sym(b)}"


def broadcast_dims(a: Dim, b: Dim) -> Dim:
    """Broadcast two dims; raises ValueError when they can never match."""
    if a == 1:
        return b
    if b == 1:
        return a
    if a == b:
        return a
    if isinstance(a, int) and isinstance(b, int):
        raise ValueError(f"dims {a} and {b} do not broadcast")
    # One symbolic: the static one wins (the symbol must equal it at run time).
    if isinstance(a, int):
        return a
    if isinstance(b, int):
        return b
    return a if a is not None else b


@dataclass(frozen=True)
class TensorType:
    """dtype plus shape; `shape is None` means the rank is unknown."""

    dtype: DType
    shape: Optional[Tuple[Dim, ...]]

    def __post_init__(self):
        object.__setattr__(self, "dtype", DType.of(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(is_static(d) for d in self.shape)

    def with_shape(self, shape: Optional[Sequence[Dim]]) -> "TensorType":
        return TensorType(self.dtype, None if shape is None else tuple(shape))

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(DType.of(dtype), self.shape)

    def __str__(self) -> str:
        if self.shape is None:
            return f"{self.dtype.name}[?]"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name}[{dims}]"

    @staticmethod
    def of_array(array: np.ndarray) -> "TensorType":
        return TensorType(DType.of(array.dtype), tuple(int(d) for d in array.shape))
