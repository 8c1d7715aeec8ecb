"""LLaMA family against Hugging Face transformers (llama, qwen2, mistral checkpoints).

Each HF model is random-initialised from a tiny config, saved as safetensors, loaded through
`tgraph.sources.load_model`, and its logits compared on every backend. A right-padded row
in the batch checks the attention mask; the refusal tests check that options we do not
implement are named, not ignored.
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_harness import build, check_all_backends, run_onnx  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.models.llama import config_from_hf  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

ERRORS = {}          # config id -> {backend: relative error}, printed at the end with -s


def _llama(**kw):
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64)
    base.update(kw)
    return transformers.LlamaConfig(**base)


HF_CONFIGS = {
    # grouped-query attention (4 heads over 2 KV heads), untied head, rope_theta away from the default
    "llama-gqa-untied": lambda: _llama(rope_theta=500.0),
    # plain multi-head attention, tied head, head_dim (16) != hidden/heads (8), biases everywhere
    "llama-mha-tied-headdim": lambda: _llama(vocab_size=101, hidden_size=32, intermediate_size=72,
                                             num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
                                             attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6),
    # Qwen2: q/k/v biases but no output bias, multi-query attention
    "qwen2-biased-mqa": lambda: transformers.Qwen2Config(
        vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=64,
        use_sliding_window=False),
    # Mistral with no sliding window is exactly LLaMA
    "mistral-full-attention": lambda: transformers.MistralConfig(
        vocab_size=83, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, max_position_embeddings=64, tie_word_embeddings=False),
}


def scramble(model):
    """Replace HF's std-0.02 init with weights large enough that attention is far from uniform,
    so a rotary or masking mistake moves the logits well past the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """config id -> (directory, HF model), each saved once."""
    out = {}
    for name, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        cfg = make()
        cfg._attn_implementation = "eager"
        model = scramble(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


def _inputs(vocab, batch=2, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 2:] = 0                               # second row right-padded by two tokens ...
    mask[1, 2] = 0                                      # ... and a hole, so the mask matters under causality
    return {"input_ids": ids, "attention_mask": mask}


def _hf_logits(model, inputs):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(inputs["input_ids"]),
                    attention_mask=torch.from_numpy(inputs["attention_mask"]))
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_matches_transformers(checkpoints, name):
    path, hf_model = checkpoints[name]
    loaded = load_model(str(path))
    inputs = _inputs(loaded.config.vocab_size)
    ref = _hf_logits(hf_model, inputs)
    ERRORS[name] = check_all_backends(loaded, inputs, {"logits": ref})


def test_configs_mapped_as_intended(checkpoints):
    c = load_model(str(checkpoints["llama-gqa-untied"][0])).config
    assert (c.num_heads, c.kv_heads, c.head_size, c.tie_word_embeddings, c.rope_theta) == (4, 2, 12, False, 500.0)
    c = load_model(str(checkpoints["llama-mha-tied-headdim"][0])).config
    assert (c.kv_heads, c.head_size, c.attention_bias, c.attention_out_bias, c.mlp_bias) == (4, 16, True, True, True)
    c = load_model(str(checkpoints["qwen2-biased-mqa"][0])).config
    assert (c.kv_heads, c.attention_bias, c.attention_out_bias, c.tie_word_embeddings) == (1, True, False, True)


def test_rotary_tables_built_once_from_the_sequence_length(checkpoints):
    graph = build(load_model(str(checkpoints["llama-gqa-untied"][0])), level=0)
    hist = graph.op_histogram()
    # one Shape -> Range -> Cast -> Mul(inv_freq) -> Cos/Sin chain shared by all layers
    assert (hist["Range"], hist["Cos"], hist["Sin"]) == (1, 1, 1)
    inv = [v.const for v in graph.constants.values() if v.name.startswith("inv_freq")]
    assert len(inv) == 1 and inv[0].shape == (12,)
    np.testing.assert_allclose(inv[0][:6], 500.0 ** (-np.arange(0, 12, 2) / 12), rtol=1e-6)
    np.testing.assert_array_equal(inv[0][:6], inv[0][6:])


