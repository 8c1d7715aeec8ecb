"""Facts about this installation for `tgraph doctor`: versions, the onnxruntime wheel,
providers, what stops CUDA, and whether a GPU is visible at all.

The parsers (`missing_libraries`, `gpu_devices`) are pure, so they are tested with
recorded inputs; the probes around them only read files and run `ldd`/`nvidia-smi`
when present, each with a timeout, and never fail: a fact that cannot be found is None.
Nothing here imports onnxruntime (or tgraph.runtime, which does) before `collect` does, so
a broken onnxruntime install is reported, not raised.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

CUDA = "CUDAExecutionProvider"

_NOT_FOUND = re.compile(r"^\s*(\S+)\s*=>\s*not found\s*$", re.M)


def version_of(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def onnxruntime_wheels() -> List[Dict[str, str]]:
    """Every installed distribution that provides the `onnxruntime` package (onnxruntime,
    onnxruntime-gpu, ...). Two at once overwrite each other's files: a broken install."""
    out = []
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if not name.startswith(("onnxruntime", "ort")):      # reading every wheel's RECORD is slow
            continue
        files = dist.files or ()
        if any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in files):
            out.append({"name": dist.metadata["Name"], "version": dist.version})
    return sorted(out, key=lambda d: d["name"])


def missing_libraries(ldd_output: str) -> List[str]:
    """The shared libraries `ldd` reports as "not found", in its order."""
    return _NOT_FOUND.findall(ldd_output)


def cuda_provider_library(ort_module) -> Optional[str]:
    here = getattr(ort_module, "__file__", None)
    if not here:
        return None
    name = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    path = os.path.join(os.path.dirname(here), "capi", name)
    return path if os.path.exists(path) else None


def _run(argv: List[str], timeout: float = 10.0) -> Optional[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def cuda_blockers(ort_module, cuda_load_error) -> Dict[str, object]:
    """Why CUDA cannot run here: ``{"library", "missing", "load_error"}``. `missing` lists
    every library `ldd` cannot find for the CUDA provider (None without ldd); `load_error`
    is the dlopen error of the provider library itself (None: it loads, or no proof it fails)."""
    library = cuda_provider_library(ort_module)
    missing = None
    if library and shutil.which("ldd"):
        text = _run(["ldd", library])
        missing = missing_libraries(text) if text is not None else None
    return {"library": library, "missing": missing,
            "load_error": cuda_load_error(ort_module) if library else None}


def gpu_devices(dev_entries: List[str]) -> List[str]:
    """The NVIDIA device nodes among the names in /dev (nvidia0, nvidia1 ...)."""
    return sorted((n for n in dev_entries if re.fullmatch(r"nvidia\d+", n)), key=lambda n: int(n[6:]))


def gpu_facts() -> Dict[str, object]:
    """What the OS shows of NVIDIA GPUs: device nodes, the kernel driver, `nvidia-smi -L`."""
    try:
        devices = gpu_devices(os.listdir("/dev"))
    except OSError:
        devices = []
    driver = None
    try:
        with open("/proc/driver/nvidia/version") as f:
            driver = " ".join(f.readline().split())
    except OSError:
        pass
    smi = _run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else None
    return {"devices": [f"/dev/{d}" for d in devices], "driver": driver,
            "nvidia_smi": [line for line in (smi or "").splitlines() if line.strip()] or None}


def collect() -> Dict[str, object]:
    """Every fact `tgraph doctor` prints, as a JSON-able dict."""
    from . import __version__

    facts: Dict[str, object] = {
        "tgraph": __version__, "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "onnx": version_of("onnx"), "onnxruntime_wheels": onnxruntime_wheels(),
    }
    try:
        import onnxruntime as ort

        from .runtime.providers import cuda_load_error
    except Exception as e:       # a broken wheel raises anything on import
        facts.update(onnxruntime=None, onnxruntime_import_error=f"{type(e).__name__}: {e}", providers=[],
                     cuda=None)
    else:
        available = list(ort.get_available_providers())
        facts.update(onnxruntime=getattr(ort, "__version__", None), providers=available)
        facts["cuda"] = cuda_blockers(ort, cuda_load_error) if CUDA in available else None
    facts["gpu"] = gpu_facts()
    return facts
