"""BART and mBART checkpoints against Hugging Face transformers.

Tiny random HF models (BartForConditionalGeneration tied and untied, BartModel,
MBartForConditionalGeneration), saved with `save_pretrained`, loaded through tgraph's strict
loader and compared on every backend (ONNX -O0/-O3 via onnxruntime, generated NumPy) on a
batch with a full, a right-padded and a left-padded source row. Every LayerNorm weight and
bias and the final_logits_bias are re-randomised before saving (HF initialises them to 1/0),
so a swapped or missing one cannot hide. The cached decoder (self-attention K/V cached,
cross-attention K/V computed once by the encoder) is checked step by step against the full
model, and greedy generation against HF's `generate`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from model_harness import build, check_all_backends, rel_err, run_numpy, run_onnx  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

COMMON = dict(max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
# name -> (HF config class, kwargs, HF model class)
CONFIGS = {
    # post-LN, exact GELU, scaled embeddings, tied head; encoder and decoder differ in heads and widths
    "bart-tied": ("BartConfig", dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=48,
                                     decoder_ffn_dim=40, activation_function="gelu", scale_embedding=True),
                  "BartForConditionalGeneration"),
    # tie_word_embeddings=false: the encoder, the decoder and the head each have their own table
    "bart-untied-relu": ("BartConfig", dict(vocab_size=89, d_model=24, encoder_layers=1, decoder_layers=2,
                                            encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=36,
                                            decoder_ffn_dim=36, activation_function="relu",
                                            tie_word_embeddings=False),
                         "BartForConditionalGeneration"),
    # no head: the decoder's last_hidden_state
    "bart-model": ("BartConfig", dict(vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=40,
                                      decoder_ffn_dim=56, activation_function="gelu_new"), "BartModel"),
    # mBART: pre-LN blocks, a final LayerNorm per stack
    "mbart": ("MBartConfig", dict(vocab_size=101, d_model=40, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=5, decoder_attention_heads=5, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, activation_function="gelu", scale_embedding=True),
              "MBartForConditionalGeneration"),
}
SEQ, DEC = 11, 7


def _hf_config(name, **extra):
    cls, kwargs, _ = CONFIGS[name]
    return getattr(transformers, cls)(attn_implementation="eager", **{**COMMON, **kwargs, **extra})


def _make(name, directory: Path, std=None, bias=1.0, **extra):
    """`std`: re-draw every other weight from N(0, std); `bias`: the range of the LayerNorm biases
    (0.3 ·) and the final_logits_bias (1 ·)."""
    _, _, cls_name = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(_hf_config(name, **extra)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname or "layernorm" in pname:
                p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.uniform_(-0.3 * bias, 0.3 * bias)
            elif std is not None:
                p.normal_(0, std)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.uniform_(-bias, bias)
    model.save_pretrained(directory, safe_serialization=True)
    return getattr(transformers, cls_name).from_pretrained(directory, attn_implementation="eager").eval()


def _inputs(vocab, seed=0):
    """Row 0 full, row 1 right-padded (5 real tokens), row 2 left-padded (4 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": rng.integers(3, vocab, (3, DEC)).astype(np.int64)}


def _reference(model, feed):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    ref = {"encoder_last_hidden_state": out.encoder_last_hidden_state.numpy()}
    if hasattr(out, "logits"):
        ref["logits"] = out.logits.numpy()
    else:
        ref["last_hidden_state"] = out.last_hidden_state.numpy()
    return ref


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bart")
    return {name: (root / name, _make(name, root / name)) for name in CONFIGS}


def _copy(src: Path, dst: Path, edit_weights=None, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_weights is not None:
        weights = load_file(dst / "model.safetensors")
        edit_weights(weights)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


# ---------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_hf_on_every_backend(checkpoints, name):
    directory, hf_model = checkpoints[name]
    loaded = load_model(str(directory))
    c = loaded.config
    assert c.normalize_before == (name == "mbart")
    assert c.lm_head == (name != "bart-model")
    assert c.shared_embeddings == c.tie_word_embeddings == (name != "bart-untied-relu")
    feed = _inputs(c.vocab_size)
    errors = check_all_backends(loaded, feed, _reference(hf_model, feed))
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})


