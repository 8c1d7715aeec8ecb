"""Generation directories (`tgraph export MODEL --task generate -o DIR`, `tgraph.export_dir`):
what is written, that `Generator(DIR)` / `tgraph generate DIR` run it without tracing and give
the greedy ids of Hugging Face and of the model built from scratch, and the error paths.
onnxruntime-genai, where importable (or TGRAPH_GENAI_PYTHON names a Python that has it), runs
the same directory with the same greedy ids."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tgraph.cli import main
from tgraph.errors import ConfigError
from tgraph.export_dir import export_generation_dir, genai_model_type, read_manifest, target_plan
from tgraph.generate import Generator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_generate import PROMPTS, _hf_model, hf_generate  # noqa: E402  (the HF parity harness)

NEW = 12
TINY = ["--set", "d_model=64", "--set", "num_layers=2", "--set", "num_heads=4", "--set", "num_kv_heads=2",
        "--set", "d_ff=96", "--set", "vocab_size=101"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """An HF LLaMA checkpoint (with a generation_config.json) exported as a directory."""
    root = tmp_path_factory.mktemp("gen")
    model = _hf_model("llama")
    model.save_pretrained(root / "ckpt", safe_serialization=True)
    (root / "ckpt" / "tokenizer_config.json").write_text("{}\n")
    assert main(["export", str(root / "ckpt"), "--task", "generate", "-o", str(root / "dir"),
                 "--max-length", "96"]) == 0
    return model, root / "ckpt", root / "dir"


def test_directory_contents(llama_dir):
    _, ckpt, out = llama_dir
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tgraph.json", "generation_config.json",
            "tokenizer_config.json"} <= names
    manifest = read_manifest(out)
    assert manifest["family"] == "llama" and manifest["cache_layout"] == "static"
    assert manifest["max_length"] == 96 and manifest["target"] == "cpu" and manifest["dtype"] == "float32"
    assert manifest["config"]["kv_cache"] == "static" and manifest["config"]["num_kv_heads"] == 2
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    genai = json.loads((out / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    assert genai["search"]["past_present_share_buffer"] is True and genai["search"]["max_length"] == 96
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["num_attention_heads"], dec["head_size"]) == \
        (2, 2, 4, 8)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"


def test_generator_from_directory_matches_hf_and_never_traces(llama_dir, monkeypatch):
    model, ckpt, out = llama_dir
    import tgraph.api
    import tgraph.dsl

    def no_trace(*a, **k):
        raise AssertionError("a generation directory must not be traced")
    monkeypatch.setattr(tgraph.api, "build", no_trace)
    monkeypatch.setattr(tgraph.dsl, "trace", no_trace)
    gen = Generator(str(out), provider="cpu")
    got = gen.generate(PROMPTS, max_new_tokens=NEW)              # rows of different lengths
    ref = hf_generate(model, PROMPTS, False, max_new_tokens=NEW, pad_token_id=0)
    np.testing.assert_array_equal(got.tokens, ref)


def test_cli_generate_reads_the_directory(llama_dir, capsys):
    _, _, out = llama_dir
    assert main(["generate", str(out), "--prompt-ids", "5,17,3", "--max-new-tokens", "5", "--json",
                 "--provider", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["ids"]) == 5


def test_directory_settings_are_fixed(llama_dir):
    _, _, out = llama_dir
    with pytest.raises(ConfigError, match="fixed when exported"):
        Generator(str(out), overrides={"num_layers": "1"})


@pytest.mark.parametrize("argv,message", [
    (["bert"], "no static KV-cache decoder"),
    (["t5", "--quantize", "int8"], "--quantize is not supported for encoder-decoder"),
    (["llama", "--set", "kv_cache=dynamic"], "sets it itself"),
    (["llama", "--dtype", "bfloat16"], "needs --target cuda"),
    (["llama", "--opset", "24"], "--opset does not apply to --task generate"),
    (["llama", "--external-data"], "--external-data does not apply to --task generate"),
])
def test_export_errors_are_one_line_and_leave_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "dir"
    assert main(["export", *argv, "--task", "generate", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("x")
    assert main(["export", "llama", *TINY, "--task", "generate", "-o", str(tmp_path / "dir")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["keep.txt"]


def test_a_broken_manifest_is_named(tmp_path):
    export_generation_dir("llama", tmp_path / "d", overrides=dict(s.split("=") for s in TINY[1::2]), max_length=32)
    (tmp_path / "d" / "tgraph.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tgraph.json"):
        Generator(str(tmp_path / "d"))


def test_target_plan_is_a_pure_choice():
    cpu, cuda = target_plan("cpu", "float32"), target_plan("cuda", "float16")
    assert cpu["attention"] == cuda["attention"] == "com.microsoft.GroupQueryAttention"
    assert cpu["logits_dtype"] == cuda["logits_dtype"] == "float32"
    assert cpu["provider_options"] == [] and "cuda" in cuda["provider_options"][0]
    with pytest.raises(ConfigError, match="--target"):
        target_plan("tpu", "float32")


def _genai_python():
    try:
        import onnxruntime_genai  # noqa: F401
        return sys.executable
    except ImportError:
        return os.environ.get("TGRAPH_GENAI_PYTHON")


GENAI_SCRIPT = """
import sys, json, numpy as np, onnxruntime_genai as og
d, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
m = og.Model(d); p = og.GeneratorParams(m); p.set_search_options(max_length=len(prompt) + n, do_sample=False)
g = og.Generator(m, p); g.append_tokens(np.array([prompt], np.int32)); out = []
while not g.is_done():
    g.generate_next_token(); out.append(int(g.get_next_tokens()[0]))
