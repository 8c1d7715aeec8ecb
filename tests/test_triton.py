"""`tgraph deploy triton`: model repositories for bert, t5 (whole graphs), gpt2 and llama
(decoder step + Python-backend generation loop), checked two ways: by
`tgraph.deploy.triton_check` and, here, independently: each config.pbtxt parsed with Triton's
`model_config_pb2` and compared with what onnxruntime says the graph takes and gives.
Deliberately broken configs (dims, dtype, name, ...) must be refused by the same check.
The generation loop (model.py) runs against a stand-in for Triton's Python backend whose
BLS calls run the decoder with onnxruntime; it must give `Generator(DIR)`'s greedy ids."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from tgraph.cli import main
from tgraph.deploy import check_model_dir, check_repository, triton_check
from tgraph.errors import ConfigError

model_config_pb2 = triton_check.model_config_pb2()          # tritonclient's own module (the triton extra)
assert model_config_pb2 is not None and "tritonclient" in model_config_pb2.__file__

BERT = ["--set", "hidden_size=32", "--set", "num_layers=1", "--set", "num_heads=2", "--set", "intermediate_size=48",
        "--set", "vocab_size=97"]
T5 = ["--set", "d_model=32", "--set", "d_kv=8", "--set", "num_heads=2", "--set", "num_layers=1", "--set", "d_ff=48",
      "--set", "vocab_size=97"]
GPT2 = ["--set", "n_embd=32", "--set", "n_layer=2", "--set", "n_head=2", "--set", "vocab_size=97"]
LLAMA = ["--set", "d_model=32", "--set", "num_layers=2", "--set", "num_heads=4", "--set", "num_kv_heads=2",
         "--set", "d_ff=48", "--set", "vocab_size=97"]
TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(float16)": "TYPE_FP16"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    assert main(["export", "bert", "-o", str(root / "bert.onnx"), *BERT]) == 0
    for family, sets in (("gpt2", GPT2), ("llama", LLAMA)):
        assert main(["export", family, "--task", "generate", "-o", str(root / family), "--max-length", "48",
                     *sets]) == 0
    out = root / "repo"
    assert main(["deploy", "triton", str(root / "bert.onnx"), "-o", str(out), "--dynamic-batching",
                 "--instances", "2"]) == 0
    # a model tgraph builds (not an .onnx file): exported on the way
    assert main(["deploy", "triton", "t5", "-o", str(out), "--max-batch-size", "0", *T5]) == 0
    assert main(["deploy", "triton", str(root / "gpt2"), "-o", str(out), "--kind", "gpu"]) == 0
    assert main(["deploy", "triton", str(root / "llama"), "-o", str(out), "--name", "llama"]) == 0
    return root, out


def _parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _ort_view(onnx_file: Path):
    """What onnxruntime says the graph takes and gives: {name: (triton type, dims with -1)}."""
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    def dims(shape):
        return [d if isinstance(d, int) else -1 for d in shape]
    return ({i.name: (TRITON_TYPES[i.type], dims(i.shape)) for i in sess.get_inputs()},
            {o.name: (TRITON_TYPES[o.type], dims(o.shape)) for o in sess.get_outputs()})


def test_repository_layout_and_every_config_parses(repo):
    _, out = repo
    assert sorted(p.name for p in out.iterdir()) == ["bert", "gpt2", "gpt2_decoder", "llama", "llama_decoder", "t5"]
    assert check_repository(out) == {n: "model_config_pb2" for n in
                                     ("bert", "gpt2", "gpt2_decoder", "llama", "llama_decoder", "t5")}
    for model in out.iterdir():
        config = _parse(model / "config.pbtxt")
        assert config.name == model.name
        assert [p.name for p in model.iterdir() if p.is_dir()] == ["1"]
    for name in ("bert", "t5", "gpt2_decoder", "llama_decoder"):
        assert _parse(out / name / "config.pbtxt").platform == "onnxruntime_onnx"
        assert (out / name / "1" / "model.onnx").is_file()
    assert (out / "gpt2_decoder" / "1" / "model.onnx.data").is_file()   # external data travels


@pytest.mark.parametrize("name", ["bert", "t5", "gpt2_decoder", "llama_decoder"])
def test_config_matches_what_onnxruntime_sees(repo, name):
    _, out = repo
    config = _parse(out / name / "config.pbtxt")
    ins, outs = _ort_view(out / name / "1" / "model.onnx")
    batched = config.max_batch_size > 0
    for listed, graph in ((config.input, ins), (config.output, outs)):
        assert [t.name for t in listed] == list(graph)
        for t in listed:
            dtype, dims = graph[t.name]
            assert model_config_pb2.DataType.Name(t.data_type) == dtype
            if batched:
                assert dims[0] == -1
                dims = dims[1:]
            assert list(t.dims) == dims, t.name


def test_scheduling_options(repo):
    _, out = repo
    bert = _parse(out / "bert" / "config.pbtxt")
    assert bert.max_batch_size == 8 and list(bert.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert bert.instance_group[0].count == 2
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(bert.instance_group[0].kind) == "KIND_CPU"
    assert bert.optimization.graph.level == 1
    assert bert.parameters["execution_mode"].string_value == "0"
    t5 = _parse(out / "t5" / "config.pbtxt")
    assert t5.max_batch_size == 0 and list(t5.input[0].dims) == [-1, -1]     # batch axis stays in dims
    gpu = _parse(out / "gpt2_decoder" / "config.pbtxt")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(gpu.instance_group[0].kind) == "KIND_GPU"
    accel = gpu.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "cuda" and accel.parameters["use_tf32"] == "0"
    loop = _parse(out / "gpt2" / "config.pbtxt")
    assert loop.backend == "python" and loop.parameters["decoder_model"].string_value == "gpt2_decoder"
    assert {t.name for t in loop.input} == {"text_input", "input_ids", "max_tokens", "temperature", "top_p", "seed"}
    assert all(t.optional for t in loop.input)
    decoder = json.loads((out / "gpt2" / "1" / "decoder.json").read_text())
    assert decoder["max_length"] == 48 and len(decoder["pasts"]) == 4 and decoder["pasts"][0]["heads"] == 2
    assert (out / "gpt2" / "1" / "tgraph.json").is_file() and (out / "gpt2" / "1" / "model.py").is_file()


BREAKS = [   # (what, regex on the config text, replacement, the error it must give)
    ("dims", r"dims: \[-1, 32\]", "dims: [-1, 33]", r"last_hidden_state.*dims \[-1, 33\].*\[-1, 32\]"),
    ("dtype", r"(name: \"input_ids\"\n  data_type: )TYPE_INT64", r"\1TYPE_INT32", r"input_ids.*TYPE_INT32.*TYPE_INT64"),
    ("name", r"^name: \"bert\"", 'name: "bert2"', r"name 'bert2' is not the model directory's name 'bert'"),
    ("input name", r"name: \"token_type_ids\"", 'name: "segment_ids"', r"token_type_ids.*not in the config"),
    ("output name", r"name: \"pooler_output\"", 'name: "pooled"', r"output 'pooled' is not a output"),
    ("no batch, batcher", r"max_batch_size: 8", "max_batch_size: 0", r"dynamic_batching needs max_batch_size > 0"),
    ("batch axis", r"max_batch_size: 0", "max_batch_size: 4", r"t5/config.pbtxt: input 'input_ids' has dims \[-1, -1\], "
     r"the graph's are \[-1\]"),
    ("preferred", r"preferred_batch_size: \[2, 4, 8\]", "preferred_batch_size: [2, 16]", r"\[16\] outside 1..8"),
    ("platform", r"onnxruntime_onnx", "tensorflow_savedmodel", r"platform 'tensorflow_savedmodel'"),
    ("unknown field", r"max_batch_size: 8", "max_batch_size: 8\nmax_batchsize: 8", r"not a valid Triton ModelConfig"),
    ("bad enum", r"KIND_CPU", "KIND_TPU", r"not a valid Triton ModelConfig"),
]


@pytest.mark.parametrize("what,pattern,replacement,error", BREAKS, ids=[b[0] for b in BREAKS])
def test_a_wrong_config_is_caught(repo, tmp_path, what, pattern, replacement, error):
    _, out = repo
    name = "t5" if what == "batch axis" else "bert"
    model = tmp_path / name
    shutil.copytree(out / name, model)
    text = (model / "config.pbtxt").read_text()
    broken, n = re.subn(pattern, replacement, text, count=1, flags=re.M)
    assert n == 1, f"the {what} break did not apply"
    (model / "config.pbtxt").write_text(broken)
    with pytest.raises(ConfigError, match=error):
        check_model_dir(model)


def test_missing_version_or_file_is_caught(repo, tmp_path):
    _, out = repo
    model = tmp_path / "gpt2_decoder"
    shutil.copytree(out / "gpt2_decoder", model)
    (model / "1" / "model.onnx.data").unlink()
    with pytest.raises(ConfigError, match="external data file model.onnx.data is missing"):
        check_model_dir(model)
    shutil.rmtree(model / "1")
    (model / "v1").mkdir()
    with pytest.raises(ConfigError, match="no version directory"):
        check_model_dir(model)


def test_cli_refusals_are_one_line_and_write_nothing(repo, tmp_path, capsys):
    root, _ = repo
    out = tmp_path / "r"
    cases = [
        (["--max-batch-size", "0", "--dynamic-batching"], "--dynamic-batching needs a batch axis"),
        (["--cuda-graphs"], "does not capture CUDA graphs"),
        (["--name", "../x"], "a Triton model name"),
        (["--instances", "0"], "--instances must be >= 1"),
    ]
    for extra, message in cases:
        assert main(["deploy", "triton", str(root / "bert.onnx"), "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tgraph: error: ") and message in err and "\n" not in err
        assert not out.exists()
    assert main(["deploy", "triton", str(root / "bert.onnx"), "-o", str(out)]) == 0
    assert main(["deploy", "triton", str(root / "bert.onnx"), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["bert"]     # no staging directory left behind


def test_a_corrupt_onnx_file_is_one_line_and_leaves_no_directory(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    out = tmp_path / "new" / "repo"
    assert main(["deploy", "triton", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgraph: error: cannot read ONNX file") and str(bad) in err and "\n" not in err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- the Python-backend loop
class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self._error = list(output_tensors), error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message


def _stub_backend(repo: Path):
    """triton_python_backend_utils as the server gives it, with BLS run by onnxruntime on the
    repository's decoder model."""
    sessions = {}

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model_name, self.inputs, self.wanted = model_name, inputs, requested_output_names

        def exec(self):
            if self.model_name not in sessions:
                sessions[self.model_name] = ort.InferenceSession(str(repo / self.model_name / "1" / "model.onnx"),
                                                                 providers=["CPUExecutionProvider"])
            sess = sessions[self.model_name]
            outs = sess.run(self.wanted, {t.name(): t.as_numpy() for t in self.inputs})
            return _Response([_Tensor(n, a) for n, a in zip(self.wanted, outs)])

    def by_name(holder, name):
        tensors = holder.inputs if hasattr(holder, "inputs") else holder.output_tensors
        return next((t for t in tensors if t.name() == name), None)

    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceRequest, mod.InferenceResponse, mod.TritonError = _Tensor, InferenceRequest, _Response, \
        _Error
    mod.get_input_tensor_by_name = by_name
    mod.get_output_tensor_by_name = by_name
    return mod


