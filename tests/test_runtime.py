"""tgraph.runtime: provider choice (pure tables + a fake onnxruntime), a real CPU session,
IO binding, input checking and random inputs."""
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from tgraph.errors import ConfigError, InputError, RuntimeBackendError
from tgraph.runtime import (Session, binding_device, check_active, check_signature, make_random_inputs,
                            requested_providers, resolve_dim, to_numpy)
from tgraph.runtime import providers as prov
from tgraph.runtime import session as session_mod
from tgraph.runtime.session import TensorSpec, infer_vocab_size

CUDA, CPU, TRT = "CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"
VOCAB, HIDDEN = 10, 4
EMB = (np.arange(VOCAB * HIDDEN, dtype=np.float32).reshape(VOCAB, HIDDEN) / 7.0 - 2.0)


# ----------------------------------------------------------------------------- models

def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def emb_model():
    """out = (E[input_ids] + x) * attention_mask[..., None];  relu = Relu(x)."""
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=T.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "minus1"], ["mask3"]),
        helper.make_node("Add", ["emb", "x"], ["summed"]),
        helper.make_node("Mul", ["summed", "mask3"], ["out"]),
        helper.make_node("Relu", ["x"], ["relu"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", HIDDEN])]
    outputs = [helper.make_tensor_value_info("out", T.FLOAT, ["batch", "seq", HIDDEN]),
               helper.make_tensor_value_info("relu", T.FLOAT, ["batch", "seq", HIDDEN])]
    inits = [numpy_helper.from_array(EMB, "E"), numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    return _model(nodes, inputs, outputs, inits)


def expected(ids, mask, x):
    return (EMB[ids] + x) * mask[..., None].astype(np.float32), np.maximum(x, 0)


@pytest.fixture(scope="module")
def sess(emb_model):
    return Session(emb_model, "cpu")


@pytest.fixture
def feeds():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    x = rng.standard_normal((2, 5, HIDDEN)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "x": x}


# ----------------------------------------------------------------------------- pure provider logic

@pytest.mark.parametrize("request_, available, cuda_error, want", [
    ("auto", [TRT, CUDA, CPU], None, [(CUDA, {"device_id": 0}), CPU]),
    ("auto", [CPU], None, [CPU]),
    ("auto", [TRT, CUDA, CPU], "libcublasLt.so.13: cannot open shared object file", [CPU]),
    ("cpu", [CUDA, CPU], None, [CPU]),
    ("cuda", [CUDA, CPU], None, [(CUDA, {"device_id": 0}), CPU]),
    ([CPU], [CUDA, CPU], None, [CPU]),
    ([CUDA, CPU], [CUDA, CPU], None, [(CUDA, {"device_id": 0}), CPU]),
])
def test_requested_providers(request_, available, cuda_error, want):
    assert requested_providers(request_, available, cuda_error=cuda_error) == want


def test_requested_providers_device_id():
    assert requested_providers("cuda", [CUDA, CPU], device_id=1)[0] == (CUDA, {"device_id": 1})


@pytest.mark.parametrize("request_, available, cuda_error, error, pattern", [
    ("cuda", [CPU], None, RuntimeBackendError, r"^CUDA requested but not active: .*not in onnxruntime's available"),
    ("cuda", [CUDA, CPU], "libcudart.so.13: cannot open shared object file", RuntimeBackendError,
     r"^CUDA requested but not active: CUDAExecutionProvider failed to load: libcudart\.so\.13"),
    ("gpu", [CUDA, CPU], None, ConfigError, r"unknown providers request 'gpu'"),
    (["NopeExecutionProvider"], [CPU], None, RuntimeBackendError, r"NopeExecutionProvider.*not available"),
    ([], [CPU], None, RuntimeBackendError, r"not available"),
])
def test_requested_providers_errors(request_, available, cuda_error, error, pattern):
    with pytest.raises(error, match=pattern):
        requested_providers(request_, available, cuda_error=cuda_error)


@pytest.mark.parametrize("request_, active, want", [
    ("auto", [CUDA, CPU], "cuda"),
    ("auto", [CPU], "cpu"),  # auto accepts the fallback
    ("cpu", [CPU], "cpu"),
    ("cuda", [CUDA, CPU], "cuda"),
    ([CUDA, CPU], [CUDA, CPU], "cuda"),
])
def test_check_active(request_, active, want):
    assert check_active(request_, active) == want


@pytest.mark.parametrize("request_", ["cuda", [CUDA, CPU]])
def test_check_active_detects_silent_fallback(request_):
    with pytest.raises(RuntimeBackendError, match=r"^CUDA requested but not active: .*silently fell back") as info:
        check_active(request_, [CPU])
    assert "\n" not in str(info.value)
    with pytest.raises(RuntimeBackendError, match="failed to load: libcudnn.so.9: cannot open"):
        check_active(request_, [CPU], cuda_error="libcudnn.so.9: cannot open shared object file")


@pytest.mark.parametrize("requested, session_device, want", [
    (None, "cpu", "cpu"), ("auto", "cuda", "cuda"), (None, "cuda", "cuda"),
    ("cpu", "cuda", "cpu"), ("cpu", "cpu", "cpu"), ("cuda", "cuda", "cuda"),
])
def test_binding_device(requested, session_device, want):
    assert binding_device(requested, session_device) == want


def test_binding_device_errors():
    with pytest.raises(RuntimeBackendError, match="runs on the CPU"):
        binding_device("cuda", "cpu")
    with pytest.raises(ConfigError, match="unknown output device 'gpu'"):
        binding_device("gpu", "cuda")


def test_definite_load_failure():
    assert prov.definite_load_failure("libcublasLt.so.13: cannot open shared object file: No such file or directory")
    assert not prov.definite_load_failure("undefined symbol: Provider_GetHost")


# ----------------------------------------------------------------------------- a fake onnxruntime

class FakeBinding:
    def __init__(self, log):
        self.log, self.outputs = log, []

    def bind_ortvalue_input(self, name, value):
        self.log.append(("input", name, value.device, value.device_id))

    def bind_output(self, name, device_type, device_id):
        self.log.append(("output", name, device_type, device_id))
        self.outputs.append(f"value:{name}@{device_type}:{device_id}")

    def get_outputs(self):
        return list(self.outputs)


def fake_ort(available, active, fail=None):
    """An onnxruntime stand-in whose sessions report `active` providers (or raise `fail`)."""
    made, log = [], []

    class FakeSession:
        def __init__(self, payload, sess_options=None, providers=None):
            made.append(providers)
            if fail is not None:
                raise fail
            self.options = sess_options

        def get_providers(self):
            return list(active)

        def get_inputs(self):
            return [SimpleNamespace(name="x", type="tensor(float)", shape=["batch", 3])]

        def get_outputs(self):
            return [SimpleNamespace(name="y", type="tensor(float)", shape=["batch", 3])]

        def io_binding(self):
            return FakeBinding(log)

        def run_with_iobinding(self, binding):
            log.append(("run",))

    def from_numpy(array, device, device_id):
        return SimpleNamespace(array=array, device=device, device_id=device_id)

    module = SimpleNamespace(get_available_providers=lambda: list(available), InferenceSession=FakeSession,
                             SessionOptions=ort.SessionOptions, GraphOptimizationLevel=ort.GraphOptimizationLevel,
                             ExecutionMode=ort.ExecutionMode, OrtValue=SimpleNamespace(ortvalue_from_numpy=from_numpy))
    return module, made, log


@pytest.fixture
def use_fake(monkeypatch, emb_model):
    def install(available, active, fail=None, cuda_error=None):
        module, made, log = fake_ort(available, active, fail)
        monkeypatch.setattr(session_mod, "ort", module)
        monkeypatch.setattr(prov, "cuda_load_error", lambda _ort: cuda_error)
        return made, log
    return install


def test_fake_auto_uses_cuda_when_active(use_fake, emb_model):
    made, _ = use_fake([TRT, CUDA, CPU], [CUDA, CPU])
    s = Session(emb_model, "auto", device_id=2)
    assert made == [[(CUDA, {"device_id": 2}), CPU]]
    assert (s.device, s.providers) == ("cuda", [CUDA, CPU])


def test_fake_auto_accepts_silent_fallback(use_fake, emb_model):
    made, _ = use_fake([CUDA, CPU], [CPU])
    s = Session(emb_model, "auto")
    assert made[0][0][0] == CUDA and s.device == "cpu"


def test_fake_auto_skips_cuda_that_cannot_load(use_fake, emb_model):
    made, _ = use_fake([CUDA, CPU], [CPU], cuda_error="libcublasLt.so.13: cannot open shared object file")
    assert Session(emb_model, "auto").device == "cpu"
    assert made == [[CPU]]


def test_fake_cuda_silent_fallback_is_an_error(use_fake, emb_model):
    use_fake([CUDA, CPU], [CPU])
    with pytest.raises(RuntimeBackendError, match=r"^CUDA requested but not active: .*silently fell back"):
        Session(emb_model, "cuda")


def test_fake_cuda_with_known_load_error_fails_before_creating(use_fake, emb_model):
    made, _ = use_fake([CUDA, CPU], [CPU], cuda_error="libcudart.so.13: cannot open shared object file")
    with pytest.raises(RuntimeBackendError, match=r"failed to load: libcudart\.so\.13"):
        Session(emb_model, "cuda")
    assert made == []


def test_fake_cuda_creation_failure(use_fake, emb_model):
    use_fake([CUDA, CPU], [CUDA, CPU], fail=RuntimeError("CUDA failure 100: no CUDA-capable device\nmore"))
    with pytest.raises(RuntimeBackendError,
                       match=r"^CUDA requested but not active: .*no CUDA-capable device more$"):
        Session(emb_model, "cuda")


def test_fake_cuda_binding_places_values_on_the_device(use_fake, emb_model):
    use_fake([CUDA, CPU], [CUDA, CPU])
    s = Session(emb_model, "cuda", device_id=1)
    out = s.run_with_binding({"x": np.zeros((2, 3), np.float32)})
    assert out == {"y": "value:y@cuda:1"}
    out = s.run_with_binding({"x": np.zeros((2, 3), np.float32)}, output_device="cpu")
    assert out == {"y": "value:y@cpu:0"}


def test_fake_binding_log(use_fake, emb_model):
    _, log = use_fake([CUDA, CPU], [CUDA, CPU])
    Session(emb_model, "cuda", device_id=1).run_with_binding({"x": np.zeros((2, 3), np.float32)})
    assert log == [("input", "x", "cuda", 1), ("output", "y", "cuda", 1), ("run",)]


# ----------------------------------------------------------------------------- a real CPU session

def test_session_introspection(sess):
    assert sess.providers == [CPU] and sess.device == "cpu"
    assert sess.input_names == ["input_ids", "attention_mask", "x"]
    assert sess.output_names == ["out", "relu"]
    assert sess.inputs[2] == TensorSpec("x", np.dtype(np.float32), ("batch", "seq", HIDDEN))
    assert sess.inputs[0].dtype == np.int64
    assert "input_ids: int64[batch, seq]" in repr(sess)


def test_run_matches_numpy(sess, feeds):
    out, relu = expected(**{"ids": feeds["input_ids"], "mask": feeds["attention_mask"], "x": feeds["x"]})
    got = sess.run(feeds)
    assert list(got) == ["out", "relu"]
    np.testing.assert_allclose(got["out"], out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["relu"], relu)
    assert list(sess.run(feeds, outputs=["relu"])) == ["relu"]


def test_run_converts_python_values_to_model_dtype(sess):
    got = sess.run({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "x": [[[0.5] * HIDDEN] * 2]})
    np.testing.assert_allclose(got["out"], EMB[[[1, 2]]] + 0.5, rtol=1e-6)


def test_run_with_binding_and_chaining(sess, feeds):
    ids, mask, x = feeds["input_ids"], feeds["attention_mask"], feeds["x"]
    first = sess.run_with_binding(feeds)
    assert isinstance(first["out"], ort.OrtValue) and first["out"].device_name() == "cpu"
    np.testing.assert_allclose(to_numpy(first)["out"], expected(ids, mask, x)[0], rtol=1e-6, atol=1e-6)
    # Feed the bound output back in as `x` without leaving the runtime.
    second = sess.run_with_binding({"input_ids": ids, "attention_mask": mask, "x": first["out"]}, outputs=["out"])
    want = expected(ids, mask, expected(ids, mask, x)[0])[0]
    np.testing.assert_allclose(second["out"].numpy(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeBackendError, match="runs on the CPU"):
        sess.run_with_binding(feeds, output_device="cuda")


@pytest.mark.parametrize("change, pattern", [
    (lambda f: f.pop("x"), r"missing input\(s\): x: float32\[batch, seq, 4\]"),
    (lambda f: f.update(y=np.zeros(1)), r"unexpected input\(s\) 'y'; the model's inputs are: input_ids, attention_mask, x"),
    (lambda f: f.update(x=f["x"].astype(np.float64)), r"input 'x' has dtype float64 but the model expects float32"),
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), r"input 'input_ids' has dtype int32"),
    (lambda f: f.update(x=f["x"][0]), r"input 'x' has rank 2 .* expects rank 3"),
    (lambda f: f.update(x=np.zeros((2, 5, 3), np.float32)), r"input 'x' has size 3 on axis 2 but the model expects 4"),
    (lambda f: f.update(attention_mask=np.ones((3, 5), np.int64)),
     r"input 'attention_mask' has batch=3 on axis 0 but input 'input_ids' has batch=2"),
])
def test_run_input_errors(sess, feeds, change, pattern):
    change(feeds)
    with pytest.raises(InputError, match=pattern):
        sess.run(feeds)
    with pytest.raises(InputError, match=pattern):
        sess.run_with_binding(feeds)


def test_unknown_output_and_ort_failure(sess, feeds):
    with pytest.raises(InputError, match=r"unknown output\(s\) 'nope'"):
        sess.run(feeds, outputs=["nope"])
    feeds["input_ids"] = feeds["input_ids"] + 100  # out of the embedding table: onnxruntime itself fails
    with pytest.raises(RuntimeBackendError, match=r"^onnxruntime failed running model 'm': .*") as info:
        sess.run(feeds)
    assert "\n" not in str(info.value)


def test_check_signature_with_unknown_rank():
    check_signature([TensorSpec("a", np.dtype(np.float32), None)], {"a": (np.dtype(np.float32), (1, 2, 3))})


def test_thread_and_optimization_options(emb_model):
    s = Session(emb_model, "cpu", threads=2, inter_op_threads=3, optimization_level="basic")
    opts = s.ort_session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 3)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    opts = Session(emb_model, "cpu", threads=1, optimization_level="disable").ort_session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


@pytest.mark.parametrize("kwargs, pattern", [
    ({"optimization_level": "max"}, "unknown optimization level 'max'"),
    ({"threads": -1}, "threads must be a non-negative int"),
    ({"inter_op_threads": 1.5}, "inter_op_threads must be a non-negative int"),
])
def test_option_errors(emb_model, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Session(emb_model, "cpu", **kwargs)


def test_model_sources(emb_model, tmp_path, feeds):
    path = tmp_path / "m.onnx"
    onnx.save(emb_model, path)
    want = Session(emb_model, "cpu").run(feeds)["out"]
    for source in (path, str(path), emb_model.SerializeToString()):
        np.testing.assert_array_equal(Session(source, "cpu").run(feeds)["out"], want)
    with pytest.raises(RuntimeBackendError, match="model file not found"):
        Session(tmp_path / "missing.onnx")
    with pytest.raises(RuntimeBackendError, match=r"^onnxruntime could not create a session for model bytes"):
        Session(b"not a model", "cpu")
    with pytest.raises(ConfigError, match="not int"):
        Session(3)


def test_real_onnxruntime_cuda_request_is_honest(emb_model):
    """On a GPU box "cuda" must really run on CUDA; elsewhere it must say why it cannot."""
    try:
        s = Session(emb_model, "cuda")
    except RuntimeBackendError as exc:
        assert str(exc).startswith("CUDA requested but not active: ")
        assert "\n" not in str(exc)
        assert Session(emb_model, "auto").device == "cpu"
    else:
        assert s.device == "cuda" and CUDA in s.providers


# ----------------------------------------------------------------------------- random inputs

@pytest.fixture(scope="module")
def many_inputs_model():
    """Transformer-style inputs; the ids reach the embedding through a Cast."""
    spec = [("input_ids", T.INT64, ["batch", "seq"]), ("attention_mask", T.BOOL, ["batch", "seq"]),
            ("token_type_ids", T.INT64, ["batch", "seq"]), ("position_ids", T.INT64, ["batch", "seq"]),
            ("past", T.FLOAT16, ["batch", 2, "past_seq + seq", None]), ("step", T.INT32, [])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=T.INT32),
             helper.make_node("Gather", ["E", "ids32"], ["emb"])]
    nodes += [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in spec]
    outputs = [helper.make_tensor_value_info("emb", T.FLOAT, ["batch", "seq", HIDDEN])]
    outputs += [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in spec]
    inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in spec]
    return _model(nodes, inputs, outputs, [numpy_helper.from_array(EMB, "E")])