def test_padded_row_equals_unpadded_row(checkpoints):
    graph = build(load_model(str(checkpoints["llama-gqa-untied"][0])), level=3)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 97, (1, 5)).astype(np.int64)
    alone = run_onnx(graph, {"input_ids": ids, "attention_mask": np.ones((1, 5), np.int64)})["logits"]
    other = rng.integers(0, 97, (1, 8)).astype(np.int64)
    batch = np.concatenate([other, np.concatenate([ids, np.zeros((1, 3), np.int64)], 1)], 0)
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int64)
    padded = run_onnx(graph, {"input_ids": batch, "attention_mask": mask})["logits"]
    np.testing.assert_allclose(padded[1, :5], alone[0], atol=1e-5)
    first = run_onnx(graph, {"input_ids": other, "attention_mask": np.ones((1, 8), np.int64)})["logits"]
    np.testing.assert_allclose(padded[0], first[0], atol=1e-5)


# ---------------------------------------------------------------- refusals and strict loading
def _patched(src, tmp_path, config_changes=None, weights_fn=None):
    """A copy of checkpoint `src` with config.json keys changed and/or the tensors rewritten."""
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    if weights_fn:
        tensors = load_file(str(dst / "model.safetensors"))
        weights_fn(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


@pytest.mark.parametrize("changes, message", [
    # the scaling types tgraph implements are tested in tests/test_rope_scaling.py; others are named
    ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_parameters.rope_type='proportional'"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope_scaling.type='su'"),
    ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types containing 'sliding_attention'"),
])
def test_unsupported_llama_options_are_refused(checkpoints, tmp_path, changes, message):
    path = _patched(checkpoints["llama-gqa-untied"][0], tmp_path, changes)
    with pytest.raises(ConfigError) as err:
        load_model(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sliding_windows_are_read(checkpoints, tmp_path):
    """Windows are implemented (tests/test_sliding_window.py checks their numbers); here: how
    config.json maps. A window at least as wide as every position is full attention."""
    c = load_model(_patched(checkpoints["mistral-full-attention"][0], tmp_path, {"sliding_window": 16})).config
    assert (c.sliding_window, c.window(0), c.window(1)) == (16, 16, 16)
    wide = config_from_hf({"model_type": "mistral", "hidden_size": 32, "num_attention_heads": 4,
                           "sliding_window": 64, "max_position_embeddings": 64, "intermediate_size": 8})
    assert wide.sliding_window == 0
    q = config_from_hf({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "num_hidden_layers": 4,
                        "max_window_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 8})
    assert [q.window(i) for i in range(4)] == [0, 0, 8, 8]
    off = config_from_hf({"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 8,
                          "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 8})
    assert off.sliding_window == 0
    llama = config_from_hf({"model_type": "llama", "sliding_window": 8, "hidden_size": 32, "num_attention_heads": 4,
                            "intermediate_size": 8})
    assert llama.sliding_window == 0                    # HF's llama ignores the key


def test_legacy_rope_keys_are_read():
    c = config_from_hf({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 8,
                        "rope_theta": 123.0, "rope_scaling": None})
    assert c.rope_theta == 123.0
    c = config_from_hf({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 8,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 77.0}})
    assert c.rope_theta == 77.0


def test_strict_loading_names_the_tensor(checkpoints, tmp_path):
    src = checkpoints["llama-gqa-untied"][0]

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_model(_patched(src, tmp_path / "a", weights_fn=drop))

    def extra(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(48, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(_patched(src, tmp_path / "b", weights_fn=extra))

    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((48, 48), np.float32)   # 2 KV heads need (24, 48)
    with pytest.raises(CheckpointError, match=r"k_proj"):
        load_model(_patched(src, tmp_path / "c", weights_fn=reshape))


def test_report_errors():
    """Prints the measured error table (run with -s); runs last in this file."""
    for name, errs in ERRORS.items():
        print(f"{name:28s} " + "  ".join(f"{k}={v:.2e}" for k, v in errs.items()))
