"""The static KV cache: one in-place buffer per layer, per-row valid lengths, no mask tensor.

Oracles: the same model without a cache (full-sequence logits, a graph with no static-cache
code in it), onnxruntime vs the NumPy reference interpreter, and Hugging Face greedy ids
(tests/test_generate.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tgraph.api import build
from tgraph.codegen.onnx import to_onnx
from tgraph.errors import ConfigError
from tgraph.export_dir import generation_pipeline
from tgraph.ir.evaluate import evaluate
from tgraph.runtime import Session
from tgraph.runtime.static_cache import StaticDecoder, static_signature
from tgraph.sources import load_model

SMALL = {
    "llama": {"d_model": "64", "num_layers": "2", "num_heads": "4", "num_kv_heads": "2", "d_ff": "96",
              "vocab_size": "101"},
    "gpt2": {"n_embd": "64", "n_layer": "2", "n_head": "4", "vocab_size": "101", "n_positions": "64"},
    "palm": {"d_model": "64", "num_layers": "2", "num_heads": "4", "d_ff": "96", "vocab_size": "101"},
    "gpt": {"n_embd": "64", "n_layer": "2", "n_head": "4", "vocab_size": "101", "n_positions": "64"},
}
MAX_LEN = 24


def graph(family, level, **extra):
    """level "generation": the generation builds' pipeline (-O3 + `GENERATION_PASSES`)."""
    sets = {**SMALL[family], **{k: str(v) for k, v in extra.items()}}
    pipeline = generation_pipeline(3) if level == "generation" else None
    return build(load_model(family, sets), seed=3, level=3 if pipeline else level, pipeline=pipeline).graph


def reference_logits(family, ids, **extra):
    """Full-sequence logits of the cache-free model: [B, T, V]."""
    g = graph(family, 0, **extra)
    feeds = {"input_ids": ids}
    if any(v.name == "attention_mask" for v in g.inputs):
        feeds["attention_mask"] = np.ones_like(ids)
    return evaluate(g, feeds)["logits"]


def rows_and_steps(rng, lengths, new):
    """Right-padded prompts and the ids that follow them (the test feeds fixed continuations)."""
    full = [rng.integers(0, 101, n + new) for n in lengths]
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    for b, (row, n) in enumerate(zip(full, lengths)):
        ids[b, :n] = row[:n]
    return full, ids


