"""Running exported models: an onnxruntime session (CUDA when it really works, else CPU).

`Session` picks providers and detects onnxruntime's silent CPU fallback,
checks inputs, and offers IO binding; `make_random_inputs` makes test inputs.
"""
from .providers import binding_device, check_active, cuda_load_error, describe_providers, requested_providers
from .device_cache import DeviceKVCache, cache_pairs, empty_past_shape, host_array
from .session import (Session, TensorSpec, check_signature, input_specs, make_random_inputs, resolve_dim,
                      session_options, to_numpy)

__all__ = ["DeviceKVCache", "Session", "cache_pairs", "describe_providers", "empty_past_shape", "host_array", "TensorSpec", "binding_device", "check_active", "check_signature", "cuda_load_error",
           "input_specs", "make_random_inputs", "requested_providers", "resolve_dim", "session_options", "to_numpy"]