class _Request:
    def __init__(self, **inputs):
        self.inputs = [_Tensor(k, v) for k, v in inputs.items()]


def _load_loop(repo: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"triton_{name}_model", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json.dumps({"parameters": {"decoder_model": {"string_value": f"{name}_decoder"}}})
    model.initialize({"model_config": config, "model_repository": str(repo / name), "model_version": "1"})
    return model


def _output(response, name):
    return next(t for t in response.output_tensors if t.name() == name).as_numpy()


def test_python_backend_loop_gives_the_generators_greedy_ids(repo, monkeypatch):
    from tgraph.generate import Generator

    root, out = repo
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_backend(out))
    for name in ("gpt2", "llama"):
        model = _load_loop(out, name)
        prompts = [[5, 17, 3], [9], [1, 2, 3, 4, 5, 6, 7]]
        requests = [_Request(input_ids=np.array(p, np.int64), max_tokens=np.array([7], np.int32)) for p in prompts]
        requests.append(_Request(input_ids=np.array([1, 2], np.int64), max_tokens=np.array([100], np.int32)))
        requests.append(_Request(max_tokens=np.array([3], np.int32)))
        responses = model.execute(requests)
        gen = Generator(str(root / name), provider="cpu")
        for prompt, response in zip(prompts, responses):
            assert not response.has_error()
            got = _output(response, "output_ids").tolist()
            assert got == gen.generate([prompt], max_new_tokens=7).ids[0], name
        assert responses[3].has_error() and "the cache holds 48" in responses[3].error().message()
        assert responses[4].has_error() and "give text_input or input_ids" in responses[4].error().message()


