"""Graph passes: the registry, the level table, the pass manager and the passes.

``optimize(graph, level=2)`` or ``optimize(graph, pipeline="dce,cse")`` mutates a graph in
place, verifying it after every pass. Importing a pass module registers its passes by
name; the order of -O levels is `levels.LEVEL_TABLE`, not the import order below.
"""
from .base import PASSES, Pass, describe_passes, format_pipeline, get_pass, parse_pipeline, register_pass
from .levels import LEVEL_TABLE, LEVELS, MAX_LEVEL, level_pipeline, levels_of
from .manager import DEFAULT_LEVEL, PassError, PassManager, PassRecord, PipelineResult, optimize, print_ir_after_all
from . import canonicalize, cse, dce, eliminate_identity, fold_constants  # noqa: E402,F401  (register the passes)
from . import fuse_attention, fuse_elementwise, fuse_rotary, ort_fusions  # noqa: E402,F401
# Passes in no level: precision conversion (to-fp16, to-bf16; api.build(dtype=...)) and weight-only
# quantization (quantize-weights; --quantize).
from . import precision, quantize  # noqa: E402,F401

__all__ = ["DEFAULT_LEVEL", "LEVELS", "LEVEL_TABLE", "MAX_LEVEL", "PASSES", "Pass", "PassError", "PassManager",
           "PassRecord", "PipelineResult", "describe_passes", "format_pipeline", "get_pass", "level_pipeline",
           "levels_of", "optimize", "parse_pipeline", "print_ir_after_all", "register_pass"]
