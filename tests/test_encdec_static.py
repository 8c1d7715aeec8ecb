"""Encoder-decoders on the static KV cache and in generation directories (t5, bart, mbart,
the paper's Transformer).

Oracles: Hugging Face greedy `generate` on random-weight checkpoints (T5, BART), the uncached
full model re-run on the whole prefix (the Transformer has no HF twin), the same model's full
logits (static = uncached <= 1e-4), and the NumPy reference interpreter against onnxruntime
for GroupQueryAttention carrying T5's relative position bias (`attention_bias`)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tgraph.api import build
from tgraph.cli import main
from tgraph.codegen.onnx import to_onnx
from tgraph.errors import ConfigError
from tgraph.export_dir import read_manifest
from tgraph.generate import Generator
from tgraph.ir.evaluate import evaluate
from tgraph.runtime import Session
from tgraph.runtime.static_cache import StaticDecoder, cuda_graph_plan, static_signature
from tgraph.sources import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_generate import PROMPTS, _hf_model, hf_generate  # noqa: E402  (the HF parity harness)

SMALL = {
    "t5": dict(vocab_size="61", d_model="32", d_kv="8", d_ff="48", num_layers="2", num_heads="4",
               relative_attention_num_buckets="8", relative_attention_max_distance="16"),
    "bart": dict(vocab_size="61", d_model="32", encoder_layers="1", decoder_layers="2", encoder_attention_heads="4",
                 decoder_attention_heads="4", encoder_ffn_dim="48", decoder_ffn_dim="48",
                 max_position_embeddings="64"),
    "mbart": dict(vocab_size="61", d_model="32", encoder_layers="1", decoder_layers="2", encoder_attention_heads="4",
                  decoder_attention_heads="2", encoder_ffn_dim="48", decoder_ffn_dim="48",
                  max_position_embeddings="64"),
    "transformer": dict(vocab_size="61", d_model="32", num_heads="4", d_ff="48", num_encoder_layers="1",
                        num_decoder_layers="2", max_len="64"),
}
MAX_LEN = 32
NEW = 10


def _graph(family, level, **sets):
    return build(load_model(family, {**SMALL[family], **sets}), seed=3, level=level).graph


def _static_pair(family, level=3):
    enc = Session(to_onnx(_graph(family, level, part="encoder", use_cache="true")), providers="cpu")
    dec = Session(to_onnx(_graph(family, level, part="decoder", use_cache="true", kv_cache="static",
                                 cache_length=str(MAX_LEN))), providers="cpu")
    return enc, dec


def _request(enc, src, mask):
    out = enc.run({"input_ids": src, **({"attention_mask": mask} if "attention_mask" in enc.input_names else {})})
    return {**{k: v for k, v in out.items() if k.startswith("cross_attention.")}, "encoder_attention_mask": mask}


SRC = np.array([[3, 4, 5, 9, 11], [6, 7, 0, 0, 0]])
SRC_MASK = (SRC != 0).astype(np.int64)
TARGET = np.array([[0, 5, 8, 13, 2, 7], [0, 9, 1, 4, 4, 30]])


@pytest.mark.parametrize("family", ["t5", "bart", "mbart", "transformer"])
def test_static_decoder_logits_equal_uncached_logits_at_fixed_addresses(family):
    """Prefill of the start token, then one token per step into the same buffers: every step's
    logits equal the full uncached model's (a graph with no cache code), <= 1e-4; every bound
    buffer keeps its address and shape; past and present share one shape."""
    enc, dec = _static_pair(family)
    assert static_signature(dec.inputs, dec.outputs) is None
    shapes = {s.name: s.shape for s in dec.inputs + dec.outputs}
    assert shapes["present.1.key"] == shapes["past_key_values.1.key"]
    runner = StaticDecoder(dec, batch=2, max_length=MAX_LEN)
    runner.bind_request(_request(enc, SRC, SRC_MASK))
    got = [runner.prefill(TARGET[:, :1], [1, 1])]
    where, bound = runner.data_pointers(), runner.bound_shapes()
    for t in range(1, TARGET.shape[1]):
        got.append(runner.step(TARGET[:, t]))
        assert runner.data_pointers() == where and runner.bound_shapes() == bound
    full = Session(to_onnx(_graph(family, 0)), providers="cpu")
    feeds = {"input_ids": SRC, "decoder_input_ids": TARGET,
             **({"attention_mask": SRC_MASK} if "attention_mask" in full.input_names else {})}
    want = full.run(feeds)["logits"]
    for t, logits in enumerate(got):
        np.testing.assert_allclose(logits, want[:, t], rtol=1e-4, atol=1e-4, err_msg=f"{family} step {t}")


def test_t5_bias_rides_in_group_query_attention_and_the_numpy_kernel_agrees(tmp_path):
    """T5's relative bias goes into GroupQueryAttention as attention_bias [B, H, S, total] (no
    standard Attention over the buffer); the NumPy reference kernel (and the generated NumPy
    module) equals onnxruntime's on a prefill and a decode step."""
    g = _graph("t5", 2, part="decoder", use_cache="true", kv_cache="static", cache_length=str(MAX_LEN))
    gqa = [n for n in g.nodes if n.qualified_op == "com.microsoft.GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.inputs) == 11 and n.inputs[10] is not None for n in gqa)
    enc, _ = _static_pair("t5", 2)
    req = _request(enc, SRC, SRC_MASK)
    past = {v.name: np.zeros((2, 4, MAX_LEN, 8), np.float32) for v in g.inputs if v.name.startswith("past")}
    sess = Session(to_onnx(g), providers="cpu")
    feeds = {"input_ids": TARGET[:, :1], "attention_mask": np.ones((2, 1), np.int64), **req, **past}
    ref, ort_out = evaluate(g, feeds), sess.run(feeds)
    np.testing.assert_allclose(ref["logits"], ort_out["logits"], rtol=1e-4, atol=1e-5)
    past = {k.replace("present", "past_key_values"): v for k, v in ref.items() if k.startswith("present")}
    mask = np.zeros((2, MAX_LEN), np.int64)
    mask[:, :2] = 1
    step = {"input_ids": TARGET[:, 1:2], "attention_mask": mask, **req, **past}
    np.testing.assert_allclose(evaluate(g, step)["logits"], sess.run(step)["logits"], rtol=1e-4, atol=1e-5)
    from tgraph.codegen.numpy import load_numpy_module, write_numpy_module

    module = load_numpy_module(write_numpy_module(g, tmp_path / "t5_static.py"))    # the generated NumPy code too
    np.testing.assert_allclose(module.run(step)["logits"], sess.run(step)["logits"], rtol=1e-4, atol=1e-5)


def test_dynamic_cache_stays_an_option_and_generates_the_same_ids():
    static = Generator("t5", overrides=SMALL["t5"], provider="cpu")
    dynamic = Generator("t5", overrides=SMALL["t5"], provider="cpu", kv_cache="dynamic")
    assert static.static and not dynamic.static
    past = {s.name: s.shape for s in dynamic.decoder.inputs}["past_key_values.0.key"]
    assert past[2] == "past_seq"                              # the Concat cache grows along it
    assert {s.name: s.shape for s in static.decoder.inputs}["past_key_values.0.key"][2] == "max_length"
    a, b = static.generate([[3, 4, 5], [6]], max_new_tokens=NEW), dynamic.generate([[3, 4, 5], [6]], max_new_tokens=NEW)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    narrow = Generator("t5", overrides={**SMALL["t5"], "d_kv": "4"}, provider="cpu")     # head size 4: no kernel
    assert not narrow.static and "GroupQueryAttention" in narrow.cache_note
    assert len(narrow.generate([[3, 4, 5]], max_new_tokens=3).ids[0]) == 3


# ------------------------------------------------------------------ generation directories
def _bart_model():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=61, d_model=32, encoder_layers=1, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():                  # larger than HF's init, so greedy does not echo one token
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.3, 0.3)
            else:
                p.normal_(0, 1.0)
        model.final_logits_bias.uniform_(-1, 1)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encdec")
    out = {}
    for name, model in (("t5", _hf_model("t5")), ("bart", _bart_model())):
        model.save_pretrained(root / f"{name}-ckpt", safe_serialization=True)
        assert main(["export", str(root / f"{name}-ckpt"), "--task", "generate", "-o", str(root / name),
                     "--max-length", str(MAX_LEN)]) == 0
        out[name] = (model, root / name)
    sets = [a for k, v in SMALL["transformer"].items() for a in ("--set", f"{k}={v}")]
    assert main(["export", "transformer", *sets, "--seed", "3", "--task", "generate", "-o", str(root / "transformer"),
                 "--max-length", str(MAX_LEN)]) == 0
    out["transformer"] = (None, root / "transformer")
    return out