def test_without_tritonclient_nothing_is_claimed_checked(repo, tmp_path, monkeypatch, capsys):
    root, _ = repo
    monkeypatch.setattr(triton_check, "model_config_pb2", lambda: None)
    assert main(["deploy", "triton", str(root / "bert.onnx"), "-o", str(tmp_path / "r")]) == 0
    assert "config.pbtxt checked: not checked: tritonclient is not installed" in capsys.readouterr().out


def test_python_backend_loop_text_in_text_out(repo, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    from tgraph.generate import Generator

    root, out = repo
    copy = tmp_path / "repo"
    for name in ("gpt2", "gpt2_decoder"):
        shutil.copytree(out / name, copy / name)
    tok = Tokenizer(tok_models.WordLevel({**{f"w{i}": i for i in range(96)}, "[UNK]": 96}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(copy / "gpt2" / "1" / "tokenizer.json"))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_backend(copy))
    response = _load_loop(copy, "gpt2").execute([_Request(text_input=np.array([b"w5 w17 w3"], dtype=np.object_),
                                                          max_tokens=np.array([5], np.int32))])[0]
    assert not response.has_error()
    want = Generator(str(root / "gpt2"), provider="cpu").generate([[5, 17, 3]], max_new_tokens=5).ids[0]
    assert _output(response, "output_ids").tolist() == want
    assert _output(response, "text_output")[0].decode() == tok.decode(want)
