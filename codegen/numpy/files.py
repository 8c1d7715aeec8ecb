"""Writing a generated module and its weights to disk, and importing it back.

`write_numpy_module` writes ``model.py`` and ``model.npz`` atomically: both go to
temporary files in the destination directory first and are moved into place with
`os.replace`, so a failure leaves neither a partial file nor a stray temporary behind.
The weights file is a plain ``.npz`` keyed by the exact value names; it is written
with `numpy.lib.format` directly (not `np.savez(**names)`, where a weight called
``file`` would collide with a keyword argument) and read back to check every name
round-trips through the zip format.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Dict, Union

import numpy as np

from tgraph.errors import ExportError
from tgraph.ir.core import Graph
from tgraph.ir.names import sanitize

from .generator import generate_source, plan_weights

_counter = itertools.count()


def write_npz(fileobj, arrays: Dict[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` (what `np.savez` writes) with arbitrary string keys."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            if "\x00" in name:
                raise ExportError(f"weight name {name!r} contains a NUL character, which .npz cannot store")
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _temp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


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
    temps = []
    placed = None
    try:
        tmp_weights = _temp_beside(weights_path)
        temps.append(tmp_weights)
        with open(tmp_weights, "wb") as f:
            write_npz(f, weights)
        with np.load(tmp_weights, allow_pickle=False) as check:
            if sorted(check.files) != sorted(weights):
                lost = sorted(set(weights) - set(check.files))
                raise ExportError(f"weight names do not survive the .npz format: {lost[:5]!r}")
        tmp_module = _temp_beside(path)
        temps.append(tmp_module)
        with open(tmp_module, "w", encoding="utf-8", newline="\n") as f:
            f.write(source)
        os.replace(tmp_weights, weights_path)
        placed = weights_path
        os.replace(tmp_module, path)
        placed = None
    except BaseException:
        for t in temps:
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        if placed is not None:
            try:
                placed.unlink()
            except FileNotFoundError:
                pass
        raise
    return path


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
