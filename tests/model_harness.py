"""Shared checks for model tests: run a tgraph model on every backend and compare.

Three oracles per model: onnxruntime on the exported ONNX (with ORT's own graph
optimizations disabled, so it cannot hide a bug of ours), the generated NumPy module,
and an outside reference the test supplies (Hugging Face `transformers`, or a NumPy
transcription of the paper).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import numpy as np

HIGHEST_LEVEL = 3


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|), the zoo's acceptance metric."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref))))) if ref.size else 0.0


def run_onnx(graph, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    import onnxruntime as ort

    from tgraph.codegen.onnx import to_onnx

    model = to_onnx(graph)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feed = {i.name: inputs[i.name] for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feed)))


def run_numpy(graph, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    from tgraph.codegen.numpy import load_numpy_module, write_numpy_module

    with tempfile.TemporaryDirectory(prefix="tgraph-test-") as tmp:
        module = load_numpy_module(write_numpy_module(graph, Path(tmp) / "model.py"))
        return module.run(dict(inputs))


def build(source, level: int, seed: int = 0):
    from tgraph.api import build as api_build

    return api_build(source, seed=seed, level=level).graph


def check_all_backends(source, inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                       tol: float = 1e-4, levels: Iterable[int] = (0, HIGHEST_LEVEL),
                       numpy_level: Optional[int] = HIGHEST_LEVEL) -> Dict[str, float]:
    """Assert every backend matches `reference` within `tol` (relative); returns the errors.

    `source` is anything `tgraph.api.build` takes (a LoadedModel, a registered name ...).
    """
    errors: Dict[str, float] = {}
    for level in levels:
        outs = run_onnx(build(source, level), inputs)
        for name, ref in reference.items():
            errors[f"onnx-O{level}:{name}"] = rel_err(outs[name], ref)
    if numpy_level is not None:
        outs = run_numpy(build(source, numpy_level), inputs)
        for name, ref in reference.items():
            errors[f"numpy-O{numpy_level}:{name}"] = rel_err(outs[name], ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors
