"""The tracing context: which graph the DSL is writing into right now.

`trace()` installs a `Tracer` for the duration of one forward call; `Tensor` operators
and `Parameter`s find it through `current()`. Parameters materialise once per trace
(so a weight shared by many layers, as in ALBERT, becomes one graph constant), named
by the first module path that reaches them.
"""
from __future__ import annotations

import contextvars
import os
import sys
import zlib
from typing import Dict, Optional

import numpy as np

from ..errors import ShapeError, TgraphError
from ..ir import Builder, Graph, Value

_CURRENT: contextvars.ContextVar[Optional["Tracer"]] = contextvars.ContextVar("tgraph_tracer", default=None)

_INTERNAL_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep for d in ("dsl", "ir")
)


def user_location() -> str:
    """`file.py:LINE` of the innermost frame outside tgraph's DSL and IR machinery."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_INTERNAL_DIRS):
            return f"{os.path.basename(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return ""


class Tracer:
    def __init__(self, graph: Graph, seed: int = 0):
        self.builder = Builder(graph, locate=user_location)
        self.seed = seed
        self.param_names: Dict[int, str] = {}    # id(Parameter) -> dotted path
        self._param_values: Dict[int, Value] = {}
        self._cache: Dict[object, Value] = {}

    @property
    def graph(self) -> Graph:
        return self.builder.graph

    def parameter_value(self, param) -> Value:
        key = id(param)
        if key not in self._param_values:
            name = self.param_names.get(key)
            if name is None:
                raise TgraphError(f"a Parameter of shape {param.shape} is used but not owned by the traced module")
            data = param.materialize(name, self.seed)
            self._param_values[key] = self.graph.add_constant(data, hint=name, is_param=True, exact_name=True)
        return self._param_values[key]

    def cached(self, key, make) -> Value:
        """Values built once per trace and shared by all layers (masks, position tables)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def __enter__(self):
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, *exc):
        _CURRENT.reset(self._token)


def current() -> Tracer:
    tracer = _CURRENT.get()
    if tracer is None:
        raise ShapeError("tensor operations need an active trace (call tgraph.dsl.trace(model, ...))")
    return tracer


def init_rng(seed: int, name: str) -> np.random.Generator:
    """Deterministic per-parameter generator: the same seed and name give the same weights,
    whatever order parameters are created or traced in."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])
