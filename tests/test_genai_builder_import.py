"""A graph from onnxruntime-genai's model builder imports, runs in NumPy and re-optimizes.

The builder (shipped inside onnxruntime-genai, run here by this venv's Python, which has the
torch and transformers it needs; only its source directory is borrowed, not the CPU
onnxruntime beside it) turns a tiny random LLaMA into an int4 decoder with packed-QKV
GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization and onnxruntime's
SimplifiedLayerNormalization. tgraph imports it, its NumPy module computes what onnxruntime
computes, and after tgraph's -O3 passes the re-export still does.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from model_harness import rel_err
from test_ops import ort_run
from tgraph.codegen.numpy import generate_source, plan_weights
from tgraph.codegen.onnx import to_onnx
from tgraph.onnx_import import import_onnx
from tgraph.passes import optimize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _builder_dir() -> str:
    python = os.environ.get("TGRAPH_GENAI_PYTHON")
    if not python:
        pytest.skip("set TGRAPH_GENAI_PYTHON to a Python that has onnxruntime-genai (.ci/run does)")
    done = subprocess.run([python, "-c", "import os, onnxruntime_genai.models as m; print(os.path.dirname(m.__file__))"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _tiny_llama(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(path)


def test_genai_builder_int4_llama_imports_runs_in_numpy_and_reoptimizes(tmp_path):
    builder = _builder_dir()
    _tiny_llama(tmp_path / "hf")
    done = subprocess.run([sys.executable, "builder.py", "-m", "llama", "-i", str(tmp_path / "hf"), "-o",
                           str(tmp_path / "out"), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")],
                          cwd=builder, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": builder})
    assert done.returncode == 0, done.stderr[-3000:]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "MatMulNBits"),
            ("com.microsoft", "SkipSimplifiedLayerNormalization"), ("", "SimplifiedLayerNormalization")} <= ops
    # the builder asks onnxruntime for int8 activations (accuracy_level 4): the reference, like
    # tgraph's kernel, dequantizes and multiplies in float32 (accuracy_level 0)
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 128, (2, 5)), "attention_mask": np.ones((2, 5), np.int64)}
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values"):
            feeds[vi.name] = np.zeros((2, 2, 0, 16), np.float32)
    names = [o.name for o in model.graph.output]
    want = dict(zip(names, ort_run(model, feeds)))

    graph = import_onnx(model)
    namespace = {"__name__": "genai_llama", "__file__": "<genai llama>"}
    exec(compile(generate_source(graph, "w.npz"), "<genai llama>", "exec"), namespace)
    namespace["P"] = plan_weights(graph)
    got = namespace["run"](feeds)
    for name in names:
        assert rel_err(got[name], want[name]) < 1e-5, name
    optimize(graph, level=3)
    again = dict(zip(names, ort_run(to_onnx(graph), feeds)))
    for name in names:
        assert rel_err(again[name], want[name]) < 1e-5, name
