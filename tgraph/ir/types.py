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
    """Element types; the value is the ONNX ``TensorProto`` enum number.

    NumPy has no bfloat16, float8, float4, int4/uint4 or int2/uint2; those come from
    `ml_dtypes` (the library JAX and ONNX use), whose arrays hold one value per element
    (unpacked), as `onnx.numpy_helper` returns them.
    """

    float32 = 1
    uint8 = 2
    int8 = 3
    uint16 = 4
    int16 = 5
    int32 = 6
    int64 = 7
    bool = 9
    float16 = 10
    float64 = 11
    uint32 = 12
    uint64 = 13
    bfloat16 = 16
    float8e4m3fn = 17
    float8e4m3fnuz = 18
    float8e5m2 = 19
    float8e5m2fnuz = 20
    uint4 = 21
    int4 = 22
    float4e2m1 = 23
    float8e8m0 = 24
    uint2 = 25
    int2 = 26

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_int(self) -> bool:
        return self in _INTS

    @property
    def is_signed(self) -> bool:
        return self.is_float or self in (DType.int2, DType.int4, DType.int8, DType.int16, DType.int32, DType.int64)

    @property
    def is_ml_dtype(self) -> bool:
        """Whether NumPy needs `ml_dtypes` for it."""
        return self.name in _ML_DTYPES

    @property
    def numpy(self) -> np.dtype:
        if self.name in _ML_DTYPES:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, _ML_DTYPES[self.name]))
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
        if name in _FROM_ML_DTYPES:
            return DType[_FROM_ML_DTYPES[name]]
        raise ValueError(f"unsupported dtype {x!r}")


# tgraph name -> ml_dtypes attribute (ONNX's float8e8m0 is ml_dtypes' float8_e8m0fnu)
_ML_DTYPES = {"bfloat16": "bfloat16", "float8e4m3fn": "float8_e4m3fn", "float8e4m3fnuz": "float8_e4m3fnuz",
              "float8e5m2": "float8_e5m2", "float8e5m2fnuz": "float8_e5m2fnuz", "uint4": "uint4", "int4": "int4",
              "float4e2m1": "float4_e2m1fn", "float8e8m0": "float8_e8m0fnu", "uint2": "uint2", "int2": "int2"}
_FROM_ML_DTYPES = {v: k for k, v in _ML_DTYPES.items()}
_FLOATS = frozenset({DType.float16, DType.float32, DType.float64, DType.bfloat16, DType.float8e4m3fn,
                     DType.float8e4m3fnuz, DType.float8e5m2, DType.float8e5m2fnuz, DType.float4e2m1, DType.float8e8m0})
_INTS = frozenset({DType.uint2, DType.int2, DType.uint4, DType.int4, DType.uint8, DType.int8, DType.uint16,
                   DType.int16, DType.uint32, DType.int32, DType.uint64, DType.int64})


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
