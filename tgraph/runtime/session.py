"""An onnxruntime session that says which device it really runs on and checks its inputs.

`Session` wraps ``onnxruntime.InferenceSession``: it picks providers (CUDA when it
really loads, else CPU; see `providers`), turns onnxruntime's silent CPU fallback
into an error when CUDA was demanded, checks input names/dtypes/ranks/dims before
running so mistakes are one clear line instead of an onnxruntime stack, and offers
an IO-binding path whose inputs and outputs can stay on the device.
"""
from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError, InputError, RuntimeBackendError
from . import providers as _prov

ModelSource = Union[str, Path, onnx.ModelProto, bytes]

OPTIMIZATION_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype and shape (ints, dim_params, None)."""

    name: str
    dtype: Optional[np.dtype]  # None for non-tensor values (sequences, maps)
    shape: Optional[Tuple[Union[int, str, None], ...]]  # None when even the rank is unknown

    def __str__(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


# ----------------------------------------------------------------------------- types and specs

def ort_type_to_numpy(type_str: str) -> Optional[np.dtype]:
    """``"tensor(float)"`` -> float32; None for anything that is not a tensor."""
    if not (type_str.startswith("tensor(") and type_str.endswith(")")):
        return None
    elem = onnx.TensorProto.DataType.Value(type_str[len("tensor("):-1].upper())
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def _spec_from_node_arg(arg) -> TensorSpec:
    shape = arg.shape
    return TensorSpec(arg.name, ort_type_to_numpy(arg.type), None if shape is None else tuple(shape))


def _spec_from_value_info(info: onnx.ValueInfoProto) -> TensorSpec:
    if not info.type.HasField("tensor_type"):
        return TensorSpec(info.name, None, None)
    tt = info.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    if not tt.HasField("shape"):
        return TensorSpec(info.name, dtype, None)
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorSpec(info.name, dtype, dims)


def _describe(value) -> Tuple[np.dtype, Tuple[int, ...]]:
    """(dtype, shape) of a numpy array or an OrtValue, without copying it."""
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape
    return ort_type_to_numpy(value.data_type()), tuple(value.shape())


def _is_ort_value(value) -> bool:
    return not isinstance(value, np.ndarray) and callable(getattr(value, "data_type", None))


def check_signature(specs: Sequence[TensorSpec], given: Mapping[str, Tuple[np.dtype, Tuple[int, ...]]]) -> None:
    """Raise `InputError` unless `given` (name -> (dtype, shape)) fits `specs`.

    Besides names, dtypes, ranks and static dims, a dim_param must have one size
    across all inputs (``batch`` of input_ids and of attention_mask), as ONNX says.
    """
    expected = [s.name for s in specs]
    unexpected = [n for n in given if n not in expected]
    if unexpected:
        raise InputError(f"unexpected input(s) {', '.join(map(repr, unexpected))}; "
                         f"the model's inputs are: {', '.join(expected)}")
    missing = [s for s in specs if s.name not in given]
    if missing:
        raise InputError(f"missing input(s): {'; '.join(map(str, missing))}")
    bound: Dict[str, Tuple[int, str]] = {}
    for spec in specs:
        dtype, shape = given[spec.name]
        if spec.dtype is not None and dtype != spec.dtype:
            raise InputError(f"input '{spec.name}' has dtype {dtype} but the model expects {spec.dtype}")
        if spec.shape is None:
            continue
        if len(shape) != len(spec.shape):
            raise InputError(f"input '{spec.name}' has rank {len(shape)} (shape {tuple(shape)}) but the model "
                             f"expects rank {len(spec.shape)} ({spec})")
        for axis, (size, want) in enumerate(zip(shape, spec.shape)):
            if isinstance(want, int) and size != want:
                raise InputError(f"input '{spec.name}' has size {size} on axis {axis} but the model expects {want}")
            if isinstance(want, str):
                first = bound.setdefault(want, (size, spec.name))
                if first[0] != size:
                    raise InputError(f"input '{spec.name}' has {want}={size} on axis {axis} but input "
                                     f"'{first[1]}' has {want}={first[0]}")


# ----------------------------------------------------------------------------- the session

def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_payload(model: ModelSource) -> Tuple[Union[str, bytes], str]:
    """What onnxruntime loads (a path keeps external data working) and a label for errors."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise RuntimeBackendError(f"model file not found: {path}")
        return str(path), str(path)
    if isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString(), f"model '{model.graph.name}'"
        except ValueError as exc:  # protobuf refuses messages over 2 GiB
            raise RuntimeBackendError(f"model '{model.graph.name}' is too large to pass in memory "
                                      f"({_one_line(exc)}); save it with external data and pass the path") from exc
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), "model bytes"
    raise ConfigError(f"a model must be a path, an onnx.ModelProto or bytes, not {type(model).__name__}")


