"""`Module`, `Parameter`, `ModuleList` and `trace()`.

Modules look like PyTorch's: assign submodules and parameters as attributes, write
`forward`. Calling a module inside a trace pushes its dotted path onto the builder's
scope, so nodes are named after the model's structure and errors say where they came
from. Parameters are declarations (shape, dtype, initialiser) until a trace
materialises them, from loaded data or from a seeded initialiser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import CheckpointError, ShapeError, TgraphError
from ..ir import DType, Graph, TensorType
from ..ir.lazy import contiguous, is_lazy
from .tensor import Tensor, TensorOps
from .tracer import Tracer, current, init_rng


class Parameter(TensorOps):
    """A weight. `init` is "normal" (with `std`), "zeros" or "ones"."""

    def __init__(self, shape: Sequence[int], init: str = "normal", std: float = 0.02, dtype=DType.float32):
        self.shape_ = tuple(int(d) for d in shape)
        self.init = init
        self.std = std
        self.param_dtype = DType.of(dtype)
        self.data: Optional[np.ndarray] = None

    @property
    def shape(self):
        return self.shape_

    @property
    def dtype(self):
        return self.param_dtype

    def _value(self):
        return current().parameter_value(self)

    def materialize(self, name: str, seed: int) -> np.ndarray:
        if self.data is not None:
            return self.data
        np_dtype = self.param_dtype.numpy
        if self.init == "zeros":
            return np.zeros(self.shape_, np_dtype)
        if self.init == "ones":
            return np.ones(self.shape_, np_dtype)
        if self.init == "normal":
            return (init_rng(seed, name).standard_normal(self.shape_, dtype=np.float32) * self.std).astype(np_dtype)
        raise TgraphError(f"parameter {name}: unknown init {self.init!r}")

    def assign(self, array: np.ndarray, name: str = "parameter") -> None:
        """Checkpoint weights stay lazy (`tgraph.ir.lazy`): read when the model is written."""
        array = array if is_lazy(array) else np.asarray(array)
        if tuple(array.shape) != self.shape_:
            raise CheckpointError(f"{name}: shape {tuple(array.shape)} does not match the model's {self.shape_}")
        self.data = contiguous(array.astype(self.param_dtype.numpy, copy=False))

    def __repr__(self) -> str:
        return f"Parameter({list(self.shape_)}, {self.param_dtype.name})"


class Module:
    """Base class of all DSL layers and models."""

    def __init__(self):
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_params", {})

    def __setattr__(self, name: str, value: Any) -> None:
        if "_modules" not in self.__dict__:
            raise TgraphError(f"{type(self).__name__}.__init__ must call super().__init__() before setting attributes")
        self._modules.pop(name, None)
        self._params.pop(name, None)
        if isinstance(value, Module):
            self._modules[name] = value
        elif isinstance(value, Parameter):
            self._params[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        tracer = current()
        scope = tracer.builder.scope
        path = getattr(self, "_path", None)
        pushed = path.split(".") if path else []
        saved = list(scope)
        scope[:] = pushed if pushed else saved
        try:
            return self.forward(*args, **kwargs)
        finally:
            scope[:] = saved

    # ---- introspection ------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        seen = set()

        def walk(mod, path):
            if id(mod) in seen:
                return
            seen.add(id(mod))
            yield path, mod
            for name, child in mod._modules.items():
                yield from walk(child, f"{path}.{name}" if path else name)

        yield from walk(self, prefix)

    def named_parameters(self) -> Iterator[Tuple[str, Parameter]]:
        """Each parameter once, under the first path that reaches it (shared weights appear once)."""
        seen = set()
        for path, mod in self.named_modules():
            for name, p in mod._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameter_count(self) -> int:
        return sum(int(np.prod(p.shape)) for _, p in self.named_parameters())

    def load_state_dict(self, weights: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Assign arrays by dotted name; strict mode names every missing or unexpected tensor."""
        params = dict(self.named_parameters())
        missing = [n for n in params if n not in weights]
        unexpected = [n for n in weights if n not in params]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[0]!r}")
            raise CheckpointError("; ".join(parts))
        for name, array in weights.items():
            if name in params:
                params[name].assign(array, name)


class ModuleList(Module):
    def __init__(self, modules: Sequence[Module] = ()):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]


@dataclass(frozen=True)
class InputSpec:
    dtype: DType
    shape: Tuple[Union[int, str], ...]

    def type(self) -> TensorType:
        return TensorType(self.dtype, self.shape)


def trace(model: Module, inputs: Mapping[str, Union[InputSpec, TensorType]], *, seed: int = 0,
          name: Optional[str] = None) -> Graph:
    """Run `model.forward(**inputs)` symbolically and return the graph it builds.

    `forward` returns a Tensor (output named "output"), a tuple (output_0, ...) or a dict
    {output name: Tensor}, the usual case for models with named ONNX outputs.
    """
    graph = Graph(name=name or type(model).__name__)
    for path, mod in model.named_modules():
        object.__setattr__(mod, "_path", path)
    tracer = Tracer(graph, seed=seed)
    tracer.param_names = {id(p): n for n, p in model.named_parameters()}
    with tracer:
        args = {}
        for input_name, spec in inputs.items():
            t = spec.type() if isinstance(spec, InputSpec) else spec
            args[input_name] = Tensor(graph.add_input(input_name, t))
        result = model(**args)
        if isinstance(result, TensorOps):
            result = {"output": result}
        elif isinstance(result, (tuple, list)):
            result = {f"output_{i}": r for i, r in enumerate(result)}
        if not isinstance(result, Mapping) or not result:
            raise ShapeError(f"{type(model).__name__}.forward must return a Tensor, a tuple or a dict of Tensors")
        for out_name, t in result.items():
            graph.outputs.append(_name_output(tracer, out_name, t))
    graph.meta["seed"] = seed
    return graph


def _name_output(tracer: Tracer, name: str, t: TensorOps):
    graph = tracer.graph
    v = t._value()
    # Graph inputs, constants and values already exported under another name get an Identity.
    if v.producer is None or v in graph.outputs or name in graph.names:
        if name in graph.names:
            raise ShapeError(f"output name {name!r} collides with an input or parameter name")
        v = tracer.builder.op("Identity", v)
    graph.names.release(v.name)
    v.name = graph.names.claim(name)
    return v
