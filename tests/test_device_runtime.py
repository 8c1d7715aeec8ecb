"""The device-resident KV cache and the provider report, tested on the CPU.

The CUDA path is the same code with device "cuda": the decisions (`cache_pairs`,
`empty_past_shape`, `cache_element_type`, `describe_providers`, `binding_device`) are
pure functions tested here; the loop runs on the CPU provider with a spy that fails
the test if a cache tensor is ever copied to NumPy between steps.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tgraph.errors import ConfigError, InputError, RuntimeBackendError
from tgraph.runtime import (DeviceKVCache, Session, TensorSpec, binding_device, cache_pairs, describe_providers,
                            empty_past_shape, host_array)
from tgraph.runtime.device_cache import cache_element_type

H, D = 2, 4


def decoder_like(dtype=TensorProto.FLOAT, layers=1):
    """y = 2 * sum(past ++ x over positions); present = Concat(past, x) along the past axis."""
    x = helper.make_tensor_value_info("x", dtype, ["batch", H, "seq", D])
    nodes, inputs, outputs = [], [x], [helper.make_tensor_value_info("y", dtype, ["batch", H, 1, D])]
    total = "x"
    for i in range(layers):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(past, dtype, ["batch", H, "past_seq", D]))
            outputs.append(helper.make_tensor_value_info(present, dtype, ["batch", H, "past_seq + seq", D]))
            nodes.append(helper.make_node("Concat", [past, "x"], [present], axis=2))
        total = f"present.{i}.key"
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    nodes += [helper.make_node("ReduceSum", [total, "axes"], ["s"], keepdims=1),
              helper.make_node("Add", ["s", "s"], ["y"])]
    graph = helper.make_graph(nodes, "decoder_like", inputs, outputs, [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- pure decisions
def test_cache_pairs_follow_the_export_naming():
    ins = ["input_ids", "past_key_values.1.value", "past_key_values.0.key", "past_key_values.1.key",
           "past_key_values.0.value", "past_key_values.10.key"]
    outs = ["logits"] + [f"present.{i}.{k}" for i in (0, 1, 10) for k in ("key", "value")]
    assert cache_pairs(ins, outs) == [("past_key_values.0.key", "present.0.key"),
                                      ("past_key_values.0.value", "present.0.value"),
                                      ("past_key_values.1.key", "present.1.key"),
                                      ("past_key_values.1.value", "present.1.value"),
                                      ("past_key_values.10.key", "present.10.key")]
    with pytest.raises(ConfigError, match="present.0.value"):
        cache_pairs(["past_key_values.0.value"], ["logits"])
    with pytest.raises(ConfigError, match="use_cache"):
        cache_pairs(["input_ids"], ["logits"])


def test_empty_past_shape_and_element_type():
    spec = TensorSpec("past_key_values.0.key", np.dtype(np.float16), ("batch", 2, "past_seq", 16))
    assert empty_past_shape(spec, batch=3) == (3, 2, 0, 16)
    spec = TensorSpec("p", np.dtype(np.float32), ("batch", "heads", "past_seq", 8))
    assert empty_past_shape(spec, 1, {"heads": 4}) == (1, 4, 0, 8)
    with pytest.raises(ConfigError, match="heads"):
        empty_past_shape(spec, 1)
    assert cache_element_type(TensorSpec("p", np.dtype(np.float16), None)) == TensorProto.FLOAT16
    import ml_dtypes
    assert cache_element_type(TensorSpec("p", np.dtype(ml_dtypes.bfloat16), None)) == TensorProto.BFLOAT16
    with pytest.raises(ConfigError, match="int64"):
        cache_element_type(TensorSpec("p", np.dtype(np.int64), None))


def test_describe_providers():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert describe_providers([cuda, cpu], 1, available=[cuda, cpu]) == "CUDAExecutionProvider (device 1)"
    assert describe_providers([cpu], request="cpu", available=[cuda, cpu]) == "CPUExecutionProvider: CPU requested"
    assert describe_providers([cpu], available=[cpu]) == (
        "CPUExecutionProvider: CUDA not available: CUDAExecutionProvider is not in onnxruntime's available "
        "providers (install onnxruntime-gpu)")
    text = describe_providers([cpu], available=[cuda, cpu], cuda_error="libcublasLt.so.13: cannot open shared object")
    assert text == ("CPUExecutionProvider: CUDA not available: CUDAExecutionProvider failed to load: "
                    "libcublasLt.so.13: cannot open shared object")
    assert "fell back" in describe_providers([cpu], available=[cuda, cpu])


def test_cache_device_is_the_sessions():
    assert binding_device(None, "cuda") == "cuda" and binding_device(None, "cpu") == "cpu"
    with pytest.raises(RuntimeBackendError):
        binding_device("cuda", "cpu")


def test_session_describe_says_what_is_in_use():
    session = Session(decoder_like(), providers="auto")
    text = session.describe()
    if session.device == "cuda":      # a machine with a working GPU
        assert text.startswith("CUDAExecutionProvider (device ")
    else:
        assert text.startswith("CPUExecutionProvider: CUDA not available: ")
    assert Session(decoder_like(), providers="cpu").describe() == "CPUExecutionProvider: CPU requested"


# ---------------------------------------------------------------- the loop, with a spy
@pytest.fixture
def numpy_spy(monkeypatch):
    """Records the shape and dtype of every OrtValue copied to NumPy."""
    copies = []
    real = ort.OrtValue.numpy

    def spy(self):
        copies.append((tuple(self.shape()), self.data_type()))
        return real(self)

    monkeypatch.setattr(ort.OrtValue, "numpy", spy)
    return copies


@pytest.mark.parametrize("dtype,np_dtype", [(TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)])
def test_cache_stays_on_the_device_between_steps(numpy_spy, dtype, np_dtype):
    session = Session(decoder_like(dtype, layers=2), providers="cpu")
    cache = DeviceKVCache(session, batch=2)
    assert cache.length == 0 and cache.device == "cpu"
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((2, H, t, D)).astype(np_dtype) for t in (3, 1, 1, 1)]
    seen = []
    for i, x in enumerate(steps):
        before = {name: v.data_ptr() for name, v in cache.feeds().items()}
        out = cache.step({"x": x})
        # the next past IS this step's present: same device buffer, nothing copied
        assert set(out) == {"y"}
        seen.append(x)
        total = np.concatenate(seen, axis=2)
        np.testing.assert_allclose(out["y"], 2 * total.sum(axis=2, keepdims=True, dtype=np.float32),
                                   rtol=2e-3, atol=2e-3)
        assert cache.length == total.shape[2]
        if i:
            assert all(cache.values[n].data_ptr() != before[n] for n in before)   # a new buffer per step
    # only y (batch, H, 1, D) was ever copied to the host: never a cache tensor
    assert numpy_spy and all(shape == (2, H, 1, D) for shape, _ in numpy_spy)
    np.testing.assert_array_equal(host_array(cache.values["past_key_values.1.value"]), np.concatenate(seen, axis=2))


def test_present_buffers_are_bound_as_the_next_past(monkeypatch):
    """Spy on IO binding: each step binds, as past, the very OrtValue the last step returned."""
    session = Session(decoder_like(), providers="cpu")
    bound, returned = [], []
    real_run = session.run_with_binding

    def spy(inputs, outputs=None, output_device=None):
        bound.append({n: v for n, v in inputs.items() if n.startswith("past_")})
        result = real_run(inputs, outputs, output_device)
        returned.append({n: v for n, v in result.items() if n.startswith("present.")})
        return result

    monkeypatch.setattr(session, "run_with_binding", spy)
    cache = DeviceKVCache(session)
    for _ in range(3):
        cache.step({"x": np.ones((1, H, 1, D), np.float32)})
    for step in (1, 2):
        assert bound[step]["past_key_values.0.key"] is returned[step - 1]["present.0.key"]
        assert bound[step]["past_key_values.0.value"] is returned[step - 1]["present.0.value"]


def test_cache_inputs_are_refused_from_the_caller():
    cache = DeviceKVCache(Session(decoder_like(), providers="cpu"))
    with pytest.raises(InputError, match="KV cache"):
        cache.step({"x": np.ones((1, H, 1, D), np.float32), "past_key_values.0.key": np.ones((1, H, 0, D))})


def test_bfloat16_cache_is_made_without_numpy_support():
    """ORT's CPU provider can Concat bfloat16 (no arithmetic): enough to move a bf16 cache."""
    import ml_dtypes

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, H, 1, D])
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.BFLOAT16, [1, H, "past_seq", D])
    present = helper.make_tensor_value_info("present.0.key", TensorProto.BFLOAT16, [1, H, "past_seq + 1", D])
    graph = helper.make_graph([helper.make_node("Concat", ["past_key_values.0.key", "x"], ["present.0.key"], axis=2)],
                              "bf16", [x, past], [present])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    session = Session(model, providers="cpu")
    cache = DeviceKVCache(session)
    vals = [np.full((1, H, 1, D), v, ml_dtypes.bfloat16) for v in (1.5, -2.0)]
    for v in vals:
        feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint16), TensorProto.BFLOAT16)
        cache.step({"x": feed}, fetch=[])
    got = host_array(cache.values["past_key_values.0.key"])
    assert got.dtype == np.dtype(ml_dtypes.bfloat16) and got.shape == (1, H, 2, D)
    np.testing.assert_array_equal(got.astype(np.float32), np.concatenate(vals, axis=2).astype(np.float32))


