"""Graph passes: the registry, the pass manager and the cleanup passes.

``optimize(graph, level=2)`` or ``optimize(graph, pipeline="dce,cse")`` mutates a graph in
place, verifying it after every pass. The import order below is the order of the -O1
cleanup pipeline: forward no-op nodes, fold what is known, merge duplicates, then
sweep what became dead.
"""
from .base import (LEVEL_PASSES, LEVELS, PASSES, Pass, describe_passes, format_pipeline, get_pass,
                   level_pipeline, parse_pipeline, register_pass)
from .manager import DEFAULT_LEVEL, PassError, PassManager, PassRecord, PipelineResult, optimize
from . import eliminate_identity, fold_constants, cse, dce  # noqa: E402,F401  (registers the passes)
# Fusions (-O2), in pipeline order: elementwise formulas first, then rotary positions, then attention, whose
# leftover causal masks `causal-mask` makes explicit.
from . import fuse_elementwise, fuse_rotary, fuse_attention  # noqa: E402,F401
# onnxruntime-specific fusions (-O3, com.microsoft ops), after the portable ones.
from . import ort_fusions  # noqa: E402,F401
# Precision conversion (to-fp16, to-bf16): in no -O level; run it by name or via api.build(dtype=...).
from . import precision  # noqa: E402,F401
# Weight-only quantization (quantize-weights, MatMulNBits): in no -O level; run by name or via --quantize.
from . import quantize  # noqa: E402,F401

__all__ = ["DEFAULT_LEVEL", "LEVELS", "LEVEL_PASSES", "PASSES", "Pass", "PassError", "PassManager", "PassRecord",
           "PipelineResult", "describe_passes", "format_pipeline", "get_pass", "level_pipeline", "optimize", "parse_pipeline",
           "register_pass"]