print(json.dumps(out))
"""


def test_onnxruntime_genai_runs_the_directory_with_the_same_greedy_ids(llama_dir):
    python = _genai_python()
    if python is None:
        pytest.skip("onnxruntime_genai is not importable here (set TGRAPH_GENAI_PYTHON to a Python that has it)")
    _, _, out = llama_dir
    prompt = PROMPTS[0]
    done = subprocess.run([python, "-c", GENAI_SCRIPT, str(out), json.dumps(prompt), str(NEW)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = Generator(str(out), provider="cpu").generate([prompt], max_new_tokens=NEW).ids[0]
    assert theirs == ours


def test_genai_model_type_is_one_onnxruntime_genai_knows():
    assert genai_model_type("llama", "mistral") == "mistral" and genai_model_type("llama", "qwen2") == "qwen2"
    assert genai_model_type("llama", None) == "llama" and genai_model_type("llama", "weird") == "llama"
    for family in ("gpt", "gpt2", "gpt_neo", "palm"):
        assert genai_model_type(family, family) == "decoder"


@pytest.mark.parametrize("family,sets", [
    ("gpt2", {"n_embd": "64", "n_layer": "2", "n_head": "4", "vocab_size": "101", "n_positions": "64"}),
    ("palm", {"d_model": "64", "num_layers": "2", "num_heads": "4", "d_ff": "96", "vocab_size": "101"}),
])
def test_onnxruntime_genai_runs_other_families_with_the_same_greedy_ids(tmp_path, family, sets):
    """genai 0.18's own "gpt2" type refuses this interface at the first step; "decoder" runs it."""
    python = _genai_python()
    if python is None:
        pytest.skip("onnxruntime_genai is not importable here (set TGRAPH_GENAI_PYTHON to a Python that has it)")
    out = tmp_path / "d"
    export_generation_dir(family, out, overrides=sets, max_length=48, seed=1)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "decoder"
    prompt = PROMPTS[0]
    done = subprocess.run([python, "-c", GENAI_SCRIPT, str(out), json.dumps(prompt), str(NEW)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = Generator(str(out), provider="cpu", eos_token_id=None).generate([prompt], max_new_tokens=len(theirs)).ids[0]
    assert theirs == ours


def test_quantized_directory_records_its_scheme_and_generates(llama_dir, tmp_path):
    """`--task generate --quantize int8`: every linear layer (LM head too) is MatMulNBits, tgraph.json
    says so, and the directory generates what the float one does (int8 logits stay within ~1e-3)."""
    _, ckpt, out = llama_dir
    q = tmp_path / "q8"
    assert main(["export", str(ckpt), "--task", "generate", "-o", str(q), "--max-length", "96",
                 "--quantize", "int8", "--block-size", "16"]) == 0
    scheme = read_manifest(q)["quantization"]
    assert scheme["scheme"] == "int8" and scheme["block_size"] == 16 and scheme["lm_head_quantized"]
    ops = [n.op_type for n in onnx.load(str(q / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == scheme["quantized_matmuls"] and "MatMul" not in ops
    assert read_manifest(out)["quantization"] is None
    ours = Generator(str(q), provider="cpu").generate(PROMPTS[:1], max_new_tokens=4).ids[0]
    assert ours == Generator(str(out), provider="cpu").generate(PROMPTS[:1], max_new_tokens=4).ids[0]


@pytest.mark.parametrize("flags", [["--max-length", "64"], ["--target", "cpu"]])
def test_generation_options_without_the_task_are_refused(tmp_path, capsys, flags):
    out = tmp_path / "m.onnx"
    assert main(["export", "llama", "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flags[0]} needs --task generate" in err and "\n" not in err and not out.exists()


def test_default_max_length_is_the_checkpoints_positions(llama_dir, tmp_path):
    """Without --max-length a rotary checkpoint's cache holds its trained positions (HF
    max_position_embeddings, 128 here), not DEFAULT_CACHE_LENGTH: both in tgraph.json and in
    genai_config.json, and the rotary tables the graph carries agree."""
    _, ckpt, _ = llama_dir
    assert main(["export", str(ckpt), "--task", "generate", "-o", str(tmp_path / "d")]) == 0
    assert read_manifest(tmp_path / "d")["max_length"] == 128
    genai = json.loads((tmp_path / "d" / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == genai["model"]["context_length"] == 128


def test_cache_length_defaults_to_trained_positions_capped():
    from tgraph.models.decoding import DEFAULT_CACHE_LENGTH, cache_length
    from tgraph.models.llama import config_from_hf as llama_from_hf
    from tgraph.models.palm import config_from_hf as palm_from_hf

    tiny = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 48}
    assert cache_length(llama_from_hf({**tiny, "max_position_embeddings": 256})) == 256
    assert cache_length(palm_from_hf({**tiny, "max_position_embeddings": 256})) == 256
    assert cache_length(llama_from_hf({**tiny, "max_position_embeddings": 131072})) == DEFAULT_CACHE_LENGTH
    assert cache_length(llama_from_hf(tiny)) == DEFAULT_CACHE_LENGTH               # unknown: the default
    # rotary positions extrapolate: an explicit size may exceed the trained positions, as HF allows
    trained = llama_from_hf({**tiny, "max_position_embeddings": 256})
    assert cache_length(dataclasses.replace(trained, cache_length=512)) == 512