# ---------------------------------------------------------------- with a real exported decoder
def test_llama_kv_cache_decode_matches_full_recompute():
    from tgraph.api import build
    from tgraph.codegen.onnx import to_onnx

    cfg = dict(d_model="32", num_heads="4", num_kv_heads="2", num_layers="2", vocab_size="61", d_ff="48",
               use_cache="true")
    for dtype, tol in (("float32", 1e-4), ("float16", 2e-2)):
        session = Session(to_onnx(build("llama", cfg, level=2, dtype=dtype).graph), providers="cpu")
        ids = np.random.default_rng(1).integers(0, 61, (1, 6)).astype(np.int64)
        full = DeviceKVCache(session).step({"input_ids": ids, "attention_mask": np.ones_like(ids),
                                            "position_ids": np.arange(6)[None]})["logits"]
        cache = DeviceKVCache(session)
        got = [cache.step({"input_ids": ids[:, :3], "attention_mask": np.ones((1, 3), np.int64),
                           "position_ids": np.arange(3)[None]})["logits"]]
        for t in range(3, 6):
            got.append(cache.step({"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                                   "position_ids": np.array([[t]])})["logits"])
        got = np.concatenate(got, axis=1)
        assert cache.length == 6
        np.testing.assert_allclose(got.astype(np.float32), full.astype(np.float32), rtol=tol, atol=tol)
