"""Running a static-KV-cache decoder around fixed buffers (see `tgraph.dsl.cache`).

Every input and output is bound once to a preallocated OrtValue: per layer one cache
buffer [batch, kv_heads, max_length, head_dim] bound both as ``past_key_values.*`` and as
``present.*`` (GroupQueryAttention writes the new tokens into it), the next tokens
[batch, 1], the attention mask [batch, max_length] whose row sums are the valid lengths,
and the logits [batch, 1, vocab]. A decode step only overwrites the token and mask buffers
in place (`OrtValue.update_inplace`), so every step runs with the same shapes at the same
addresses: what onnxruntime's CUDA graphs need. Prefill binds its own [batch, seq] ids and
mask (right-padded rows) and shares the rest.

An encoder-decoder's decoder also takes **request inputs**: the encoder's cross-attention
keys/values and encoder_attention_mask (`REQUEST_INPUTS`), fixed in shape and contents for one
request. `bind_request` binds them once per request, to both bindings; steps never rebind them.

The decisions are pure functions (`static_signature`, `buffer_shapes`, `cuda_graph_plan`),
unit-tested on the CPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, InputError
from . import providers as _prov
from .device_cache import PAST, cache_element_type, cache_pairs, host_array
from .session import Session, TensorSpec

MAX_LENGTH_DIMS = ("max_length", "max_sequence_length")
TOTAL_DIMS = ("total_sequence_length",)
DECODE_GRAPH_ID = "1"        # onnxruntime's gpu_graph_id of the captured decode step
NO_CAPTURE = "-1"            # prefill (its shapes vary) runs uncaptured
#: inputs a static decoder reads unchanged for a whole request (an encoder-decoder's)
REQUEST_INPUTS = re.compile(r"^(cross_attention\.\d+\.(key|value)|encoder_attention_mask)$")


def request_inputs(names: Sequence[str]) -> List[str]:
    return [n for n in names if REQUEST_INPUTS.match(n)]


def static_signature(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Optional[str]:
    """None when the graph has the static-cache interface, else why not (one line).

    Interface: input_ids [batch, seq], attention_mask [batch, total_sequence_length],
    past_key_values.* [batch, kv_heads, max_length, head_dim], each present.* of exactly
    its past's shape, logits [batch, 1, vocab]; besides, only `REQUEST_INPUTS`."""
    ins = {s.name: s for s in inputs}
    outs = {s.name: s for s in outputs}
    if "input_ids" not in ins or "attention_mask" not in ins:
        return "it needs input_ids and attention_mask inputs"
    mask = ins["attention_mask"].shape
    if mask is None or len(mask) != 2 or mask[1] not in TOTAL_DIMS:
        return f"attention_mask is {mask}, not [batch, total_sequence_length]"
    try:
        pairs = cache_pairs(list(ins), list(outs))
    except ConfigError as e:
        return str(e)
    for past, present in pairs:
        shape = ins[past].shape
        if shape is None or len(shape) != 4 or shape[2] not in MAX_LENGTH_DIMS:
            return f"{past} is {shape}, not [batch, kv_heads, max_length, head_dim]"
        if outs[present].shape != shape:
            return f"{present} is {outs[present].shape}, not its past's {shape}"
    extra = sorted(set(ins) - {"input_ids", "attention_mask"} - {p for p, _ in pairs} - set(request_inputs(ins)))
    if extra:
        return f"it takes input {extra[0]!r}, which a static-cache decoder does not"
    logits = outs.get("logits")
    if logits is None or logits.shape is None or len(logits.shape) != 3 or logits.shape[1] != 1:
        return f"logits is {None if logits is None else logits.shape}, not [batch, 1, vocab]"
    return None