def test_make_random_inputs(many_inputs_model):
    got = make_random_inputs(many_inputs_model, {"batch": 2, "seq": 6, "past_seq": 3}, seed=5)
    assert {k: (v.dtype.name, v.shape) for k, v in got.items()} == {
        "input_ids": ("int64", (2, 6)), "attention_mask": ("bool", (2, 6)), "token_type_ids": ("int64", (2, 6)),
        "position_ids": ("int64", (2, 6)), "past": ("float16", (2, 2, 9, 1)), "step": ("int32", ())}
    assert got["input_ids"].min() >= 0 and got["input_ids"].max() < VOCAB  # vocab found through the Cast
    assert len(np.unique(got["input_ids"])) > 1
    assert got["attention_mask"].all() and not got["token_type_ids"].any() and got["step"] == 0
    np.testing.assert_array_equal(got["position_ids"], np.tile(np.arange(6), (2, 1)))
    assert np.isfinite(got["past"]).all() and got["past"].std() > 0.1
    ran = Session(many_inputs_model, "cpu").run(got)  # scalar, bool and float16 inputs pass the checks
    np.testing.assert_array_equal(ran["emb"], EMB[got["input_ids"]])
    for name, value in got.items():
        np.testing.assert_array_equal(ran[f"{name}_out"], value)


