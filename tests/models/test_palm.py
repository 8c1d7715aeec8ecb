"""PaLM family: GPT-NeoX (parallel residual) checkpoints against Hugging Face transformers, and
the native PaLM configuration against a NumPy transcription of the paper's block.

The NumPy reference writes rotary positions in the pairwise form (dim i rotates with dim
i + R/2 by angle p·θ_i), not with rotate_half, and the parallel block as one line:
y = x + Attn(LN(x)) + SwiGLU(LN(x)).
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_harness import build, check_all_backends, run_onnx  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.models import get_family, make_config  # noqa: E402
from tgraph.models.palm import config_from_hf  # noqa: E402
from tgraph.sources import LoadedModel, load_model  # noqa: E402

ERRORS = {}


def scramble(model):
    """Weights large enough that attention is far from uniform (see test_llama.scramble)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.1)
    return model


def _neox(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, use_parallel_residual=True, tie_word_embeddings=False)
    base.update(kw)
    return transformers.GPTNeoXConfig(**base)


HF_CONFIGS = {
    # Pythia-like: a quarter of each 16-dim head rotates (4 dims), biases, untied embed_out
    "neox-rotary-0.25": lambda: _neox(rotary_pct=0.25),
    # whole head rotates, other base, no attention biases, tied head, another eps and head size
    "neox-rotary-1.0-tied": lambda: _neox(vocab_size=101, hidden_size=48, num_attention_heads=3, rotary_pct=1.0,
                                          rotary_emb_base=500, attention_bias=False, tie_word_embeddings=True,
                                          layer_norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = scramble(transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


def _inputs(vocab, batch=2, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 2:] = 0                               # right padding ...
    mask[1, 2] = 0                                      # ... and a hole, so the mask matters under causality
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_gpt_neox_matches_transformers(checkpoints, name):
    path, hf_model = checkpoints[name]
    loaded = load_model(str(path))
    inputs = _inputs(loaded.config.vocab_size)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(inputs["input_ids"]),
                       attention_mask=torch.from_numpy(inputs["attention_mask"])).logits.numpy()
    ERRORS[name] = check_all_backends(loaded, inputs, {"logits": ref})


def test_gpt_neox_config_mapping(checkpoints):
    c = load_model(str(checkpoints["neox-rotary-0.25"][0])).config
    assert (c.rotary_dim, c.num_kv_heads, c.shared_norm, c.gated_mlp, c.hidden_act, c.tie_word_embeddings) == \
        (4, 4, False, False, "gelu", False)
    c = load_model(str(checkpoints["neox-rotary-1.0-tied"][0])).config
    assert (c.rotary_dim, c.rope_theta, c.attention_bias, c.tie_word_embeddings) == (16, 500.0, False, True)


def test_legacy_gpt_neox_rope_keys():
    """Pre-5.0 config.json files carry rotary_pct / rotary_emb_base at the top level."""
    old = {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8,
           "rotary_pct": 0.5, "rotary_emb_base": 1234, "rope_scaling": None}
    c = config_from_hf(old)
    assert (c.rotary_dim, c.rope_theta) == (8, 1234.0)
    c = config_from_hf({k: v for k, v in old.items() if not k.startswith("rot")})
    assert (c.rotary_dim, c.rope_theta) == (4, 10000.0)          # HF defaults: rotary_pct 0.25, base 10000


# ---------------------------------------------------------------- native PaLM vs the paper, in NumPy
PALM = dict(vocab_size=89, d_model=48, num_layers=2, num_heads=4, d_ff=96, layer_norm_eps=1e-5)


def numpy_palm(P, c, ids, mask):
    """PaLM's forward pass written from the paper with NumPy (float64)."""
    d, h, hd = c.d_model, c.num_heads, c.d_model // c.num_heads
    b, t = ids.shape

    def ln(x, name):                                  # no bias in PaLM
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + c.layer_norm_eps) * P[f"{name}.weight"]

    def rope(x):                                      # x (B, H, T, D): pair i with i + D/2
        half = hd // 2
        theta = c.rope_theta ** (-np.arange(half) * 2.0 / hd)
        ang = np.arange(t)[:, None] * theta[None, :]          # (T, D/2)
        a, bb = x[..., :half], x[..., half:]
        return np.concatenate([a * np.cos(ang) - bb * np.sin(ang), bb * np.cos(ang) + a * np.sin(ang)], -1)

    def attn(x, name):
        q = (x @ P[f"{name}.q_proj.weight"]).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        k = (x @ P[f"{name}.k_proj.weight"])[:, None]         # one shared K head: (B, 1, T, D)
        v = (x @ P[f"{name}.v_proj.weight"])[:, None]
        q, k = rope(q), rope(k)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        allowed = np.tril(np.ones((t, t), bool))[None, None] & mask[:, None, None, :].astype(bool)
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return ((p @ v).transpose(0, 2, 1, 3).reshape(b, t, d)) @ P[f"{name}.o_proj.weight"]

    def swiglu(x, name):
        g = x @ P[f"{name}.gate.weight"]
        return (g / (1 + np.exp(-g)) * (x @ P[f"{name}.up.weight"])) @ P[f"{name}.down.weight"]

    x = P["embed.weight"][ids]
    for i in range(c.num_layers):
        n = ln(x, f"layers.{i}.norm")
        x = x + attn(n, f"layers.{i}.attn") + swiglu(n, f"layers.{i}.mlp")
    return ln(x, "final_norm") @ P["embed.weight"].T


@pytest.fixture(scope="module")
def native():
    family = get_family("palm")
    cfg = make_config(family.config_cls, PALM)
    model = family.build(cfg)
    # PaLM's own init is too gentle to exercise attention; random norm gains expose a swapped norm
    rng = np.random.default_rng(11)
    for name, p in model.named_parameters():
        scale = 1.0 if name == "embed.weight" else 0.3
        value = 1 + 0.1 * rng.standard_normal(p.shape) if "norm" in name else scale * rng.standard_normal(p.shape)
        p.assign(value, name)
    return LoadedModel(model, "palm", "registered", cfg, cfg.vocab_size)


def test_native_palm_defaults_are_the_papers(native):
    c = native.config
    assert (c.num_kv_heads, c.shared_norm, c.gated_mlp, c.hidden_act, c.tie_word_embeddings) == \
        (1, True, True, "silu", True)
    assert not (c.norm_bias or c.attention_bias or c.mlp_bias)
    names = {n for n, _ in native.module.named_parameters()}
    assert not any(n.endswith(".bias") for n in names)
    assert "layers.0.norm.weight" in names and "lm_head.weight" not in names


def test_native_palm_matches_numpy_paper(native):
    graph = build(native, level=0, seed=7)
    P = {n: v.const.astype(np.float64) for n, v in graph.parameters().items()}
    inputs = _inputs(native.config.vocab_size, seed=1)
    ref = numpy_palm(P, native.config, inputs["input_ids"], inputs["attention_mask"])
    assert np.abs(ref).max() > 0.1
    from tgraph.api import build as api_build
    from model_harness import rel_err, run_numpy

    errs = {}
    for level in (0, 3):
        errs[f"onnx-O{level}"] = rel_err(run_onnx(api_build(native, seed=7, level=level).graph, inputs)["logits"], ref)
    errs["numpy-O3"] = rel_err(run_numpy(api_build(native, seed=7, level=3).graph, inputs)["logits"], ref)
    ERRORS["palm-native (numpy ref)"] = errs
    assert max(errs.values()) <= 1e-4, errs


def test_one_parallel_block_by_hand(native):
    """Layer 0 alone: y = x + attn(ln(x)) + mlp(ln(x)), checked on a single token where attention
    reduces to V·W_o (softmax over one key), so the formula needs no attention code at all."""
    graph = build(native, level=0, seed=7)
    P = {n: v.const.astype(np.float64) for n, v in graph.parameters().items()}
    c = native.config
    ids = np.array([[5]], np.int64)
    x = P["embed.weight"][ids[0, 0]]
    mu, var = x.mean(), x.var()
    n = (x - mu) / np.sqrt(var + c.layer_norm_eps) * P["layers.0.norm.weight"]
    attn = (n @ P["layers.0.attn.v_proj.weight"])                    # one key: probability 1, one KV head
    attn = np.tile(attn, c.num_heads) @ P["layers.0.attn.o_proj.weight"]
    g = n @ P["layers.0.mlp.gate.weight"]
    mlp = (g / (1 + np.exp(-g)) * (n @ P["layers.0.mlp.up.weight"])) @ P["layers.0.mlp.down.weight"]
    y = x + attn + mlp
    for i in range(1, c.num_layers):                                 # the remaining layer(s), same formula
        mu, var = y.mean(), y.var()
        n = (y - mu) / np.sqrt(var + c.layer_norm_eps) * P[f"layers.{i}.norm.weight"]
        attn = np.tile(n @ P[f"layers.{i}.attn.v_proj.weight"], c.num_heads) @ P[f"layers.{i}.attn.o_proj.weight"]
        g = n @ P[f"layers.{i}.mlp.gate.weight"]
        y = y + attn + (g / (1 + np.exp(-g)) * (n @ P[f"layers.{i}.mlp.up.weight"])) @ P[f"layers.{i}.mlp.down.weight"]
    mu, var = y.mean(), y.var()
    logits = ((y - mu) / np.sqrt(var + c.layer_norm_eps) * P["final_norm.weight"]) @ P["embed.weight"].T
    got = run_onnx(graph, {"input_ids": ids, "attention_mask": np.ones((1, 1), np.int64)})["logits"]
    np.testing.assert_allclose(got[0, 0], logits, rtol=1e-4, atol=1e-5)


def test_padded_row_equals_unpadded_row(native):
    graph = build(native, level=3)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 89, (1, 4)).astype(np.int64)
    alone = run_onnx(graph, {"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64)})["logits"]
    batch = np.concatenate([rng.integers(0, 89, (1, 6)), np.concatenate([ids, np.zeros((1, 2), np.int64)], 1)], 0)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], np.int64)
    padded = run_onnx(graph, {"input_ids": batch, "attention_mask": mask})["logits"]
    np.testing.assert_allclose(padded[1, :4], alone[0], atol=1e-5)