@pytest.mark.parametrize("family,level,extra", [
    ("llama", 0, {}), ("llama", 3, {}), ("llama", "generation", {}), ("gpt2", "generation", {}),
    ("gpt2", 2, {}), ("palm", 3, {}), ("palm", "generation", {}), ("gpt", 2, {}),
    ("palm", 2, {"rotary_pct": 0.5}),      # R/2 = 4: onnxruntime cannot rotate in the op, the graph does
])
def test_static_cache_logits_equal_uncached_logits(family, level, extra):
    g = graph(family, level, use_cache="true", kv_cache="static", cache_length=MAX_LEN, **extra)
    sess = Session(to_onnx(g), providers="cpu")
    assert static_signature(sess.inputs, sess.outputs) is None
    rng = np.random.default_rng(0)
    lengths, new = [5, 2, 7], 4
    full, ids = rows_and_steps(rng, lengths, new)
    dec = StaticDecoder(sess, batch=3, max_length=MAX_LEN)
    got = [dec.prefill(ids, lengths)]
    for t in range(new - 1):
        got.append(dec.step(np.array([row[n + t] for row, n in zip(full, lengths)])))
    for b, (row, n) in enumerate(zip(full, lengths)):
        want = reference_logits(family, np.array([row[:n + new - 1]]), **extra)[0]     # [T, V]
        for t in range(new):
            np.testing.assert_allclose(got[t][b], want[n - 1 + t], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{family} row {b} step {t}")


def test_static_cache_numpy_reference_runs_the_graph_too():
    """The IR interpreter (the NumPy backend's kernels) on prefill + one decode step equals
    onnxruntime; past and present keep one shape."""
    g = graph("llama", 2, use_cache="true", kv_cache="static", cache_length=MAX_LEN)
    ids = np.array([[3, 4, 5, 0], [6, 7, 8, 9]], np.int64)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int64)
    past = {v.name: np.zeros((2, 2, MAX_LEN, 16), np.float32) for v in g.inputs if v.name.startswith("past")}
    ref = evaluate(g, {"input_ids": ids, "attention_mask": mask, **past})
    sess = Session(to_onnx(g), providers="cpu")
    ort_out = sess.run({"input_ids": ids, "attention_mask": mask, **past})
    np.testing.assert_allclose(ref["logits"], ort_out["logits"], rtol=1e-4, atol=1e-4)
    assert ref["present.0.key"].shape == (2, 2, MAX_LEN, 16)
    # decode: mask of the full buffer width, one token per row
    past = {k.replace("present", "past_key_values"): v for k, v in ref.items() if k.startswith("present")}
    step_mask = np.zeros((2, MAX_LEN), np.int64)
    step_mask[0, :4], step_mask[1, :5] = 1, 1
    step = {"input_ids": np.array([[10], [11]], np.int64), "attention_mask": step_mask, **past}
    ref2, ort2 = evaluate(g, step), sess.run(step)
    np.testing.assert_allclose(ref2["logits"], ort2["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref2["present.1.value"], ort2["present.1.value"], rtol=1e-5, atol=1e-5)


def test_static_graph_has_no_mask_tensor_and_one_attention_op_per_layer():
    g = graph("llama", 3, use_cache="true", kv_cache="static", cache_length=MAX_LEN)
    ops = [n.qualified_op for n in g.nodes]
    assert ops.count("com.microsoft.GroupQueryAttention") == 2
    assert "Attention" not in ops and "Concat" not in [n.op for n in g.nodes if "past" in str(n.inputs)]
    # the mask is only reduced to lengths and its width: no node broadcasts it to 4-D
    users = [n.op for n in g.nodes if any(v is not None and v.name == "attention_mask" for v in n.inputs)]
    assert set(users) <= {"ReduceSum", "Shape"}, users


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_graph_feeds_the_packed_projection_to_attention(family):
    """fuse-packed-gqa: each GroupQueryAttention reads the packed QKV MatMul (Add for gpt2's
    biases) whole, key and value left out; no Split is left between them. fuse-skip-layer-norm
    joins the residual Adds to the norms."""
    g = graph(family, "generation", use_cache="true", kv_cache="static", cache_length=MAX_LEN)
    attn = [n for n in g.nodes if n.qualified_op == "com.microsoft.GroupQueryAttention"]
    assert len(attn) == 2
    for n in attn:
        assert n.inputs[1] is None and n.inputs[2] is None
        assert n.inputs[0].producer.op in ("MatMul", "Add"), n.inputs[0].producer
    skip = {"llama": "SkipSimplifiedLayerNormalization", "gpt2": "SkipLayerNormalization"}[family]
    # float32 on the CPU: every residual Add + norm (not the first norm, of the embedding; llama's final
    # norm reads the gathered last tokens, not an Add)
    assert sum(n.op == skip for n in g.nodes) == {"llama": 3, "gpt2": 4}[family]
    plain = graph(family, 3, use_cache="true", kv_cache="static", cache_length=MAX_LEN)
    assert sum(n.op == "Split" for n in plain.nodes) - sum(n.op == "Split" for n in g.nodes) == 2


def test_static_cache_options_are_checked():
    with pytest.raises(ConfigError, match="kv_cache must be one of"):
        load_model("llama", {**SMALL["llama"], "use_cache": "true", "kv_cache": "paged"})
    with pytest.raises(ConfigError, match="use_position_ids"):
        load_model("llama", {**SMALL["llama"], "use_cache": "true", "kv_cache": "static", "use_position_ids": "true"})


def test_generated_numpy_module_runs_the_static_graph(tmp_path):
    from tgraph.codegen.numpy import load_numpy_module, write_numpy_module

    g = graph("gpt2", 2, use_cache="true", kv_cache="static", cache_length=MAX_LEN)
    ids = np.array([[3, 4, 5, 0], [6, 7, 8, 9]], np.int64)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int64)
    past = {v.name: np.zeros((2, 4, MAX_LEN, 16), np.float32) for v in g.inputs if v.name.startswith("past")}
    module = load_numpy_module(write_numpy_module(g, tmp_path / "gpt2_static.py"))
    got = module.run({"input_ids": ids, "attention_mask": mask, **past})
    want = Session(to_onnx(g), providers="cpu").run({"input_ids": ids, "attention_mask": mask, **past})
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    assert got["present.1.key"].shape == past["past_key_values.1.key"].shape


def test_auto_cache_falls_back_to_dynamic_where_the_static_kernel_cannot_run():
    """Head size 4 is not a multiple of 8 (GroupQueryAttention's kernels): "auto" says why and
    generates with the Concat cache; asking for the static cache explicitly is a one-line error."""
    from tgraph.errors import ShapeError
    from tgraph.generate import Generator

    small = {"n_embd": "16", "n_head": "4", "n_layer": "1", "n_positions": "32", "vocab_size": "40"}
    auto = Generator("gpt2", overrides=small, provider="cpu")
    assert not auto.static and "GroupQueryAttention" in auto.cache_note
    dynamic = Generator("gpt2", overrides=small, provider="cpu", kv_cache="dynamic")
    prompts = [[1, 2, 3]]
    assert auto.generate(prompts, max_new_tokens=4).ids == dynamic.generate(prompts, max_new_tokens=4).ids
    with pytest.raises(ShapeError, match="head size 4 must be a multiple of 8"):
        Generator("gpt2", overrides=small, provider="cpu", kv_cache="static")
    wide = Generator("gpt2", overrides={**small, "n_head": "2"}, provider="cpu")     # head size 8
    assert wide.static and wide.cache_note is None