def test_make_random_inputs_sources_agree_and_seed(many_inputs_model, tmp_path):
    path = tmp_path / "many.onnx"
    onnx.save(many_inputs_model, path)
    base = make_random_inputs(many_inputs_model, seed=3)
    assert base["input_ids"].shape == (1, 8)  # default dims batch=1, seq=8
    for source in (path, many_inputs_model.SerializeToString(), Session(path, "cpu"), Session(many_inputs_model, "cpu")):
        again = make_random_inputs(source, seed=3)
        for name in base:
            np.testing.assert_array_equal(again[name], base[name])
    other = make_random_inputs(many_inputs_model, seed=4)
    assert not np.array_equal(other["past"], base["past"])


def test_make_random_inputs_run_and_vocab_override(sess, many_inputs_model):
    feeds = make_random_inputs(sess, {"batch": 3, "seq": 4})
    assert feeds["input_ids"].max() < VOCAB and feeds["attention_mask"].dtype == np.int64
    assert sess.run(feeds)["out"].shape == (3, 4, HIDDEN)
    big = make_random_inputs(sess, {"seq": 200}, vocab_size=1000)
    assert big["input_ids"].max() >= VOCAB
    assert infer_vocab_size(many_inputs_model, "token_type_ids") is None


@pytest.mark.parametrize("dim, want", [
    (7, 7), (None, 1), ("batch", 2), ("seq", 5), ("unknown", 1), ("past_seq + seq", 8),
    ("2 * seq - 1", 9), ("seq // 2", 2), ("unk__12", 1), ("seq +", 1),
])
def test_resolve_dim(dim, want):
    assert resolve_dim(dim, {"batch": 2, "seq": 5, "past_seq": 3}) == want