def test_every_attention_fuses_at_O2(checkpoints):
    for name in ("bart-tied", "mbart"):
        loaded = load_model(str(checkpoints[name][0]))
        c = loaded.config
        hist = build(loaded, 2).op_histogram()
        assert hist.get("Attention") == c.encoder_layers + 2 * c.decoder_layers, (name, hist)
        assert "Softmax" not in hist and "tgraph.CausalMask" not in hist
        layer_norms = 2 * c.encoder_layers + 3 * c.decoder_layers + 2 + 2 * c.normalize_before
        assert hist.get("LayerNormalization") == layer_norms and hist.get("Gelu") == c.encoder_layers + c.decoder_layers


def test_position_offset_is_read(checkpoints, tmp_path):
    """Position p reads row p + 2: rows 0 and 1 of the table are never read, row 2 is position 0."""
    directory, _ = checkpoints["bart-tied"]
    feed = _inputs(97)
    base = run_onnx(build(load_model(str(directory)), 0), feed)["logits"]

    def set_rows(rows, n):
        def edit(w):
            for stack in ("encoder", "decoder"):
                w[f"model.{stack}.embed_positions.weight"][rows] = 5.0
        return load_model(str(_copy(directory, tmp_path / n, edit_weights=edit)))
    unread = run_onnx(build(set_rows([0, 1], "unread"), 0), feed)["logits"]
    first = run_onnx(build(set_rows([2], "first"), 0), feed)["logits"]
    assert rel_err(unread, base) == 0.0 and rel_err(first, base) > 1e-2


def test_decoder_attention_mask_left_padding(checkpoints):
    directory, hf_model = checkpoints["bart-tied"]
    loaded = load_model(str(directory), {"use_decoder_attention_mask": "true"})
    feed = _inputs(97)
    dmask = np.ones((3, DEC), np.int64)
    dmask[1, :2] = 0                             # a left-padded target row
    feed["decoder_attention_mask"] = dmask
    ref = _reference(hf_model, feed)["logits"]
    real = dmask.astype(bool)                    # padded query rows: HF averages all keys, we give 0
    for outs in (run_onnx(build(loaded, 0), feed), run_numpy(build(loaded, 3), feed)):
        assert rel_err(outs["logits"][real], ref[real]) < 1e-4


def test_padded_source_row_equals_the_row_alone(checkpoints):
    directory, _ = checkpoints["mbart"]
    graph = build(load_model(str(directory)), 0)
    feed = _inputs(101)
    padded = run_onnx(graph, feed)
    alone = run_onnx(graph, {"input_ids": feed["input_ids"][1:2, :5], "attention_mask": feed["attention_mask"][1:2, :5],
                             "decoder_input_ids": feed["decoder_input_ids"][1:2]})
    assert rel_err(padded["logits"][1:2], alone["logits"]) < 1e-5


# ---------------------------------------------------------------- KV cache
def _runner(graph, numpy_backend=False):
    if numpy_backend:
        import tempfile

        from tgraph.codegen.numpy import load_numpy_module, write_numpy_module

        module = load_numpy_module(write_numpy_module(graph, Path(tempfile.mkdtemp(prefix="bart-")) / "m.py"))
        names = [v.name for v in graph.inputs]
        return lambda feed: module.run({k: feed[k] for k in names})
    return lambda feed: run_onnx(graph, feed)


@pytest.mark.parametrize("name", ["bart-untied-relu", "mbart"])
def test_cached_decoding_matches_the_full_model(checkpoints, name):
    """The encoder (part=encoder, use_cache) returns the cross-attention K/V once; the cached
    decoder reads them and never sees the encoder states, then prefill 2 + one token a step."""
    directory, _ = checkpoints[name]
    c = load_model(str(directory)).config
    feed = _inputs(c.vocab_size, seed=1)
    ref = run_onnx(build(load_model(str(directory)), 0), feed)["logits"]
    encoder = run_onnx(build(load_model(str(directory), {"part": "encoder", "use_cache": "true"}), 2),
                       {k: feed[k] for k in ("input_ids", "attention_mask")})
    cross = {k: v for k, v in encoder.items() if k.startswith("cross_attention.")}
    assert len(cross) == 2 * c.decoder_layers
    head_dim = c.d_model // c.decoder_attention_heads
    assert cross["cross_attention.0.key"].shape == (3, c.decoder_attention_heads, SEQ, head_dim)
    tgt = feed["decoder_input_ids"]
    for level, numpy_backend in ((0, False), (2, False), (2, True)):
        graph = build(load_model(str(directory), {"part": "decoder", "use_cache": "true"}), level)
        names = {v.name for v in graph.inputs}
        assert "encoder_hidden_states" not in names and "cross_attention.1.value" in names
        if level == 2:              # self- and cross-attention of every layer fused; no K/V projection of the states
            assert graph.op_histogram().get("Attention") == 2 * c.decoder_layers
        run = _runner(graph, numpy_backend)
        past = {v.name: np.zeros((3, v.type.shape[1], 0, v.type.shape[3]), np.float32)
                for v in graph.inputs if v.name.startswith("past_key_values.")}
        logits = []
        for a, b in [(0, 2)] + [(t, t + 1) for t in range(2, DEC)]:
            out = run({"input_ids": tgt[:, a:b], "encoder_attention_mask": feed["attention_mask"], **cross, **past})
            logits.append(out["logits"])
            past = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")}
        assert rel_err(np.concatenate(logits, axis=1), ref) < 1e-4, (level, numpy_backend)