def buffer_shapes(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], batch: int,
                  max_length: int) -> Dict[str, Tuple[int, ...]]:
    """The fixed shape of every bound buffer of a decode step: caches, ids, mask, logits."""
    shapes: Dict[str, Tuple[int, ...]] = {"input_ids": (batch, 1), "attention_mask": (batch, max_length)}
    for spec in inputs:
        if PAST.match(spec.name):
            _, heads, _, dim = spec.shape
            shapes[spec.name] = (batch, int(heads), max_length, int(dim))
    logits = next(s for s in outputs if s.name == "logits")
    vocab = logits.shape[2]
    if not isinstance(vocab, int):
        raise ConfigError(f"logits has a symbolic vocab dim {vocab!r}; cannot preallocate it")
    shapes["logits"] = (batch, 1, vocab)
    return shapes


@dataclass(frozen=True)
class CudaGraphPlan:
    enable: bool
    reason: str


def cuda_graph_plan(device: str, static_reason: Optional[str], node_providers: Optional[Mapping[str, str]] = None,
                    logits_on_device: bool = True, per_request: Sequence[str] = ()) -> CudaGraphPlan:
    """Whether a session may run with ``enable_cuda_graph``: on CUDA, with the static-cache
    interface (fixed shapes at fixed addresses), every compute node assigned to CUDA (when
    the placement is known: `node_providers` node -> provider) and the outputs bound on the
    device. Anything else runs as ordinary launches, and says why. `per_request`: request
    inputs (`REQUEST_INPUTS`), whose shapes follow each request's source length, so one
    captured graph cannot serve the next request."""
    if device != "cuda":
        return CudaGraphPlan(False, f"the session runs on {device}, CUDA graphs need CUDA")
    if static_reason is not None:
        return CudaGraphPlan(False, f"not a static-cache graph: {static_reason}")
    if per_request:
        return CudaGraphPlan(False, f"{per_request[0]} is rebound for every request (its shape follows the "
                                    "source length); a captured graph would keep the first one's")
    if node_providers is not None:
        off = sorted(n for n, p in node_providers.items() if p != _prov.CUDA)
        if off:
            return CudaGraphPlan(False, f"{len(off)} node(s) not on CUDA (first: {off[0]} on "
                                        f"{node_providers[off[0]]})")
    if not logits_on_device:
        return CudaGraphPlan(False, "outputs must be bound on the device")
    return CudaGraphPlan(True, "static shapes, fixed addresses, all nodes on CUDA")


RECORD_PLACEMENT = {"session.record_ep_graph_assignment_info": "1"}


def node_providers(ort_session) -> Optional[Dict[str, str]]:
    """node name -> the provider onnxruntime assigned it (after its own graph optimisation),
    or None when the session did not record it (RECORD_PLACEMENT) or onnxruntime cannot."""
    try:
        info = ort_session.get_provider_graph_assignment_info()
    except Exception:  # older onnxruntime, or recording not enabled
        return None
    placement = {}
    for sub in info:
        for node in sub.get_nodes():
            placement[node.name or f"{node.domain}.{node.op_type}"] = sub.ep_name
    return placement or None


def cuda_graph_options(plan: CudaGraphPlan) -> dict:
    """The CUDA provider options for `plan`."""
    return {"enable_cuda_graph": "1"} if plan.enable else {}


def graph_run_config(graph_id: Optional[int]) -> Dict[str, str]:
    """Run-config entries: capture/replay CUDA graph `graph_id`, or none (prefill, CPU)."""
    return {"gpu_graph_id": str(graph_id) if graph_id is not None else NO_CAPTURE}


def capacity_error(lengths: Sequence[int], max_new_tokens: int, max_length: int) -> Optional[str]:
    need = int(max(lengths)) + int(max_new_tokens) - 1
    if need > max_length:
        return (f"the longest prompt ({int(max(lengths))} tokens) plus max_new_tokens={max_new_tokens} needs {need} "
                f"cache positions but the cache holds {max_length}; export with a larger --max-length")
    return None


