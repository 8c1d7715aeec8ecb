"""Choosing onnxruntime execution providers, and noticing when CUDA is not really on.

onnxruntime-gpu lists ``CUDAExecutionProvider`` as *available* even when the CUDA
libraries are missing; creating a session then only logs an error and silently runs
on the CPU. So the choice is made in two pure steps that are easy to test without a
GPU: `requested_providers` (what to ask for) and `check_active` (what we got).
`cuda_load_error` is the one impure helper: it finds out *why* CUDA cannot load.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Optional, Sequence, Union

from ..errors import ConfigError, RuntimeBackendError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
REQUESTS = ("auto", "cpu", "cuda")


def requested_providers(request: Union[str, Sequence[str]], available: Sequence[str], *,
                        device_id: int = 0, cuda_error: Optional[str] = None,
                        cuda_options: Optional[dict] = None) -> list:
    """The provider list to hand to onnxruntime for `request`.

    `available` is ``onnxruntime.get_available_providers()``; `cuda_error` is a known
    reason why the CUDA provider cannot load (from `cuda_load_error`), if any. "auto"
    then quietly uses the CPU; "cuda" fails early with that reason. A sequence of
    provider names is passed through after checking each is available.
    """
    cuda_entry = (CUDA, {"device_id": int(device_id), **(cuda_options or {})})   # e.g. enable_cuda_graph
    if isinstance(request, str):
        if request == "cpu":
            return [CPU]
        if request == "auto":
            return [cuda_entry, CPU] if CUDA in available and cuda_error is None else [CPU]
        if request == "cuda":
            if CUDA not in available:
                raise RuntimeBackendError(
                    f"CUDA requested but not active: {CUDA} is not in onnxruntime's available providers "
                    f"{list(available)} (install onnxruntime-gpu)")
            if cuda_error is not None:
                raise RuntimeBackendError(f"CUDA requested but not active: {CUDA} failed to load: {cuda_error}")
            return [cuda_entry, CPU]  # CPU stays as the home of ops CUDA has no kernel for
        raise ConfigError(f"unknown providers request {request!r}; use one of {', '.join(REQUESTS)} "
                          f"or a list of onnxruntime provider names")
    names = list(request)
    missing = [n for n in names if n not in available]
    if not names or missing:
        raise RuntimeBackendError(f"providers {missing or names} are not available in onnxruntime "
                                  f"(available: {list(available)})")
    return [cuda_entry if n == CUDA else n for n in names]


def check_active(request: Union[str, Sequence[str]], active: Sequence[str], *,
                 cuda_error: Optional[str] = None) -> str:
    """The device ("cuda" or "cpu") a session with providers `active` runs on.

    Raises `RuntimeBackendError` when CUDA was explicitly requested (``"cuda"`` or a
    list naming it) but onnxruntime fell back to the CPU.
    """
    on_cuda = CUDA in active
    wanted_cuda = request == "cuda" or (not isinstance(request, str) and CUDA in request)
    if wanted_cuda and not on_cuda:
        why = (f"{CUDA} failed to load: {cuda_error}" if cuda_error else
               f"onnxruntime silently fell back to {list(active)} ({CUDA} failed to load; "
               f"see onnxruntime's log for details)")
        raise RuntimeBackendError(f"CUDA requested but not active: {why}")
    return "cuda" if on_cuda else "cpu"


def fallback_reason(active: Sequence[str], *, request="auto", available: Sequence[str] = (),
                    cuda_error: Optional[str] = None) -> Optional[str]:
    """Why a session that was not told to use the CPU runs without CUDA; None when it runs on
    CUDA or the CPU was asked for."""
    if CUDA in active or request == "cpu" or (not isinstance(request, str) and CUDA not in request):
        return None
    if CUDA not in available:
        return f"{CUDA} is not in onnxruntime's available providers (install onnxruntime-gpu)"
    if cuda_error:
        return f"{CUDA} failed to load: {cuda_error}"
    return "onnxruntime fell back to the CPU (see its log)"


def describe_providers(active: Sequence[str], device_id: int = 0, *, request="auto",
                       available: Sequence[str] = (), cuda_error: Optional[str] = None,
                       verbose: bool = True, hint: str = "") -> str:
    """What a session really runs on, in one line for the user.

    ``"CUDAExecutionProvider (device 0)"``, or the CPU provider with why CUDA is not in
    use: ``"CPUExecutionProvider: CUDA not available: libcublasLt.so.13: cannot open ..."``.
    `verbose=False` keeps it short: the provider, and only the fact that CUDA is not
    available (``"CPUExecutionProvider (CUDA not available; <hint>)"``), not the reason.
    """
    if CUDA in active:
        return f"{CUDA} (device {int(device_id)})"
    first = active[0] if active else CPU
    why = fallback_reason(active, request=request, available=available, cuda_error=cuda_error)
    if why is None:
        return f"{first}: CPU requested" if verbose else first
    if not verbose:
        return f"{first} (CUDA not available{'; ' + hint if hint else ''})"
    return f"{first}: CUDA not available: {why}"


def binding_device(output_device: Optional[str], session_device: str) -> str:
    """Where IO binding should place outputs: the session's device unless told otherwise.

    CPU memory always works; CUDA memory only on a CUDA session.
    """
    if output_device in (None, "auto"):
        return session_device
    if output_device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown output device {output_device!r}; use 'cpu', 'cuda' or 'auto'")
    if output_device == "cuda" and session_device != "cuda":
        raise RuntimeBackendError("cannot bind outputs to CUDA memory: this session runs on the CPU")
    return output_device


def definite_load_failure(message: str) -> bool:
    """True when a dlopen error means the library can never load in this process.

    A missing dependency ("cannot open shared object file") is final; other errors,
    such as an undefined symbol that onnxruntime itself would provide, prove nothing.
    """
    return "cannot open shared object file" in message or "No such file or directory" in message


@functools.lru_cache(maxsize=None)
def _probe(path: str) -> Optional[str]:
    try:
        ctypes.CDLL(path)
    except OSError as exc:
        text = " ".join(str(exc).split())
        return text if definite_load_failure(text) else None
    return None


def cuda_load_error(ort_module) -> Optional[str]:
    """Why onnxruntime's CUDA provider library cannot load here, or None if unknown.

    Loading the provider library with ctypes reproduces onnxruntime's own dlopen and
    returns its error (e.g. ``libcublasLt.so.13: cannot open shared object file``),
    which onnxruntime only writes to its log. None means "no proof it fails".
    """
    here = getattr(ort_module, "__file__", None)
    if not here:
        return None
    name = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    path = os.path.join(os.path.dirname(here), "capi", name)
    if not os.path.exists(path):
        return None
    return _probe(path)


def missing_kernel_hint(message: str, bfloat16: bool = False) -> str:
    """A hint for onnxruntime's "Could not find an implementation for Op(v)" error, or "".

    onnxruntime's CPU provider has float16 kernels for everything tgraph emits but
    almost no bfloat16 ones (MatMul, Add, Mul, Sqrt, Softmax, ReduceMean ... are
    missing in 1.31), so a bfloat16 model (`bfloat16`: the model holds bfloat16
    tensors) is for CUDA; say so instead of a bare error.
    """
    import re

    m = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", message)
    if not m:
        return ""
    op, version, node = m.groups()
    where = f" (node '{node}')" if node else ""
    if bfloat16:
        return (f"onnxruntime's {CPU} has no bfloat16 kernel for {op}-{version}{where}; run bfloat16 models "
                f"with --provider cuda, or export with --dtype float16")
    return f"this onnxruntime build has no kernel for {op}-{version}{where} with these input types"
