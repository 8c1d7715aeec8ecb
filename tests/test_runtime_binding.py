"""The fixed-buffer runtime of static-cache decoders (`tgraph.runtime.static_cache`): every
buffer bound once, same addresses and shapes every decode step, and the CUDA-graph decision
as a pure function (no GPU here: the CUDA branch is the same code with another device)."""
from __future__ import annotations

import numpy as np
import pytest

from tgraph.api import build
from tgraph.codegen.onnx import to_onnx
from tgraph.errors import ConfigError
from tgraph.runtime import Session, TensorSpec
from tgraph.runtime.static_cache import (StaticDecoder, buffer_shapes, capacity_error, cuda_graph_plan,
                                         static_signature)
from tgraph.sources import load_model

LLAMA = {"d_model": "64", "num_layers": "2", "num_heads": "4", "num_kv_heads": "2", "d_ff": "96", "vocab_size": "101",
         "use_cache": "true"}


def session(**sets):
    return Session(to_onnx(build(load_model("llama", {**LLAMA, **sets}), seed=1, level=3).graph), providers="cpu")


@pytest.fixture(scope="module")
def static_session():
    return session(kv_cache="static", cache_length="32")


def test_decode_steps_reuse_the_same_buffers_and_shapes(static_session):
    dec = StaticDecoder(static_session, batch=2, max_length=32)
    before_ptrs, before_shapes = dec.data_pointers(), dec.bound_shapes()
    logits = dec.prefill(np.array([[1, 2, 3], [4, 5, 0]]), [3, 2])
    assert logits.shape == (2, 101) and logits.dtype == np.float32
    seen = []
    for _ in range(5):
        logits = dec.step(np.argmax(logits, axis=-1))
        assert dec.data_pointers() == before_ptrs          # nothing reallocated
        assert dec.bound_shapes() == before_shapes         # no shape change between steps
        seen.append(logits)
    assert dec.lengths.tolist() == [8, 7]
    assert dec.mask_host.sum(axis=1).tolist() == [8, 7]
    assert not np.allclose(seen[0], seen[-1])            # the steps did run on new tokens
    # past and present are one buffer per layer
    for past, present in dec.pairs:
        assert dec.shapes[past] == (2, 2, 32, 16)


def test_prefill_again_restarts_the_rows(static_session):
    dec = StaticDecoder(static_session, batch=1, max_length=32)
    first = dec.prefill(np.array([[7, 8, 9]]), [3])
    dec.step(np.array([1]))
    again = dec.prefill(np.array([[7, 8, 9]]), [3])
    np.testing.assert_allclose(first, again, rtol=1e-6, atol=1e-6)


def test_static_signature_accepts_only_the_static_interface(static_session):
    assert static_signature(static_session.inputs, static_session.outputs) is None
    dynamic = session()
    why = static_signature(dynamic.inputs, dynamic.outputs)
    assert why is not None and "attention_mask" in why
    with pytest.raises(ConfigError, match="not a static-cache decoder"):
        StaticDecoder(dynamic, batch=1, max_length=8)


def test_buffer_shapes_are_fixed_by_batch_and_max_length(static_session):
    shapes = buffer_shapes(static_session.inputs, static_session.outputs, 3, 64)
    assert shapes["input_ids"] == (3, 1) and shapes["attention_mask"] == (3, 64)
    assert shapes["logits"] == (3, 1, 101)
    assert shapes["past_key_values.1.value"] == (3, 2, 64, 16)


def test_cuda_graph_plan():
    ok = cuda_graph_plan("cuda", None, {"a": "CUDAExecutionProvider", "b": "CUDAExecutionProvider"})
    assert ok.enable
    assert not cuda_graph_plan("cpu", None).enable
    assert "static-cache" in cuda_graph_plan("cuda", "past_key_values.0.key is dynamic").reason
    off = cuda_graph_plan("cuda", None, {"a": "CUDAExecutionProvider", "gather": "CPUExecutionProvider"})
    assert not off.enable and "gather" in off.reason
    assert not cuda_graph_plan("cuda", None, None, logits_on_device=False).enable


def test_capacity_error_names_the_sizes():
    assert capacity_error([3, 5], 4, 8) is None
    why = capacity_error([3, 5], 5, 8)
    assert "9" in why and "8" in why and "--max-length" in why


def test_signature_refuses_a_present_of_another_shape():
    past = TensorSpec("past_key_values.0.key", np.dtype(np.float32), ("batch", 2, "max_length", 16))
    present = TensorSpec("present.0.key", np.dtype(np.float32), ("batch", 2, "past_seq + seq", 16))
    value = TensorSpec("past_key_values.0.value", np.dtype(np.float32), ("batch", 2, "max_length", 16))
    present_v = TensorSpec("present.0.value", np.dtype(np.float32), ("batch", 2, "max_length", 16))
    ids = TensorSpec("input_ids", np.dtype(np.int64), ("batch", "seq"))
    mask = TensorSpec("attention_mask", np.dtype(np.int64), ("batch", "total_sequence_length"))
    logits = TensorSpec("logits", np.dtype(np.float32), ("batch", 1, 101))
    why = static_signature([ids, mask, past, value], [logits, present, present_v])
    assert "present.0.key" in why


def test_placement_is_read_and_cpu_sessions_never_use_cuda_graphs(static_session):
    from tgraph.runtime.static_cache import RECORD_PLACEMENT, graph_run_config, node_providers

    graph = build(load_model("llama", {**LLAMA, "kv_cache": "static", "cache_length": "32"}), seed=1, level=3).graph
    recorded = Session(to_onnx(graph), providers="cpu", session_config=RECORD_PLACEMENT)
    placement = node_providers(recorded.ort_session)
    assert placement and set(placement.values()) == {"CPUExecutionProvider"}
    plan = cuda_graph_plan(recorded.device, static_signature(recorded.inputs, recorded.outputs), placement)
    assert not plan.enable and "cpu" in plan.reason
    # the same placement on CUDA would qualify
    assert cuda_graph_plan("cuda", None, {n: "CUDAExecutionProvider" for n in placement}).enable
    assert graph_run_config(3) == {"gpu_graph_id": "3"} and graph_run_config(None) == {"gpu_graph_id": "-1"}


def test_half_precision_static_decoder_returns_float32_logits():
    from tgraph.generate import Generator

    small = {k: v for k, v in LLAMA.items() if k != "use_cache"}
    half = Generator("llama", overrides=small, provider="cpu", dtype="float16", max_length=32)
    full = Generator("llama", overrides=small, provider="cpu", max_length=32)
    assert half.decoder.outputs[0].dtype == np.float32 and half.decoder.inputs[2].dtype == np.float16
    a = half.static_decoder(1, 8).prefill(np.array([[3, 4, 5]]), [3])
    b = full.static_decoder(1, 8).prefill(np.array([[3, 4, 5]]), [3])
    assert a.dtype == np.float32 and np.max(np.abs(a - b)) < 2e-2


def test_cuda_graph_option_reaches_the_cuda_provider_entry():
    from tgraph.runtime.providers import requested_providers
    from tgraph.runtime.static_cache import CudaGraphPlan, cuda_graph_options

    opts = cuda_graph_options(CudaGraphPlan(True, "ok"))
    got = requested_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], cuda_options=opts)
    assert got[0] == ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})
    assert cuda_graph_options(CudaGraphPlan(False, "cpu")) == {}