class StaticDecoder:
    """Prefill and decode steps of a static-cache decoder on fixed buffers.

    `prefill(ids, lengths)` takes right-padded rows (row b's tokens at 0..lengths[b]-1) and
    returns each row's next-token logits [batch, vocab]; `step(tokens)` appends one token
    per row and returns the next logits. Logits come back as a host array (fp32 when the
    graph emits fp32: half-precision exports cast them in the graph).
    """

    _graph_ids = iter(range(1, 1 << 30))      # one CUDA graph per decoder instance

    def __init__(self, session: Session, batch: int, max_length: int, cuda_graph: bool = False):
        import onnxruntime as ort

        why = static_signature(session.inputs, session.outputs)
        if why is not None:
            raise ConfigError(f"not a static-cache decoder: {why}")
        self.session, self.batch, self.max_length = session, int(batch), int(max_length)
        self.device = _prov.binding_device(None, session.device)
        self._index = session._device_index(self.device)
        self._ort = ort
        specs = {s.name: s for s in session.inputs}
        out_specs = {s.name: s for s in session.outputs}
        self.shapes = buffer_shapes(session.inputs, session.outputs, batch, max_length)
        self.pairs = cache_pairs(session.input_names, session.output_names)
        self.cache: Dict[str, object] = {}
        self._alive: List[np.ndarray] = []
        for past, _ in self.pairs:
            self.cache[past] = self._zeros(self.shapes[past], specs[past])
        self.ids_host = np.zeros(self.shapes["input_ids"], np.int64)
        self.mask_host = np.zeros(self.shapes["attention_mask"], np.int64)
        self.ids = self._device_copy(self.ids_host)
        self.mask = self._device_copy(self.mask_host)
        self.logits_host = self._host_buffer(self.shapes["logits"], out_specs["logits"])
        self.logits = self._device_copy(self.logits_host) if self.logits_host is not None else \
            self._zeros(self.shapes["logits"], out_specs["logits"])
        self._rows = np.arange(self.batch)
        self._fixed = len(self._alive)                     # host arrays kept for the decoder's life
        self.lengths = np.zeros(batch, np.int64)
        self.cuda_graph = bool(cuda_graph)
        self.graph_id = next(self._graph_ids) if self.cuda_graph else None
        self.prefill_options = self._run_options(None) if self.cuda_graph else None
        self.decode_options = self._run_options(self.graph_id) if self.cuda_graph else None
        self.request_names = request_inputs(session.input_names)
        self.request: Dict[str, object] = {}
        self.decode_binding = self._binding(self.ids, self.mask)
        self.steps = 0

    # ---------------------------------------------------------------- buffers
    def _device_copy(self, array: np.ndarray):
        """An OrtValue of `array` on the session's device. On the CPU onnxruntime wraps the
        NumPy memory without copying, so the array is kept alive with the decoder."""
        array = np.ascontiguousarray(array)
        self._alive.append(array)
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self._index)

    def _host_buffer(self, shape, spec: TensorSpec) -> Optional[np.ndarray]:
        """On the CPU, a NumPy array for onnxruntime to write the output into: reading it is then
        one copy, with no OrtValue conversion per step. None on a device, or for dtypes NumPy
        lacks (bfloat16)."""
        if self.device != "cpu" or spec.dtype is None or spec.dtype.name not in ("float32", "float16", "float64"):
            return None
        return np.zeros(shape, spec.dtype)

    def _zeros(self, shape, spec: TensorSpec):
        elem = cache_element_type(spec)
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), elem, self.device, self._index)
        if spec.dtype is not None and spec.dtype.name in ("float32", "float16", "float64"):
            value.update_inplace(np.zeros(shape, spec.dtype))
        return value

    def _binding(self, ids, mask):
        binding = self.session.ort_session.io_binding()
        binding.bind_ortvalue_input("input_ids", ids)
        binding.bind_ortvalue_input("attention_mask", mask)
        for past, present in self.pairs:                   # one buffer: read as past, written as present
            binding.bind_ortvalue_input(past, self.cache[past])
            binding.bind_ortvalue_output(present, self.cache[past])
        binding.bind_ortvalue_output("logits", self.logits)
        for name, value in self.request.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def bind_request(self, values: Mapping[str, object]) -> None:
        """Bind one request's `REQUEST_INPUTS` (OrtValues on the session's device, or host
        arrays, uploaded here once): every prefill and step of the request reads them."""
        missing = [n for n in self.request_names if n not in values]
        if missing:
            raise ConfigError(f"static decoder: request input {missing[0]!r} not given")
        self.request, self._request_arrays = {}, []      # host arrays the CPU OrtValues wrap
        for name in self.request_names:
            value = values[name]
            if isinstance(value, np.ndarray):
                value = np.ascontiguousarray(value)
                self._request_arrays.append(value)
                value = self._ort.OrtValue.ortvalue_from_numpy(value, self.device, self._index)
            if value.shape()[0] != self.batch:
                raise InputError(f"request input {name!r} has batch {value.shape()[0]}, the decoder {self.batch}")
            self.request[name] = value
        self.decode_binding = self._binding(self.ids, self.mask)

    def data_pointers(self) -> Dict[str, int]:
        """Where every bound buffer lives (tests assert they never move)."""
        ptrs = {name: v.data_ptr() for name, v in self.cache.items()}
        ptrs.update(input_ids=self.ids.data_ptr(), attention_mask=self.mask.data_ptr(),
                    logits=self.logits.data_ptr())
        ptrs.update({name: v.data_ptr() for name, v in self.request.items()})
        return ptrs

    def bound_shapes(self) -> Dict[str, Tuple[int, ...]]:
        shapes = {name: tuple(v.shape()) for name, v in self.cache.items()}
        shapes.update(input_ids=tuple(self.ids.shape()), attention_mask=tuple(self.mask.shape()),
                      logits=tuple(self.logits.shape()))
        return shapes

    # ---------------------------------------------------------------- running
    def _run_options(self, graph_id):
        options = self._ort.RunOptions()
        for key, value in graph_run_config(graph_id).items():
            options.add_run_config_entry(key, value)
        return options

    def _run(self, binding, options=None) -> np.ndarray:
        try:
            if options is None:
                self.session.ort_session.run_with_iobinding(binding)
            else:
                self.session.ort_session.run_with_iobinding(binding, options)
        except Exception as exc:  # onnxruntime's own exception types
            raise self.session._ort_failure(exc) from exc
        if self.logits_host is not None:                         # a copy: the buffer is rewritten next step
            return self.logits_host[:, 0, :].copy()
        return np.array(host_array(self.logits)[:, 0, :])

    def prefill(self, ids: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lengths = np.asarray(lengths, np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or lengths.shape != (self.batch,):
            raise InputError(f"prefill takes ids [batch={self.batch}, seq] and {self.batch} lengths, "
                             f"got {list(ids.shape)} and {list(lengths.shape)}")
        if lengths.min() < 1 or lengths.max() > ids.shape[1]:
            raise InputError(f"prompt lengths must be in 1..{ids.shape[1]}, got {lengths.tolist()}")
        if ids.shape[1] > self.max_length:
            raise InputError(f"a prompt of {ids.shape[1]} tokens exceeds the cache's {self.max_length} positions")
        if len(self.request) != len(self.request_names):
            raise ConfigError(f"static decoder: bind_request first (it reads {self.request_names[0]!r})")
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        del self._alive[self._fixed:]                          # the previous prefill's ids and mask
        binding = self._binding(self._device_copy(ids), self._device_copy(mask))
        self.lengths = lengths.copy()
        self.mask_host[:] = 0
        self.mask_host[:, :ids.shape[1]] = mask
        self.mask.update_inplace(self.mask_host)
        self.steps = 0
        return self._run(binding, self.prefill_options)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if int(self.lengths.max()) >= self.max_length:
            raise InputError(f"the cache's {self.max_length} positions are full")
        self.ids_host[:, 0] = tokens
        self.mask_host[self._rows, self.lengths] = 1
        self.lengths += 1
        if self.device != "cpu":          # on the CPU the OrtValues wrap ids_host / mask_host themselves
            self.ids.update_inplace(self.ids_host)             # same buffers, new contents
            self.mask.update_inplace(self.mask_host)
        self.steps += 1
        return self._run(self.decode_binding, self.decode_options)