def test_config_validation_names_the_field():
    family = get_family("palm")
    with pytest.raises(ConfigError, match=r"palm: num_heads \(6\) is not a multiple of num_kv_heads \(4\)"):
        make_config(family.config_cls, {"num_heads": "6", "num_kv_heads": "4", "d_model": "48"})
    with pytest.raises(ConfigError, match=r"palm: rotary_pct=0.1 of head_dim 12 gives 1 rotary dims"):
        make_config(family.config_cls, {"d_model": "48", "num_heads": "4", "rotary_pct": "0.1"})


# ---------------------------------------------------------------- refusals and strict loading
def _patched(src, tmp_path, config_changes=None, weights_fn=None):
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
    ({"use_parallel_residual": False}, "gpt_neox: config option use_parallel_residual=False is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type='linear'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000}},
     "rope_parameters.rope_type='dynamic'"),
    ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
])
def test_unsupported_gpt_neox_options_are_refused(checkpoints, tmp_path, changes, message):
    path = _patched(checkpoints["neox-rotary-0.25"][0], tmp_path, changes)
    with pytest.raises(ConfigError) as err:
        load_model(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_strict_loading_names_the_tensor(checkpoints, tmp_path):
    src = checkpoints["neox-rotary-0.25"][0]

    def drop(t):
        del t["gpt_neox.layers.1.attention.query_key_value.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.attention\.query_key_value\.bias'"):
        load_model(_patched(src, tmp_path / "a", weights_fn=drop))

    def bad_qkv(t):    # 3*64 rows split over 4 heads, but one head short
        t["gpt_neox.layers.0.attention.query_key_value.weight"] = np.zeros((3 * 48, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"query_key_value\.weight"):
        load_model(_patched(src, tmp_path / "b", weights_fn=bad_qkv))


def test_report_errors():
    for name, errs in ERRORS.items():
        print(f"{name:28s} " + "  ".join(f"{k}={v:.2e}" for k, v in errs.items()))