def test_directory_holds_encoder_and_decoder(dirs):
    _, out = dirs["t5"]
    names = {p.name for p in out.iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "tgraph.json"} <= names
    assert "genai_config.json" not in names and "model.onnx" not in names
    manifest = read_manifest(out)
    assert manifest["encoder_decoder"] and manifest["genai_config"] is None
    assert (manifest["model_file"], manifest["encoder_file"]) == ("decoder.onnx", "encoder.onnx")
    assert manifest["config"]["kv_cache"] == "static" and manifest["config"]["part"] == "decoder"
    assert manifest["max_length"] == MAX_LEN and manifest["special_ids"]["decoder_start"] == 0
    for f in ("encoder.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(out / f), full_check=True)
    enc = onnx.load(str(out / "encoder.onnx"), load_external_data=False)
    assert {o.name for o in enc.graph.output} >= {"cross_attention.0.key", "cross_attention.1.value"}


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_directory_greedy_matches_hf_and_never_traces(dirs, name, monkeypatch):
    import tgraph.api
    import tgraph.dsl

    model, out = dirs[name]

    def no_trace(*a, **k):
        raise AssertionError("a generation directory must not be traced")
    monkeypatch.setattr(tgraph.api, "build", no_trace)
    monkeypatch.setattr(tgraph.dsl, "trace", no_trace)
    if name == "t5":
        gen = Generator(str(out), provider="cpu")
        ref = hf_generate(model, PROMPTS, True, max_new_tokens=NEW, pad_token_id=0)
    else:                                   # eos off: the last position is the checkpoint's forced eos 2
        gen = Generator(str(out), provider="cpu", eos_token_id=None)
        ref = hf_generate(model, PROMPTS, True, max_new_tokens=NEW, pad_token_id=1, eos_token_id=None)
        assert (ref[:, -1] == 2).all()
    assert gen.static and gen.encoder is not None
    seen = []
    real_step = StaticDecoder.step

    def step(self, tokens):
        seen.append(self.data_pointers())
        return real_step(self, tokens)
    monkeypatch.setattr(StaticDecoder, "step", step)
    got = gen.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(got.tokens, ref)
    assert len(seen) == NEW - 1 and all(p == seen[0] for p in seen)     # one binding for the whole request
    for row in got.ids:                                                 # not a degenerate model
        assert len(set(row)) >= 3, row


def test_transformer_directory_matches_the_uncached_model(dirs):
    """No HF twin: a greedy loop over the full model (level 0) re-run on the whole prefix."""
    _, out = dirs["transformer"]
    prompts = [[3, 4, 5, 8], [6]]
    gen = Generator(str(out), provider="cpu", bos_token_id=7, pad_token_id=0)
    got = gen.generate(prompts, max_new_tokens=NEW)
    full = Session(to_onnx(_graph("transformer", 0)), providers="cpu")
    src = np.array([[3, 4, 5, 8], [6, 0, 0, 0]])
    seq = np.full((2, 1), 7)
    for _ in range(NEW):
        logits = full.run({"input_ids": src, "attention_mask": (src != 0).astype(np.int64),
                           "decoder_input_ids": seq})["logits"]
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(got.tokens, seq[:, 1:])
    # A tiny random post-LN Transformer with a tied head echoes its start token, so greedy ids
    # alone prove little: the directory's own sessions also give the uncached logits along a
    # teacher-forced target.
    runner = gen.static_decoder(2, TARGET.shape[1])
    runner.bind_request(_request(gen.encoder, SRC, SRC_MASK))
    logits = [runner.prefill(TARGET[:, :1], [1, 1])] + [runner.step(TARGET[:, t]) for t in range(1, TARGET.shape[1])]
    want = full.run({"input_ids": SRC, "attention_mask": SRC_MASK, "decoder_input_ids": TARGET})["logits"]
    np.testing.assert_allclose(np.stack(logits, axis=1), want, rtol=1e-4, atol=1e-4)


def test_cli_generate_reads_an_encoder_decoder_directory(dirs, capsys):
    _, out = dirs["t5"]
    assert main(["generate", str(out), "--prompt-ids", "5,17,3", "--max-new-tokens", "4", "--json",
                 "--provider", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"]) == 4


# ------------------------------------------------------------------ refusals
def test_refusals_are_one_line(dirs, tmp_path, capsys):
    _, out = dirs["t5"]
    with pytest.raises(ConfigError, match="fixed when exported"):
        Generator(str(out), overrides={"num_layers": "1"})
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((out / "tgraph.json").read_text())
    (broken / "tgraph.json").write_text(json.dumps({**manifest, "encoder_file": "../encoder.onnx"}))
    (broken / "decoder.onnx").write_bytes((out / "decoder.onnx").read_bytes())
    assert main(["generate", str(broken), "--prompt-ids", "5", "--provider", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "encoder_file '../encoder.onnx' is not a file in the directory" in err and "\n" not in err
    sets = [a for k, v in SMALL["t5"].items() for a in ("--set", f"{k}={v}")]
    assert main(["export", "t5", *sets, "--task", "generate", "--quantize", "int8", "-o", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--quantize is not supported for encoder-decoder" in err and "\n" not in err
    assert not (tmp_path / "q").exists()
    enc, dec = _static_pair("t5")
    with pytest.raises(ConfigError, match="bind_request first"):
        StaticDecoder(dec, batch=2, max_length=MAX_LEN).prefill(TARGET[:, :1], [1, 1])


def test_cuda_graphs_are_refused_for_per_request_inputs():
    plan = cuda_graph_plan("cuda", None, {"n": "CUDAExecutionProvider"}, per_request=["cross_attention.0.key"])
    assert not plan.enable and "cross_attention.0.key is rebound for every request" in plan.reason


def test_t5_rows_of_different_lengths_get_their_own_position_bias():
    """Decoder prefixes of different lengths (right-aligned rows at their own positions): each
    row's bias row follows its own valid length, so each row equals the full model on that row."""
    enc, dec = _static_pair("t5")
    runner = StaticDecoder(dec, batch=2, max_length=MAX_LEN)
    runner.bind_request(_request(enc, SRC, SRC_MASK))
    lengths, new = [4, 1], 3
    got = [runner.prefill(np.where(np.arange(4) < np.array(lengths)[:, None], TARGET[:, :4], 0), lengths)]
    for t in range(new - 1):
        got.append(runner.step(np.array([TARGET[b, n + t] for b, n in enumerate(lengths)])))
    full = Session(to_onnx(_graph("t5", 0)), providers="cpu")
    for b, n in enumerate(lengths):
        want = full.run({"input_ids": SRC[b:b + 1], "attention_mask": SRC_MASK[b:b + 1],
                         "decoder_input_ids": TARGET[b:b + 1, :n + new - 1]})["logits"][0]
        for t in range(new):
            np.testing.assert_allclose(got[t][b], want[n - 1 + t], rtol=1e-4, atol=1e-4, err_msg=f"row {b} step {t}")
