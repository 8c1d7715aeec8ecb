"""Safe rendering of graph-derived data into Python source.

Everything that comes from a graph (names, dims, scopes, attribute values, constant
arrays) reaches the generated module only through these functions: strings become
`repr()` literals, numbers and arrays become literals with an explicit NumPy dtype,
and free text becomes comment or docstring text in which every character that could
end the comment or the string is escaped. No graph text is ever pasted raw.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tgraph.errors import ExportError
from tgraph.ir.types import DType


# ---------------------------------------------------------------- free text
def _escape_char(c: str) -> str:
    return c.encode("unicode_escape", "backslashreplace").decode("ascii")


def comment(text: Any) -> str:
    """Text for a `# ...` comment: one physical line, no control or line-break chars."""
    return "".join(c if c.isprintable() else _escape_char(c) for c in str(text))


def doc(text: Any) -> str:
    """Text for inside a non-raw triple-quoted docstring whose value reads back as `text`."""
    out = []
    for c in str(text):
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c.isprintable():
            out.append(c)
        else:
            out.append(_escape_char(c))
    return "".join(out)


def str_lit(text: str) -> str:
    """A Python string literal; repr() of a str is always a valid, exact literal."""
    if not isinstance(text, str):
        raise ExportError(f"expected a string, got {type(text).__name__}")
    return repr(text)


# ---------------------------------------------------------------- numbers and arrays
def dtype_lit(dtype: Any) -> str:
    """`np.float32` etc.; the types NumPy lacks (bfloat16, float8, int4 ...) as `ml_dtypes.<name>`
    (the generated module then imports ml_dtypes)."""
    dt = DType.of(dtype)
    if dt.is_ml_dtype:
        return f"ml_dtypes.{dt.numpy.name}"
    return "np.bool_" if dt is DType.bool else f"np.{dt.name}"


def _float_text(value: np.floating) -> str:
    """Shortest decimal that reads back to exactly `value` in its own dtype."""
    if not isinstance(value, np.floating):           # an ml_dtypes float: every value is a float32
        value = np.float32(value)
    if np.isnan(value):
        return "np.nan"
    if np.isinf(value):
        return "np.inf" if value > 0 else "-np.inf"
    text = str(value)
    back = value.dtype.type(float(text))
    if back.tobytes() != value.tobytes():
        text = repr(float(value))
    return text


def _element_text(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, np.floating):
        return _float_text(value)
    if isinstance(value, np.generic) and DType.of(value.dtype).is_ml_dtype:   # exact in float32
        return _float_text(np.float32(value)) if DType.of(value.dtype).is_float else str(int(value))
    if isinstance(value, float):
        return _float_text(np.float64(value))
    raise ExportError(f"cannot write a {type(value).__name__} as a literal")


def _nested(array: np.ndarray) -> str:
    if array.ndim == 1:
        return "[" + ", ".join(_element_text(v) for v in array) + "]"
    return "[" + ", ".join(_nested(sub) for sub in array) + "]"


def array_lit(array: np.ndarray) -> str:
    """A small array as code: `np.float32(0.125)` (0-d) or `np.array([...], dtype=np.int64)`."""
    array = np.asarray(array)
    dt = dtype_lit(array.dtype)
    if array.ndim == 0:
        return f"{dt}({_element_text(array[()])})"
    if array.size == 0:
        return f"np.zeros({tuple(int(d) for d in array.shape)!r}, dtype={dt})"
    return f"np.array({_nested(array)}, dtype={dt})"


def float_attr_lit(value: float) -> str:
    """A float attribute, exactly. ONNX float attributes are float32, so a value that is a
    float32 prints in float32's shortest form: ``0.5``, or ``np.float32(1e-05)`` when the
    short text would read back as a different float64."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        return _float_text(np.float64(value))
    f32 = np.float32(value)
    if float(f32) != value:
        return repr(value)
    text = _float_text(f32)
    return text if float(text) == value else f"np.float32({text})"


def attr_lit(value: Any) -> str:
    """An attribute value as a Python literal (sequences become tuples)."""
    if value is None:
        return "None"
    if isinstance(value, DType):
        return dtype_lit(value)
    if isinstance(value, np.ndarray):
        return array_lit(value)
    if isinstance(value, str):
        return str_lit(value)
    if isinstance(value, (float, np.floating)):
        return float_attr_lit(value)
    if isinstance(value, (bool, int, np.bool_, np.integer)):
        return _element_text(value)
    if isinstance(value, (list, tuple)):
        items = [attr_lit(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    raise ExportError(f"cannot write attribute value of type {type(value).__name__} as a literal")
