"""A graph from onnxruntime's transformer optimizer can be imported, run in NumPy and re-optimized.

onnxruntime's optimizer (`onnxruntime.transformers.optimizer`, run here on a small tgraph
BERT) rewrites GELUs into the contrib op BiasGelu; tgraph must read that graph, compute what
onnxruntime computes on it (the generated NumPy module), and export it again after its own
passes.
"""
from __future__ import annotations

import numpy as np
import onnx

from model_harness import rel_err
from test_ops import ort_run
from tgraph.api import build
from tgraph.codegen.numpy import generate_source, plan_weights
from tgraph.codegen.onnx import to_onnx
from tgraph.onnx_import import import_onnx
from tgraph.passes import optimize

SMALL_BERT = {"hidden_size": "32", "num_heads": "2", "num_layers": "2", "intermediate_size": "48", "vocab_size": "50",
              "max_position_embeddings": "16"}


def _ort_optimized(tmp_path, attention: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    path = tmp_path / "bert.onnx"
    onnx.save(to_onnx(build("bert", SMALL_BERT, level=2).graph), str(path))
    options = FusionOptions("bert")
    options.enable_attention = attention
    return optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                          optimization_options=options).model


def _run_numpy(graph, feeds):
    namespace = {"__name__": "ort_optimized", "__file__": "<ort optimized>"}
    exec(compile(generate_source(graph, "w.npz"), "<ort optimized>", "exec"), namespace)
    namespace["P"] = plan_weights(graph)
    return namespace["run"](feeds)


def test_ort_optimizer_output_imports_runs_in_numpy_and_reoptimizes(tmp_path):
    model = _ort_optimized(tmp_path, attention=False)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("com.microsoft", "BiasGelu") in ops
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 50, (2, 7)), "attention_mask": np.ones((2, 7), np.int64),
             "token_type_ids": rng.integers(0, 2, (2, 7))}
    feeds["attention_mask"][1, 5:] = 0
    names = [o.name for o in model.graph.output]
    want = dict(zip(names, ort_run(model, feeds)))
    graph = import_onnx(model)
    assert graph.op_histogram().get("com.microsoft.BiasGelu", 0) > 0
    got = _run_numpy(graph, feeds)
    for name in names:
        assert rel_err(got[name], want[name]) < 1e-5, name
    optimize(graph, level=3)
    again = dict(zip(names, ort_run(to_onnx(graph), feeds)))
    for name in names:
        assert rel_err(again[name], want[name]) < 1e-5, name
