"""XLNet (XLNetModel / XLNetLMHeadModel, content stream) against Hugging Face transformers.

Random-initialised odd configs (d_head 8 and 14, 5 and 3 heads, three segment ids, clamped
distances, tied and untied heads) saved with `save_pretrained`, scrambled to weights large
enough that a wrong position or segment term moves the outputs; batches with a right-padded
and a left-padded row, compared at every position (pad queries included: HF lets them see
themselves) on ONNX -O0/-O3 and NumPy -O3.
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_harness import build, check_all_backends, rel_err, run_onnx  # noqa: E402
from tgraph.errors import ConfigError  # noqa: E402
from tgraph.models.xlnet import config_from_hf  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

CASES = {
    # LM head tied to the embedding, exact GELU, 5 heads of 8
    "lm-tied": (transformers.XLNetLMHeadModel,
                dict(vocab_size=91, d_model=40, n_layer=2, n_head=5, d_inner=56, ff_activation="gelu")),
    # untied LM head, tanh GELU, 3 heads of 14, distances clamped to ±4 (shorter than the inputs)
    "lm-untied-clamped": (transformers.XLNetLMHeadModel,
                          dict(vocab_size=67, d_model=42, n_layer=2, n_head=3, d_inner=50, ff_activation="gelu_new",
                               clamp_len=4, tie_word_embeddings=False, layer_norm_eps=1e-5)),
    # causal (uni) attention: distances T .. 0, keys j <= i; 4 heads of 6
    "lm-uni": (transformers.XLNetLMHeadModel,
               dict(vocab_size=71, d_model=24, n_layer=2, n_head=4, d_inner=36, attn_type="uni")),
    # the bare encoder, ReLU, a memory length set (it only shapes the mems HF returns)
    "base-relu": (transformers.XLNetModel,
                  dict(vocab_size=53, d_model=24, n_layer=3, n_head=3, d_inner=40, ff_activation="relu", mem_len=7)),
}


def _scramble(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim >= 2 or "bias" not in name else 0.1))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (cls, kw) in CASES.items():
        torch.manual_seed(0)
        model = _scramble(cls(transformers.XLNetConfig(**kw)).eval())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (str(path), model)
    return out


def _inputs(vocab, seq, seed=0, segments=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, seq)).astype(np.int64)
    mask = np.ones((3, seq), np.int64)
    mask[1, seq - 3:] = 0                               # right-padded
    mask[2, :4] = 0                                     # left-padded
    out = {"input_ids": ids, "attention_mask": mask}
    if segments:
        tt = np.zeros((3, seq), np.int64)
        tt[:, seq // 2:] = 1
        tt[:, -1] = 2                                   # XLNet's tokenizer puts <cls> in segment 2
        out["token_type_ids"] = tt
    return out


def _hf(model, inputs):
    if model.config.attn_type == "uni" and len(inputs["input_ids"]) > 1:
        # HF's uni mask is updated in place (`attn_mask += data_mask`) and cannot broadcast over a
        # batch with an attention_mask: its reference is computed row by row
        rows = [_hf(model, {k: v[i:i + 1] for k, v in inputs.items()}) for i in range(len(inputs["input_ids"]))]
        return np.concatenate(rows, 0)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.logits.numpy() if hasattr(out, "logits") else out.last_hidden_state.numpy()


PARITY = [(name, 23) for name in CASES] + [("lm-tied", 1), ("lm-tied", 8)]       # one token: a 1 x 2 shift


@pytest.mark.parametrize("name, seq", PARITY, ids=[f"{n}-T{t}" for n, t in PARITY])
def test_matches_transformers(checkpoints, name, seq):
    path, model = checkpoints[name]
    loaded = load_model(path)
    inputs = _inputs(loaded.config.vocab_size, seq, seed=seq)
    output = "logits" if loaded.config.head == "lm" else "last_hidden_state"
    check_all_backends(loaded, inputs, {output: _hf(model, inputs)})


def test_without_token_type_ids_matches_hf_called_without_them(checkpoints):
    """HF with no token_type_ids has no segment term; with segments it differs (the term matters)."""
    path, model = checkpoints["lm-tied"]
    loaded = load_model(path, {"use_token_type_ids": "false"})
    assert "token_type_ids" not in loaded.module.input_specs()
    inputs = _inputs(91, 11, segments=False)
    ref = _hf(model, inputs)
    check_all_backends(loaded, inputs, {"logits": ref})
    assert rel_err(_hf(model, _inputs(91, 11)), ref) > 1e-2


def test_configs_mapped_as_intended(checkpoints):
    c = load_model(checkpoints["lm-untied-clamped"][0]).config
    assert (c.num_heads, c.d_head, c.clamp_len, c.tie_word_embeddings, c.ff_activation, c.head) == \
        (3, 14, 4, False, "gelu_tanh", "lm")
    c = load_model(checkpoints["base-relu"][0]).config
    assert (c.head, c.num_layers, c.ff_activation) == ("base", 3, "relu")


@pytest.mark.parametrize("name", list(CASES))
def test_every_attention_fused_at_O2(checkpoints, name):
    """The content, position and segment terms become one Attention-23 per layer: the position
    and segment scores are its additive mask."""
    path, _ = checkpoints[name]
    loaded = load_model(path)
    hist = build(loaded, level=2).op_histogram()
    assert hist.get("Attention") == loaded.config.num_layers and "Softmax" not in hist, hist


def test_gather_is_hf_rel_shift():
    """HF's rel_shift_bnij (reshape, drop a row, reshape, keep T columns) against the
    GatherElements index T - i + j, on random [B, H, T, 2T] scores."""
    from transformers.models.xlnet.modeling_xlnet import XLNetRelativeAttention

    rng = np.random.default_rng(0)
    for t in (1, 2, 7):
        x = rng.standard_normal((2, 3, t, 2 * t)).astype(np.float32)
        ref = XLNetRelativeAttention.rel_shift_bnij(torch.from_numpy(x), klen=t).numpy()
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        np.testing.assert_array_equal(np.take_along_axis(x, np.broadcast_to(t - i + j, (2, 3, t, t)), axis=3), ref)


def test_real_tokens_do_not_depend_on_padding(checkpoints):
    """Relative positions: a row's real tokens give the same outputs left- or right-padded."""
    graph = build(load_model(checkpoints["lm-tied"][0]), level=3)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 91, (1, 6)).astype(np.int64)
    alone = run_onnx(graph, {"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64),
                             "token_type_ids": np.zeros((1, 6), np.int64)})["logits"][0]
    pad = np.zeros((1, 3), np.int64)
    batch = np.concatenate([np.concatenate([ids, pad], 1), np.concatenate([pad, ids], 1)], 0)
    mask = np.array([[1] * 6 + [0] * 3, [0] * 3 + [1] * 6], np.int64)
    out = run_onnx(graph, {"input_ids": batch, "attention_mask": mask,
                           "token_type_ids": np.zeros((2, 9), np.int64)})["logits"]
    np.testing.assert_allclose(out[0, :6], alone, atol=2e-5)
    np.testing.assert_allclose(out[1, 3:], alone, atol=2e-5)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("changes, message", [
    ({"attn_type": "uni", "same_length": True}, "same_length=True is not supported"),
    ({"attn_type": "tri"}, "attn_type='tri' is not supported"),
    ({"bi_data": True}, "bi_data=True is not supported"),
    ({"ff_activation": "gelu_fast"}, "ff_activation='gelu_fast' is not supported"),
    ({"architectures": ["XLNetForSequenceClassification"]},
     "architectures='XLNetForSequenceClassification' is not supported"),
    ({"d_head": 9}, "d_head=9 is not d_model // n_head (8)"),
    ({"architectures": "XLNetModel"}, "architectures='XLNetModel' is not a list of class names"),
])
def test_unsupported_options_are_refused(checkpoints, tmp_path, changes, message):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["lm-tied"][0], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_model(str(dst))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_sizes_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"xlnet: d_model \(40\) is not divisible by num_heads \(3\)"):
        config_from_hf({"model_type": "xlnet", "d_model": 40, "n_head": 3, "n_layer": 1, "d_inner": 8,
                        "vocab_size": 10})
    with pytest.raises(ConfigError, match=r"xlnet: num_layers must be an integer"):
        config_from_hf({"model_type": "xlnet", "d_model": 40, "n_head": 4, "n_layer": "2", "d_inner": 8,
                        "vocab_size": 10})
