"""Writing a generated module and its weights to disk, and importing it back.

`write_numpy_module` writes ``model.py`` and ``model.npz`` as one all-or-nothing pair
(`tgraph.atomic.write_files`, shared with the ONNX writer): a failure leaves the previous
pair as it was, neither a partial file nor a stray temporary behind.
The weights file is a plain ``.npz`` keyed by the exact value names; it is written
with `numpy.lib.format` directly (not `np.savez(**names)`, where a weight called
``file`` would collide with a keyword argument) and read back to check every name
round-trips through the zip format.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Union

import numpy as np

from tgraph.atomic import write_files
from tgraph.errors import ExportError
from tgraph.ir.core import Graph
from tgraph.ir.names import sanitize
from tgraph.ir.types import DType

from .generator import generate_source, plan_weights

_counter = itertools.count()


def write_npz(fileobj, arrays: Dict[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` (what `np.savez` writes) with arbitrary string keys."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            if "\x00" in name:
                raise ExportError(f"weight name {name!r} contains a NUL character, which .npz cannot store")
            array = np.asanyarray(array)
            if DType.of(array.dtype).is_ml_dtype:     # .npy has no bfloat16/float8/int4: their raw bits
                array = array.view(f"u{array.dtype.itemsize}")   # (the module views them back)
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)


def write_numpy_module(graph: Graph, path: Union[str, os.PathLike]) -> Path:
    """Write the module to `path` and its weights to `path.with_suffix(".npz")`; returns `path`."""
    path = Path(path)
    if path.suffix != ".py":
        raise ExportError(f"the NumPy module path must end in .py, got {str(path)!r}")
    weights_path = path.with_suffix(".npz")
    source = generate_source(graph, weights_path.name)   # fails before any file is touched
    weights = plan_weights(graph)
    if not path.parent.is_dir():
        raise ExportError(f"directory {str(path.parent)!r} does not exist")

    def write_module(f, weights_name: Optional[str]) -> None:
        text = source if weights_name == weights_path.name else generate_source(graph, weights_name)
        f.write(text.encode("utf-8"))

    def check(_module_tmp: Path, written: Optional[Path]) -> None:
        with np.load(written, allow_pickle=False) as back:
            if sorted(back.files) != sorted(weights):
                lost = sorted(set(weights) - set(back.files))
                raise ExportError(f"weight names do not survive the .npz format: {lost[:5]!r}")

    from tgraph.progress import phase

    with phase(f"write {path.name}"):
        return write_files(path, write_module, companion=weights_path,
                           write_companion=lambda f, _name: write_npz(f, weights), check=check)


def load_numpy_module(path: Union[str, os.PathLike]) -> ModuleType:
    """Import a generated module from its file under a fresh, unique module name."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no generated module at {str(path)!r}")
    name = f"tgraph_generated_{sanitize(path.stem)}_{os.getpid()}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