def _thread_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{what} must be a non-negative int (0 = onnxruntime's default), got {value!r}")
    return int(value)


def session_options(threads: Optional[int] = None, inter_op_threads: Optional[int] = None,
                    optimization_level: str = "all"):
    """Build ``onnxruntime.SessionOptions`` from tgraph's small set of knobs."""
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"unknown optimization level {optimization_level!r}; "
                          f"use one of {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization_level])
    if threads is not None:
        options.intra_op_num_threads = _thread_count(threads, "threads")
    if inter_op_threads is not None:
        options.inter_op_num_threads = _thread_count(inter_op_threads, "inter_op_threads")
        if options.inter_op_num_threads > 1:  # inter-op threads are ignored in sequential mode
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return options


def _wants_cuda(request) -> bool:
    return request in ("auto", "cuda") or (not isinstance(request, str) and _prov.CUDA in request)


class Session:
    """Run an ONNX model with onnxruntime on CUDA when it truly works, else on the CPU.

    `providers` is "auto", "cpu", "cuda" (an error unless CUDA is really active) or a
    list of onnxruntime provider names. After creation, `providers` lists what
    onnxruntime actually uses and `device` is "cuda" or "cpu".
    """

    def __init__(self, model: ModelSource, providers: Union[str, Sequence[str]] = "auto", *,
                 threads: Optional[int] = None, inter_op_threads: Optional[int] = None,
                 optimization_level: str = "all", device_id: int = 0, cuda_options: Optional[dict] = None,
                 session_config: Optional[dict] = None):
        payload, self._label = _model_payload(model)
        # make_random_inputs wants the embedding sizes: read them now from an in-memory
        # model (so the proto need not be kept alive), lazily from a file.
        self._model_path = payload if isinstance(model, (str, Path)) else None
        self.device_id = int(device_id)
        options = session_options(threads, inter_op_threads, optimization_level)
        for key, value in (session_config or {}).items():     # e.g. session.record_ep_graph_assignment_info
            options.add_session_config_entry(key, value)
        available = list(ort.get_available_providers())
        cuda_error = None
        if _wants_cuda(providers) and _prov.CUDA in available:
            cuda_error = _prov.cuda_load_error(ort)
        requested = _prov.requested_providers(providers, available, device_id=self.device_id,
                                              cuda_error=cuda_error, cuda_options=cuda_options)
        from ..progress import phase

        try:
            with phase("onnxruntime session"):     # graph optimisation and kernel set-up: seconds for big models
                self._sess = ort.InferenceSession(payload, sess_options=options, providers=requested)
        except Exception as exc:  # onnxruntime's own exception types carry no common base
            names = [p[0] if isinstance(p, tuple) else p for p in requested]
            prefix = "CUDA requested but not active: " if providers == "cuda" else ""
            hint = _prov.missing_kernel_hint(str(exc), _holds_bfloat16(model))
            raise RuntimeBackendError(f"{prefix}onnxruntime could not create a session for {self._label} "
                                      f"with {names}: {hint or _one_line(exc)}") from exc
        self._vocab_sizes = None if self._model_path else vocab_sizes(_load_proto(model))
        self.providers: list = list(self._sess.get_providers())
        self._provider_context = (providers, available, cuda_error)   # for describe()
        self.device: str = _prov.check_active(providers, self.providers, cuda_error=cuda_error)
        self.inputs: list = [_spec_from_node_arg(a) for a in self._sess.get_inputs()]
        self.outputs: list = [_spec_from_node_arg(a) for a in self._sess.get_outputs()]

    # -- introspection
    @property
    def input_names(self) -> list:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list:
        return [s.name for s in self.outputs]

    @property
    def ort_session(self):
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._sess

    def describe(self, verbose: bool = True, hint: str = "") -> str:
        """The provider really in use, e.g. ``"CUDAExecutionProvider (device 0)"`` or
        ``"CPUExecutionProvider: CUDA not available: <reason>"`` (the reason only when `verbose`)."""
        request, available, cuda_error = self._provider_context
        return _prov.describe_providers(self.providers, self.device_id, request=request, available=available,
                                        cuda_error=cuda_error, verbose=verbose, hint=hint)

    def fallback_reason(self) -> Optional[str]:
        """Why this session runs without CUDA although the CPU was not asked for, else None."""
        request, available, cuda_error = self._provider_context
        return _prov.fallback_reason(self.providers, request=request, available=available, cuda_error=cuda_error)

    def __repr__(self) -> str:
        return (f"Session({self._label}, device={self.device!r}, providers={self.providers}, "
                f"inputs=[{'; '.join(map(str, self.inputs))}])")

    # -- running
    def _output_list(self, outputs: Optional[Iterable[str]]) -> list:
        if outputs is None:
            return self.output_names
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise InputError(f"unknown output(s) {', '.join(map(repr, unknown))}; "
                             f"the model's outputs are: {', '.join(self.output_names)}")
        return names

    def _as_array(self, name: str, value) -> np.ndarray:
        """Arrays keep their dtype (a mismatch is an error); Python scalars/lists take the model's."""
        if isinstance(value, np.ndarray):
            return np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        spec = next((s for s in self.inputs if s.name == name), None)
        dtype = spec.dtype if spec is not None and not isinstance(value, np.generic) else None
        return np.asarray(value, dtype=dtype, order="C")

    def _ort_failure(self, exc: BaseException) -> RuntimeBackendError:
        return RuntimeBackendError(f"onnxruntime failed running {self._label}: {_one_line(exc)}")

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
        """Run on numpy inputs; returns ``{output name: array}`` (all outputs unless `outputs` names some)."""
        feeds = {name: self._as_array(name, value) for name, value in inputs.items()}
        check_signature(self.inputs, {n: _describe(a) for n, a in feeds.items()})
        names = self._output_list(outputs)
        try:
            results = self._sess.run(names, feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise self._ort_failure(exc) from exc
        return dict(zip(names, results))

    def run_with_binding(self, inputs: Mapping[str, object], outputs: Optional[Iterable[str]] = None,
                         output_device: Optional[str] = None) -> Dict[str, object]:
        """Run through IO binding; returns ``{output name: OrtValue}``.

        Numpy inputs are copied once to the session's device; OrtValues (e.g. outputs
        of an earlier run) are bound where they are. Outputs are allocated on
        `output_device` (default: the session's device), so chained runs on CUDA never
        round-trip through host memory. Use `to_numpy` to read results.
        """
        input_device = _prov.binding_device(None, self.device)
        out_device = _prov.binding_device(output_device, self.device)
        values = {}
        for name, value in inputs.items():
            if _is_ort_value(value):
                values[name] = value
            else:
                values[name] = self._as_array(name, value)
        check_signature(self.inputs, {n: _describe(v) for n, v in values.items()})
        names = self._output_list(outputs)
        binding = self._sess.io_binding()
        for name, value in values.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, input_device, self._device_index(input_device))
                values[name] = value  # keep it alive until the run is over
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, out_device, self._device_index(out_device))
        try:
            self._sess.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types
            raise self._ort_failure(exc) from exc
        return dict(zip(names, binding.get_outputs()))

    def _device_index(self, device: str) -> int:
        return self.device_id if device == "cuda" else 0


def _holds_bfloat16(model: ModelSource) -> bool:
    """Whether a model has bfloat16 inputs or weights (read without external data)."""
    try:
        proto = _load_proto(model)
    except Exception:  # an unreadable model: onnxruntime's own error says enough
        return False
    bf16 = onnx.TensorProto.BFLOAT16
    return proto is not None and (any(t.data_type == bf16 for t in proto.graph.initializer) or
                                  any(v.type.tensor_type.elem_type == bf16 for v in proto.graph.input))


def to_numpy(values: Mapping[str, object]) -> Dict[str, np.ndarray]:
    """``{name: OrtValue}`` -> ``{name: ndarray}``, copying device memory to the host."""
    return {name: (v if isinstance(v, np.ndarray) else v.numpy()) for name, v in values.items()}


# ----------------------------------------------------------------------------- random inputs

DEFAULT_DIMS = {"batch": 1, "seq": 8}
DEFAULT_VOCAB = 100
_INDEX_PRESERVING = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand"}
_DIM_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
            ast.FloorDiv: operator.floordiv, ast.Div: operator.floordiv, ast.Mod: operator.mod}


def resolve_dim(dim: Union[int, str, None], dims: Mapping[str, int]) -> int:
    """A concrete size for a dim: ints stay, names and ``"past_seq + seq"``-style
    expressions are evaluated with `dims`, and anything unknown counts as 1."""
    if isinstance(dim, int):
        return dim
    if not dim:
        return 1

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return int(dims.get(node.id, 1))
        if isinstance(node, ast.BinOp) and type(node.op) in _DIM_OPS:
            return _DIM_OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(dim)

    try:
        return int(dims[dim]) if dim in dims else ev(ast.parse(dim, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return int(dims.get(dim, 1))


def _load_proto(source) -> Optional[onnx.ModelProto]:
    """The ModelProto behind `source`, weights left on disk, or None if there is none."""
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return onnx.load_from_string(bytes(source))
    if isinstance(source, (str, Path)):
        return onnx.load(str(source), load_external_data=False)
    return None


def infer_vocab_size(model: onnx.ModelProto, input_name: str) -> Optional[int]:
    """The number of rows of the embedding table that `input_name` indexes, if visible.

    Follows the ids through index-preserving ops (Cast, Reshape, ...) to a Gather
    whose data is an initializer; with several tables, the smallest wins.
    """
    tables = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consumers: Dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    sizes, frontier, seen = [], [input_name], {input_name}
    while frontier:
        value = frontier.pop()
        for node, slot in consumers.get(value, ()):
            if node.op_type == "Gather" and slot == 1 and node.input[0] in tables:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = tables[node.input[0]]
                sizes.append(dims[axis % len(dims)])
            elif node.op_type in _INDEX_PRESERVING and slot == 0:
                fresh = [o for o in node.output if o not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
    return min(sizes) if sizes else None


def vocab_sizes(model: onnx.ModelProto) -> Dict[str, int]:
    """``{input name: vocab size}`` for every graph input that indexes an embedding table."""
    weights = {t.name for t in model.graph.initializer}
    ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    found = {v.name: infer_vocab_size(model, v.name) for v in model.graph.input
             if v.name not in weights and v.type.tensor_type.elem_type in ints}
    return {name: size for name, size in found.items() if size is not None}


def _vocab_lookup(source) -> Dict[str, int]:
    if isinstance(source, Session):
        if source._vocab_sizes is None:
            source._vocab_sizes = vocab_sizes(_load_proto(source._model_path))
        return source._vocab_sizes
    proto = _load_proto(source) if not callable(getattr(source, "get_inputs", None)) else None
    return vocab_sizes(proto) if proto is not None else {}


def input_specs(source) -> list:
    """Input specs of a `Session`, an ``onnxruntime.InferenceSession`` or a model."""
    if isinstance(source, Session):
        return list(source.inputs)
    if callable(getattr(source, "get_inputs", None)):
        return [_spec_from_node_arg(a) for a in source.get_inputs()]
    proto = _load_proto(source)
    if proto is None:
        raise ConfigError(f"cannot read inputs from a {type(source).__name__}")
    weights = {t.name for t in proto.graph.initializer}
    return [_spec_from_value_info(v) for v in proto.graph.input if v.name not in weights]


def make_random_inputs(source, dims: Optional[Mapping[str, int]] = None, seed: int = 0,
                       vocab_size: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Plausible inputs for a Transformer-style model, reproducible from `seed`.

    ``*position_ids`` count 0, 1, ...; ``*token_type_ids`` are zeros; other ``*_ids``
    are token ids in ``[0, vocab)`` (vocab from `vocab_size`, else the embedding table
    the ids index, else 100); ``*mask`` inputs are ones; float inputs are standard
    normal; other integer inputs are zeros. Symbolic dims come from `dims` on top of
    ``{"batch": 1, "seq": 8}``; unknown ones are 1.
    """
    sizes = {**DEFAULT_DIMS, **(dims or {})}
    rng = np.random.default_rng(seed)
    vocabs = None
    result = {}
    for spec in input_specs(source):
        if spec.dtype is None:
            raise ConfigError(f"cannot make a random value for non-tensor input '{spec.name}'")
        shape = tuple(resolve_dim(d, sizes) for d in (spec.shape or ()))
        name = spec.name.lower()
        if name.endswith("position_ids"):
            value = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape)
        elif name.endswith("token_type_ids"):
            value = np.zeros(shape)
        elif name.endswith("ids") and spec.dtype.kind in "iu":
            vocab = vocab_size
            if vocab is None:
                vocabs = _vocab_lookup(source) if vocabs is None else vocabs
                vocab = vocabs.get(spec.name, DEFAULT_VOCAB)
            value = rng.integers(0, vocab, size=shape)
        elif name.endswith("mask"):
            value = np.ones(shape)
        elif spec.dtype.kind == "f" or spec.dtype.name == "bfloat16":
            value = rng.standard_normal(shape)
        else:
            value = np.zeros(shape)
        result[spec.name] = np.array(value, dtype=spec.dtype, order="C")
    return result
