"""A KV cache that stays on the session's device between decoding steps.

With a cached decoder (inputs ``past_key_values.{i}.key/value``, outputs
``present.{i}.key/value``) every step feeds the previous step's ``present`` back as
``past``. Reading it into NumPy and copying it back costs two host round trips of the
whole cache per token; `DeviceKVCache` instead keeps the ``present`` OrtValues that IO
binding allocated on the device and binds them as the next step's ``past`` as they are.
Only the outputs the caller asks for (the logits) come to the host.

Every decision is a pure function (`cache_pairs`, `empty_past_shape`, `cache_element_type`,
and `providers.describe_providers`), so the CUDA path is the CPU path with another device string
and is tested on machines without a GPU.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..errors import ConfigError, InputError
from . import providers as _prov
from .session import Session, TensorSpec

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT = "present.{layer}.{kind}"
#: dims of a cache input that count past positions (an empty cache has 0 of them)
PAST_DIMS = ("past_seq", "past_sequence_length", "past_len")


def cache_pairs(input_names: Sequence[str], output_names: Sequence[str]) -> List[Tuple[str, str]]:
    """``[(past input, present output), ...]`` by layer, then key before value.

    Raises `ConfigError` when a ``past_key_values.{i}.{key,value}`` input has no
    ``present.{i}.{key,value}`` output (or the model has no cache at all).
    """
    pairs = []
    for name in input_names:
        m = PAST.match(name)
        if not m:
            continue
        present = PRESENT.format(layer=m.group(1), kind=m.group(2))
        if present not in output_names:
            raise ConfigError(f"cache input '{name}' has no matching output '{present}' "
                              f"(outputs: {', '.join(output_names)})")
        pairs.append((int(m.group(1)), m.group(2) != "key", name, present))
    if not pairs:
        raise ConfigError("the model has no KV cache inputs (past_key_values.{i}.key/value); "
                          "export it with --set use_cache=true")
    return [(past, present) for _, _, past, present in sorted(pairs)]


def empty_past_shape(spec: TensorSpec, batch: int, dims: Optional[Mapping[str, int]] = None) -> Tuple[int, ...]:
    """The shape of an empty cache tensor for `spec`: ``batch`` dims get `batch`, past
    dims (``past_seq`` ...) 0, static dims stay, other names come from `dims`."""
    if spec.shape is None:
        raise ConfigError(f"cache input '{spec.name}' has no known rank; cannot make an empty cache")
    out = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            out.append(d)
        elif d in PAST_DIMS:
            out.append(0)
        elif d == "batch":
            out.append(int(batch))
        elif dims and d in dims:
            out.append(int(dims[d]))
        else:
            raise ConfigError(f"cache input '{spec.name}': no size for dim {d!r} on axis {axis} "
                              f"(give it in dims=)")
    return tuple(out)


def cache_element_type(spec: TensorSpec) -> int:
    """The ONNX element type of a cache input (an int, so bfloat16 works without NumPy support)."""
    if spec.dtype is None:
        raise ConfigError(f"cache input '{spec.name}' is not a tensor")
    name = spec.dtype.name
    table = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
             "bfloat16": onnx.TensorProto.BFLOAT16, "float64": onnx.TensorProto.DOUBLE}
    if name not in table:
        raise ConfigError(f"cache input '{spec.name}' has dtype {name}; expected a float type")
    return table[name]


class DeviceKVCache:
    """present -> past OrtValues kept where the session runs (CUDA memory on a GPU).

    ``step(inputs)`` runs one decoding step through IO binding: `inputs` are the
    non-cache inputs (numpy arrays or OrtValues), the cache is bound from device memory,
    the ``present`` outputs stay on the device and become the next ``past``. It returns
    the other outputs as host arrays (``fetch``; default all non-cache outputs).
    """

    def __init__(self, session: Session, batch: int = 1, dims: Optional[Mapping[str, int]] = None):
        self.session = session
        self.pairs = cache_pairs(session.input_names, session.output_names)
        self.device = _prov.binding_device(None, session.device)
        specs = {s.name: s for s in session.inputs}
        self.values: Dict[str, object] = {}
        import onnxruntime as ort

        for past, _ in self.pairs:
            spec = specs[past]
            self.values[past] = ort.OrtValue.ortvalue_from_shape_and_type(
                list(empty_past_shape(spec, batch, dims)), cache_element_type(spec), self.device,
                session._device_index(self.device))
        self.steps = 0

    @property
    def length(self) -> int:
        """Positions cached so far (the past axis of the first cache tensor)."""
        past = self.pairs[0][0]
        spec = next(s for s in self.session.inputs if s.name == past)
        axis = next((i for i, d in enumerate(spec.shape or ()) if d in PAST_DIMS), 2)
        return int(self.values[past].shape()[axis])

    def feeds(self) -> Dict[str, object]:
        """The cache as ``{past name: OrtValue}``, to bind as inputs."""
        return dict(self.values)

    def step(self, inputs: Mapping[str, object], fetch: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        cached = {p for p, _ in self.pairs}
        clash = [n for n in inputs if n in cached]
        if clash:
            raise InputError(f"input(s) {', '.join(clash)} are the KV cache, which DeviceKVCache feeds itself")
        presents = [present for _, present in self.pairs]
        wanted = [n for n in self.session.output_names if n not in presents] if fetch is None else list(fetch)
        outputs = self.session.run_with_binding({**inputs, **self.values}, outputs=wanted + presents,
                                                output_device=self.device)
        for past, present in self.pairs:        # the device buffers change hands; nothing is copied
            self.values[past] = outputs[present]
        self.steps += 1
        return {name: host_array(outputs[name]) for name in wanted}


def host_array(value) -> np.ndarray:
    """An OrtValue (or array) as a host NumPy array; bfloat16 arrives as ml_dtypes' bfloat16."""
    if isinstance(value, np.ndarray):
        return value
    if value.data_type() == "tensor(bfloat16)":
        import ml_dtypes

        if value.device_name().lower() != "cpu":
            raise InputError("reading a bfloat16 tensor from CUDA memory needs a float32 output "
                             "(onnxruntime cannot copy bfloat16 to NumPy)")
        import ctypes

        size = int(np.prod(value.shape()))
        if size == 0:
            return np.zeros(value.shape(), ml_dtypes.bfloat16)
        raw = np.ctypeslib.as_array((ctypes.c_uint16 * size).from_address(value.data_ptr()))
        return raw.copy().view(ml_dtypes.bfloat16).reshape(value.shape())
    return value.numpy()