# ---------------------------------------------------------------- generation
# Larger weights than HF's init, so greedy decoding does not repeat one token forever (tiny
# random post-LN models with a tied head mostly echo their last token; these two do not).
GENERATION = {"bart-untied-relu": dict(std=1.0), "mbart": dict(std=0.5)}


def _hf_greedy(model, prompts, new, **kw):
    ids = np.ones((len(prompts), max(map(len, prompts))), np.int64)       # right-padded with pad id 1
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    with torch.no_grad():
        return model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                              num_beams=1, max_new_tokens=new, min_length=0, **kw).numpy()[:, 1:]


@pytest.mark.parametrize("name", list(GENERATION))
def test_greedy_matches_hf_generate(tmp_path, name):
    from tgraph.generate import Generator

    model = _make(name, tmp_path / name, **GENERATION[name])
    prompts = [[0, 5, 17, 33, 44, 9, 28, 13, 2], [0, 31, 60, 2]]
    # eos off: only the last position is the forced eos (the checkpoint's forced_eos_token_id=2)
    ref = _hf_greedy(model, prompts, 12, eos_token_id=None)
    gen = Generator(str(tmp_path / name), provider="cpu", eos_token_id=None)
    assert any(n.startswith("cross_attention.") for n in gen.encoder.output_names)
    assert "encoder_hidden_states" not in gen.decoder.input_names       # cross K/V come from the encoder, once
    got = gen.generate(prompts, max_new_tokens=12)
    assert ref.shape == (2, 12)
    np.testing.assert_array_equal(got.tokens, ref)
    assert (got.tokens[:, -1] == 2).all()
    for row in got.ids:                          # the argmax moves: not one token forever
        assert len(set(row[:-1])) >= 2, row
    # the checkpoint's own special ids: eos 2 ends a row, and the last allowed token is forced to 2
    ref = _hf_greedy(model, prompts, 5)
    got = Generator(str(tmp_path / name), provider="cpu").generate(prompts, max_new_tokens=5)
    np.testing.assert_array_equal(got.tokens, ref)
    assert [row[-1] for row in got.ids] == [2, 2] and got.ids[0][:4] == got.tokens[0, :4].tolist()


# ---------------------------------------------------------------- strict loading and refusals
@pytest.mark.parametrize("edit,needle", [
    (lambda w: w.pop("model.decoder.layers.1.encoder_attn.k_proj.bias"), "decoder.layers.1.encoder_attn.k_proj.bias"),
    (lambda w: w.pop("model.encoder.layernorm_embedding.weight"), "encoder.layernorm_embedding.weight"),
    (lambda w: w.__setitem__("model.encoder.layer_norm.weight", np.ones(32, np.float32)),
     "model.encoder.layer_norm.weight"),
    (lambda w: w.__setitem__("model.encoder.embed_positions.weight", np.zeros((40, 32), np.float32)),
     "model.encoder.embed_positions.weight"),
], ids=["missing", "missing-embedding-norm", "unexpected-final-norm", "positions-without-offset"])
def test_strict_loading_names_the_tensor(checkpoints, tmp_path, edit, needle):
    directory, _ = checkpoints["bart-tied"]
    with pytest.raises(CheckpointError) as info:
        load_model(str(_copy(directory, tmp_path / "bad", edit_weights=edit)))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_stack_copies_of_the_shared_table_are_accepted(checkpoints, tmp_path):
    """Older checkpoints store the tied table three times (shared, encoder, decoder)."""
    directory, hf_model = checkpoints["bart-tied"]

    def copies(w):
        for stack in ("encoder", "decoder"):
            w[f"model.{stack}.embed_tokens.weight"] = w["model.shared.weight"].copy()
    loaded = load_model(str(_copy(directory, tmp_path / "copies", edit_weights=copies)))
    assert loaded.config.shared_embeddings and loaded.config.tie_word_embeddings
    feed = _inputs(97)
    check_all_backends(loaded, feed, _reference(hf_model, feed), levels=(0,), numpy_level=None)


def test_stack_tables_with_a_head_tied_to_a_third_table_are_refused(checkpoints, tmp_path):
    directory, _ = checkpoints["bart-tied"]

    def own_tables(w):
        w["model.encoder.embed_tokens.weight"] = w["model.shared.weight"] + 1
        w["model.decoder.embed_tokens.weight"] = w["model.shared.weight"] - 1
    with pytest.raises(CheckpointError, match="their own token tables but the head is tied"):
        load_model(str(_copy(directory, tmp_path / "three", edit_weights=own_tables)))


def test_missing_final_logits_bias_means_none(checkpoints, tmp_path):
    directory, hf_model = checkpoints["bart-tied"]
    loaded = load_model(str(_copy(directory, tmp_path / "nobias", edit_weights=lambda w: w.pop("final_logits_bias"))))
    assert not loaded.config.final_logits_bias
    feed = _inputs(97)
    ref = _reference(hf_model, feed)["logits"] - hf_model.final_logits_bias.numpy()
    assert rel_err(run_onnx(build(loaded, 0), feed)["logits"], ref) < 1e-4


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(activation_function="gelu_fast"), "activation_function='gelu_fast'"),
    (lambda c: c.update(architectures=["BartForSequenceClassification"]), "BartForSequenceClassification"),
    (lambda c: c.update(normalize_before=True), "normalize_before=True"),
    (lambda c: c.update(add_final_layer_norm=True), "add_final_layer_norm=True"),
    (lambda c: c.update(static_position_embeddings=True), "static_position_embeddings=True"),
    (lambda c: c.update(add_bias_logits=True), "add_bias_logits=True"),
    (lambda c: c.update(normalize_embedding=False), "normalize_embedding=False"),
], ids=["act", "architecture", "pre-ln", "final-norm", "sinusoidal", "bias-logits", "no-embedding-norm"])
def test_unsupported_config_is_refused(checkpoints, tmp_path, edit, needle):
    directory, _ = checkpoints["bart-tied"]
    with pytest.raises(ConfigError) as info:
        load_model(str(_copy(directory, tmp_path / "bad", edit_config=edit)))
    assert needle in str(info.value) and "bart" in str(info.value)


@pytest.mark.parametrize("overrides,needle", [
    (dict(encoder_attention_heads="5"), "encoder_attention_heads"),
    (dict(activation_function="tanh"), "activation_function"),
    (dict(use_cache="true"), "--set use_cache=true needs --set part=decoder or --set part=encoder"),
    (dict(layer_norm_eps="0"), "layer_norm_eps"),
])
def test_config_validation_names_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_model("bart", {"d_model": "32", **overrides})


def test_registered_families_build():
    small = {"vocab_size": "53", "d_model": "16", "encoder_layers": "1", "decoder_layers": "1",
             "encoder_attention_heads": "2", "decoder_attention_heads": "2", "encoder_ffn_dim": "24",
             "decoder_ffn_dim": "24", "max_position_embeddings": "32"}
    for family, layer_norms in (("bart", 7), ("mbart", 9)):
        graph = build(load_model(family, small), 2)
        shapes = {v.name: v.type.shape for v in graph.outputs}
        assert shapes == {"logits": ("batch", "decoder_seq", 53), "encoder_last_hidden_state": ("batch", "seq", 16)}
        assert graph.op_histogram()["LayerNormalization"] == layer_norms, family


def test_float16_matches_hf_float32(checkpoints):
    """--dtype float16: half weights and compute (norm statistics and softmax in float32)."""
    directory, hf_model = checkpoints["mbart"]
    loaded = load_model(str(directory))
    feed = _inputs(101)
    ref = _reference(hf_model, feed)["logits"]
    from tgraph.api import build as api_build

    graph = api_build(loaded, level=2, dtype="float16").graph
    assert graph.op_histogram().get("Attention") == 6
    for backend in (run_onnx, run_numpy):
        got = backend(graph, feed)["logits"]
        assert got.dtype == np.float16 and rel_err(got, ref) < 1e-2, backend.__name__
