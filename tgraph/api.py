"""Convenience functions behind the CLI: build, optimise, export, run.

Backends are imported lazily so `import tgraph` stays cheap and the IR never depends
on them; the passes are light and imported here for their default level.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .ir import Graph
from .passes.manager import DEFAULT_LEVEL  # one default level for the CLI, the API and `optimize`
from .sources import LoadedModel, load_model


@dataclass
class Built:
    graph: Graph
    model: LoadedModel
    report: Any = None          # tgraph.passes.PipelineResult, or None at -O0


def build(model: Union[str, LoadedModel], overrides: Optional[Mapping[str, str]] = None, *, seed: int = 0,
          level: int = DEFAULT_LEVEL, pipeline: Optional[str] = None, dtype: str = "float32") -> Built:
    """Trace a model and optimise it at `level` (or with an explicit pass `pipeline`).

    `dtype` "float16"/"bfloat16" appends the `to-fp16`/`to-bf16` pass (after the fusions,
    which match float32 formulas); see `tgraph.passes.precision`.
    """
    from .dsl import trace
    from .passes import level_pipeline, optimize, parse_pipeline
    from .passes.precision import precision_pipeline
    from .progress import phase

    convert = precision_pipeline(dtype)    # checks the dtype name before the (slow) trace
    loaded = model if isinstance(model, LoadedModel) else load_model(model, overrides)   # a "load" phase
    with phase("trace"):
        graph = trace(loaded.module, loaded.module.input_specs(), seed=seed)
    report = None
    if pipeline is not None or level > 0 or convert:
        passes = parse_pipeline(pipeline) if pipeline is not None else parse_pipeline(level_pipeline(level))
        report = optimize(graph, pipeline=passes + convert)     # a "passes" phase of its own
    return Built(graph, loaded, report)


def export_onnx(model, path: Union[str, Path], *, overrides=None, seed: int = 0, level: int = DEFAULT_LEVEL,
                opset: Optional[int] = None, external_data: Optional[bool] = None, dtype: str = "float32") -> Built:
    from .codegen.onnx import DEFAULT_OPSET, save_onnx

    built = build(model, overrides, seed=seed, level=level, dtype=dtype)
    save_onnx(built.graph, path, opset=opset or DEFAULT_OPSET, external_data=external_data)
    return built


def export_numpy(model, path: Union[str, Path], *, overrides=None, seed: int = 0,
                 level: int = DEFAULT_LEVEL, dtype: str = "float32") -> Built:
    from .codegen.numpy import write_numpy_module

    built = build(model, overrides, seed=seed, level=level, dtype=dtype)
    write_numpy_module(built.graph, path)
    return built
