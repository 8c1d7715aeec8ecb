"""T5 checkpoints against Hugging Face transformers (T5ForConditionalGeneration, T5Model).

Tiny random HF models are saved as safetensors, loaded through tgraph's strict loader,
and compared on every backend (ONNX -O0/-O3 via onnxruntime, generated NumPy). Norm
weights are re-randomised before saving (HF initialises them to 1), so a swapped norm
cannot hide. The references come from the HF model reloaded from the saved directory,
so they show what HF itself makes of that checkpoint (head tying included).
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
from tgraph.dsl import InputSpec, Module, trace  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.ir import DType  # noqa: E402
from tgraph.ir.evaluate import evaluate  # noqa: E402
from tgraph.models.t5 import RelativePositionBias, T5Config, relative_position_bucket  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

T5Attention = transformers.models.t5.modeling_t5.T5Attention

# name -> (HF config kwargs, HF class, how the head is stored)
CONFIGS = {
    # T5 v1.0: relu FFN, tied head with d_model^-0.5 rescaling; max_distance < sequence length,
    # so the bias clipping beyond max_distance is exercised.
    "v1.0-tied": (dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=10,
                       feed_forward_proj="relu"), "T5ForConditionalGeneration", "tied"),
    # T5 v1.1: GeGLU, its own lm_head, inner width 6*16 = 96 != d_model 48, 3 decoder layers.
    "v1.1-untied": (dict(vocab_size=101, d_model=48, d_kv=16, d_ff=80, num_layers=2, num_decoder_layers=3,
                         num_heads=6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         layer_norm_epsilon=1e-5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                    "T5ForConditionalGeneration", "untied"),
    # transformers>=5 with tie_word_embeddings=False but no separate head: shared head, no rescaling.
    "gated-silu-noscale": (dict(vocab_size=89, d_model=40, d_kv=12, d_ff=56, num_layers=1, num_decoder_layers=2,
                                num_heads=3, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                                feed_forward_proj="gated-silu", tie_word_embeddings=False),
                           "T5ForConditionalGeneration", "tied"),
    # T5Model: no LM head, exact-GELU FFN.
    "base-gelu": (dict(vocab_size=53, d_model=32, d_kv=4, d_ff=48, num_layers=2, num_heads=5,
                       relative_attention_num_buckets=12, relative_attention_max_distance=16,
                       feed_forward_proj="gelu"), "T5Model", "none"),
}

SEQ, PAD_FROM, DEC = 13, 9, 7


def _make(name, directory: Path):
    kwargs, cls_name, head = CONFIGS[name]
    torch.manual_seed(0)
    config = transformers.T5Config(attn_implementation="eager", **kwargs)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
        if head == "untied":       # a genuinely separate head, as a converted v1.1 checkpoint has
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.save_pretrained(directory, safe_serialization=True)
    return getattr(transformers, cls_name).from_pretrained(directory, attn_implementation="eager").eval()


def _inputs(vocab, seed=0, decoder_mask=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (2, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, PAD_FROM:] = 0                       # a right-padded source row
    ids[1, PAD_FROM:] = 0
    feed = {"input_ids": ids, "attention_mask": mask,
            "decoder_input_ids": rng.integers(2, vocab, (2, DEC)).astype(np.int64)}
    if decoder_mask is not None:
        feed["decoder_attention_mask"] = decoder_mask
    return feed


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
    root = tmp_path_factory.mktemp("t5")
    made = {}
    for name in CONFIGS:
        made[name] = (root / name, _make(name, root / name))
    return made


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


# ---------------------------------------------------------------- relative position buckets
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 10), (16, 20), (12, 16), (32, 64), (64, 256)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_hf_and_saturate_beyond_max_distance(num_buckets, max_distance, bidirectional):
    r = np.arange(-3 * max_distance, 3 * max_distance + 1)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(r), bidirectional=bidirectional,
                                                num_buckets=num_buckets, max_distance=max_distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(r, bidirectional, num_buckets, max_distance), ref)
    # What the graph does: clip r to [-M, M] and look it up in the (2M+1)-entry table.
    table = relative_position_bucket(np.arange(-max_distance, max_distance + 1), bidirectional, num_buckets,
                                     max_distance)
    np.testing.assert_array_equal(table[np.clip(r, -max_distance, max_distance) + max_distance], ref)


class _BiasProbe(Module):
    """Only the bias, for independent query/key lengths."""

    def __init__(self, bidirectional):
        super().__init__()
        self.bias = RelativePositionBias(8, 3, 10, bidirectional)

    def forward(self, q, k):
        return self.bias(q.shape_of(1, 2).squeeze(0), k.shape_of(1, 2).squeeze(0))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_bias_graph_matches_hf_compute_bias(bidirectional):
    probe = _BiasProbe(bidirectional)
    graph = trace(probe, {"q": InputSpec(DType.int64, (1, "tq")), "k": InputSpec(DType.int64, (1, "tk"))})
    assert graph.outputs[0].type.shape == (1, 3, "tq", "tk")
    weight = graph.constants["bias.weight"].const
    hf_config = transformers.T5Config(num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=10,
                                      is_decoder=not bidirectional)
    hf = T5Attention(hf_config, has_relative_attention_bias=True, layer_idx=0)
    with torch.no_grad():
        hf.relative_attention_bias.weight.copy_(torch.from_numpy(weight))
        for tq, tk in [(5, 5), (3, 17), (25, 2), (1, 1)]:
            got = evaluate(graph, {"q": np.zeros((1, tq), np.int64), "k": np.zeros((1, tk), np.int64)})["output"]
            np.testing.assert_array_equal(got, hf.compute_bias(tq, tk).numpy())


# ---------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_hf_on_every_backend(checkpoints, name):
    directory, hf_model = checkpoints[name]
    loaded = load_model(str(directory))
    _, _, head = CONFIGS[name]
    assert loaded.config.lm_head == (head != "none")
    if head != "none":
        assert loaded.config.tie_word_embeddings == (head == "tied")
        assert loaded.config.scales_decoder_output == (name == "v1.0-tied")
    feed = _inputs(loaded.config.vocab_size)
    errors = check_all_backends(loaded, feed, _reference(hf_model, feed))
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})


def test_padded_row_equals_unpadded_row(checkpoints):
    directory, _ = checkpoints["v1.1-untied"]
    graph = build(load_model(str(directory)), 0)
    feed = _inputs(101)
    padded = run_onnx(graph, feed)
    alone = run_onnx(graph, {"input_ids": feed["input_ids"][1:, :PAD_FROM],
                             "attention_mask": feed["attention_mask"][1:, :PAD_FROM],
                             "decoder_input_ids": feed["decoder_input_ids"][1:]})
    assert rel_err(padded["logits"][1:], alone["logits"]) < 1e-5
    assert rel_err(padded["encoder_last_hidden_state"][1:, :PAD_FROM], alone["encoder_last_hidden_state"]) < 1e-5


def test_legacy_untied_config_reads_the_same(checkpoints, tmp_path):
    """transformers 4 wrote tie_word_embeddings=false (and no scale_decoder_outputs) for v1.1."""
    directory, hf_model = checkpoints["v1.1-untied"]

    def legacy(config):
        config.pop("scale_decoder_outputs", None)
        config["tie_word_embeddings"] = False
    loaded = load_model(str(_copy(directory, tmp_path / "legacy", edit_config=legacy)))
    assert not loaded.config.tie_word_embeddings and not loaded.config.scales_decoder_output
    feed = _inputs(101)
    check_all_backends(loaded, feed, _reference(hf_model, feed), levels=(0,), numpy_level=None)


def test_decoder_attention_mask_left_padding(checkpoints):
    directory, hf_model = checkpoints["v1.0-tied"]
    loaded = load_model(str(directory), {"use_decoder_attention_mask": "true"})
    dmask = np.ones((2, DEC), np.int64)
    dmask[1, :2] = 0                             # a left-padded target row
    feed = _inputs(97, decoder_mask=dmask)
    ref = _reference(hf_model, feed)["logits"]
    real = dmask.astype(bool)
    for outs in (run_onnx(build(loaded, 0), feed), run_numpy(build(loaded, 3), feed)):
        assert rel_err(outs["logits"][real], ref[real]) < 1e-4
    # and the mask matters: without it the real positions of row 1 differ
    plain = run_onnx(build(load_model(str(directory)), 0), {k: v for k, v in feed.items()
                                                               if k != "decoder_attention_mask"})
    assert rel_err(plain["logits"][1, 2:], ref[1, 2:]) > 1e-3


def test_stack_embedding_copies_and_unused_cross_bias_are_accepted(checkpoints, tmp_path):
    directory, hf_model = checkpoints["v1.0-tied"]

    def add_copies(w):
        w["encoder.embed_tokens.weight"] = w["shared.weight"].copy()
        w["decoder.embed_tokens.weight"] = w["shared.weight"].copy()
        w["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.ones((8, 4), np.float32)
    loaded = load_model(str(_copy(directory, tmp_path / "copies", edit_weights=add_copies)))
    feed = _inputs(97)
    check_all_backends(loaded, feed, _reference(hf_model, feed), levels=(0,), numpy_level=None)


def test_registered_family_builds_with_overrides():
    loaded = load_model("t5", {"vocab_size": "53", "d_model": "16", "d_kv": "4", "num_heads": "2", "d_ff": "24",
                               "num_layers": "1", "feed_forward_proj": "gated-gelu"})
    graph = build(loaded, 0)
    shapes = {v.name: v.type.shape for v in graph.outputs}
    assert shapes == {"logits": ("batch", "decoder_seq", 53), "encoder_last_hidden_state": ("batch", "seq", 16)}
    assert graph.op_histogram()["tgraph.CausalMask"] == 1 and graph.op_histogram()["Range"] == 4


# ---------------------------------------------------------------- strict loading and refusals
def _drop(name):
    return lambda w: w.pop(name)


@pytest.mark.parametrize("edit,needle", [
    (_drop("encoder.block.1.layer.1.DenseReluDense.wo.weight"), "encoder.block.1.layer.1.DenseReluDense.wo.weight"),
    (_drop("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (lambda w: w.__setitem__("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
                             np.zeros((8, 4), np.float32)),
     "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (lambda w: w.__setitem__("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                             np.zeros((9, 4), np.float32)),
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (lambda w: w.__setitem__("encoder.embed_tokens.weight", w["shared.weight"] + 1), "encoder.embed_tokens.weight"),
], ids=["missing", "missing-bias", "unexpected-bias-in-block-1", "misshaped", "different-embedding-copy"])
def test_strict_loading_names_the_tensor(checkpoints, tmp_path, edit, needle):
    directory, _ = checkpoints["v1.0-tied"]
    bad = _copy(directory, tmp_path / "bad", edit_weights=edit)
    with pytest.raises(CheckpointError) as info:
        load_model(str(bad))
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(feed_forward_proj="gated-tanh"), "feed_forward_proj='gated-tanh'"),
    (lambda c: c.update(dense_act_fn="gelu"), "dense_act_fn='gelu'"),
    (lambda c: c.update(is_gated_act=True), "is_gated_act=True"),
    (lambda c: c.update(architectures=["T5ForSequenceClassification"]), "T5ForSequenceClassification"),
    (lambda c: c.update(relative_attention_max_distance=3), "relative_attention_max_distance"),
], ids=["feed-forward", "act", "gated", "architecture", "max-distance"])
def test_unsupported_config_is_refused(checkpoints, tmp_path, edit, needle):
    directory, _ = checkpoints["v1.0-tied"]
    bad = _copy(directory, tmp_path / "bad", edit_config=edit)
    with pytest.raises(ConfigError) as info:
        load_model(str(bad))
    assert needle in str(info.value) and "t5" in str(info.value)


@pytest.mark.parametrize("kwargs,field", [
    (dict(d_kv=0), "d_kv"),
    (dict(relative_attention_num_buckets=3), "relative_attention_num_buckets"),
    (dict(relative_attention_num_buckets=32, relative_attention_max_distance=16), "relative_attention_max_distance"),
    (dict(feed_forward_proj="swiglu"), "feed_forward_proj"),
    (dict(num_decoder_layers=0), "num_decoder_layers"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        T5Config(**kwargs)
