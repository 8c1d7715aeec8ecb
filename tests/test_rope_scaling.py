"""RoPE scaling (linear, dynamic NTK, yarn, llama3, longrope) against Hugging Face transformers.

References nobody here wrote: transformers' own `ROPE_INIT_FUNCTIONS` (the inverse frequencies
and attention factor of each type), the HF models' logits (random-initialised odd configs saved
with `save_pretrained`, run well beyond the original RoPE length L₀ = 16, on batches with a
right-padded and a left-padded row), and HF's greedy `generate`. Each parity case also checks
that the scaling matters (the same weights with plain RoPE give different logits), so a
scaling silently dropped cannot pass.
"""
import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_harness import HIGHEST_LEVEL, build, rel_err, run_numpy, run_onnx  # noqa: E402
from tgraph.dsl.rope_scaling import RopeScaling  # noqa: E402
from tgraph.errors import ConfigError  # noqa: E402
from tgraph.models.llama import config_from_hf  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

L0 = 16                 # the original (pre-training) RoPE length of every test config
LONG = 40               # test length, beyond L0

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0, "beta_fast": 8.0,
             "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": L0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                 "long_factor": [1.0, 2.0, 3.5, 5.0, 6.5, 8.0], "original_max_position_embeddings": L0},
}


def _hf_config(kind, model_type="llama", theta=100.0):
    rope = {"rope_theta": theta, **SCALINGS[kind]}
    # dynamic NTK scales beyond max_position_embeddings; the others keep L0 in their parameters
    max_pos = L0 if kind == "dynamic" else 4 * L0
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=max_pos, rope_parameters=rope)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False, tie_word_embeddings=True)
    return transformers.LlamaConfig(**common, tie_word_embeddings=False)


def _scramble(model, seed=0):
    """Weights large enough that attention is far from uniform (a wrong angle moves the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim >= 2 else 0.1))
    return model


def _hf_model(config):
    return _scramble(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval())


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _batch(seq, vocab=97, seed=0):
    """Three rows: full, right-padded by 3, left-padded by 5."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, seq)).astype(np.int64)
    mask = np.ones((3, seq), np.int64)
    mask[1, seq - 3:] = 0
    mask[2, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def check_all_backends(loaded, inputs, ref, tol=1e-4):
    """ONNX -O0 and -O3 and NumPy -O3 against HF at the real tokens (a left-padded row's pad
    queries see no key: Attention-23 gives them zeros where HF averages; tests/test_masked_rows.py)."""
    real = inputs["attention_mask"].astype(bool)
    errors = {}
    for backend, level in (("onnx", 0), ("onnx", HIGHEST_LEVEL), ("numpy", HIGHEST_LEVEL)):
        run = run_onnx if backend == "onnx" else run_numpy
        errors[f"{backend}-O{level}"] = rel_err(run(build(loaded, level), inputs)["logits"][real], ref[real])
    assert max(errors.values()) <= tol, errors
    return errors


def _hf_logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(inputs["input_ids"]),
                     attention_mask=torch.from_numpy(inputs["attention_mask"])).logits.float().numpy()


# ------------------------------------------------------------------ the formulas, against transformers
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_inverse_frequencies_match_transformers(kind):
    """Our build-time θ_i and cos/sin factor against transformers' ROPE_INIT_FUNCTIONS (for the
    length-dependent types: at a length within L0, and dynamic/longrope beyond it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_config(kind)
    ours = config_from_hf(hf.to_dict()).rope_scaling
    assert ours.rope_type == kind
    for seq_len in (None, 3 * L0):
        ref, ref_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu", seq_len=seq_len)
        if seq_len is None:
            got = ours.inv_freq(12, 100.0)
        elif kind == "longrope":
            got = ours.long_inv_freq(12, 100.0)
        elif kind == "dynamic":
            base = 100.0 * (3.0 * seq_len / L0 - 2.0) ** (12 / 10)
            got = 1.0 / base ** (np.arange(0, 12, 2) / 12)
            np.testing.assert_allclose(ref.numpy(), got, rtol=1e-5)        # the formula we put in the graph
            continue
        else:
            got = ours.inv_freq(12, 100.0)
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
        assert math.isclose(ours.cos_sin_factor(), ref_factor, rel_tol=1e-12)
    if kind in ("yarn", "longrope"):
        assert ours.cos_sin_factor() > 1.0                                   # the factor is exercised


# ------------------------------------------------------------------ model parity beyond L0
PARITY = [("llama", k) for k in SCALINGS] + [("qwen2", "yarn")]            # Qwen2.5 long-context: yarn


@pytest.mark.parametrize("model_type, kind", PARITY, ids=[f"{m}-{k}" for m, k in PARITY])
def test_matches_transformers_beyond_the_original_length(tmp_path, model_type, kind):
    torch.manual_seed(0)
    hf = _hf_model(_hf_config(kind, model_type))
    loaded = load_model(_save(hf, tmp_path / "ckpt"))
    assert loaded.config.rope_scaling.rope_type == kind
    # lengths within and beyond L0 (ascending: HF's dynamic NTK keeps the largest length it has seen)
    for seq in (L0 - 4, LONG) if kind in ("dynamic", "longrope") else (LONG,):
        inputs = _batch(seq)
        ref = _hf_logits(hf, inputs)
        check_all_backends(loaded, inputs, ref)
    # the scaling matters: the same weights with plain RoPE disagree with HF's scaled logits
    plain_cfg = _hf_config(kind, model_type)
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 100.0}
    plain = transformers.AutoModelForCausalLM.from_config(plain_cfg, attn_implementation="eager").eval()
    plain.load_state_dict(hf.state_dict())
    assert rel_err(_hf_logits(plain, inputs)[0], ref[0]) > 1e-2


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rotary_and_attention_fused_at_O2(tmp_path, kind):
    torch.manual_seed(0)
    loaded = load_model(_save(_hf_model(_hf_config(kind)), tmp_path / "ckpt"))
    hist = build(loaded, level=2).op_histogram()
    assert hist.get("RotaryEmbedding") == 4 and hist.get("Attention") == 2, hist    # q and k of 2 layers


def test_dynamic_ntk_base_is_computed_from_the_run_length(tmp_path):
    """One exported graph serves every length: its frequencies follow the input (no rebuild),
    and within L0 they are the plain ones."""
    torch.manual_seed(0)
    hf = _hf_model(_hf_config("dynamic"))
    path = _save(hf, tmp_path / "ckpt")
    graph = build(load_model(path), level=3)
    assert not [v for v in graph.constants.values() if v.name.startswith("inv_freq")]   # no frozen table
    for seq in (8, 24, 56):
        fresh = _hf_model(_hf_config("dynamic"))       # HF's dynamic rope keeps state: a fresh model per length
        fresh.load_state_dict(hf.state_dict())
        inputs = _batch(seq, seed=seq)
        real = inputs["attention_mask"].astype(bool)
        assert rel_err(run_onnx(graph, inputs)["logits"][real], _hf_logits(fresh, inputs)[real]) <= 1e-4


# ------------------------------------------------------------------ config spellings and refusals
def _patched(src, tmp_path, change):
    dst = tmp_path / "patched"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_legacy_rope_scaling_spelling_reads_the_same(tmp_path):
    """Pre-v5 checkpoints: top-level rope_theta and `rope_scaling: {type: ...}`."""
    torch.manual_seed(0)
    hf = _hf_model(_hf_config("llama3"))
    src = _save(hf, tmp_path / "ckpt")

    def legacy(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        cfg["rope_scaling"] = params
    path = _patched(src, tmp_path, legacy)
    assert load_model(path).config.rope_scaling == load_model(src).config.rope_scaling
    inputs = _batch(LONG)
    graph = build(load_model(path), level=0)
    real = inputs["attention_mask"].astype(bool)
    assert rel_err(run_onnx(graph, inputs)["logits"][real], _hf_logits(hf, inputs)[real]) <= 1e-4
    # and transformers reads the legacy file as the same model
    again = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    np.testing.assert_allclose(_hf_logits(again, inputs), _hf_logits(hf, inputs), rtol=0, atol=1e-5)


def test_phi3_style_top_level_original_length_wins():
    c = config_from_hf({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 8,
                        "max_position_embeddings": 4096, "original_max_position_embeddings": 1024,
                        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}})
    s = c.rope_scaling
    assert (s.original_max_positions, s.factor) == (1024, 4.0)
    assert math.isclose(s.cos_sin_factor(), math.sqrt(1 + math.log(4.0) / math.log(1024)))


BASE = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 8,
        "max_position_embeddings": 64}


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "proportional", "factor": 2.0}, "rope_parameters.rope_type='proportional' is not supported"),
    ({"rope_type": "su", "factor": 2.0}, "rope_parameters.rope_type='su' is not supported"),
    ({"rope_type": "linear"}, "rope_parameters: factor is required"),
    ({"rope_type": "linear", "factor": "2"}, "rope_parameters: factor='2' must be a finite number"),
    ({"rope_type": "linear", "factor": -2.0}, "factor must be a positive number"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor is required"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     "need 0 < low_freq_factor < high_freq_factor"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 4, "long_factor": [1.0] * 3},
     "long_factor has 3 entries, rotary_dim 8 needs 4"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}, "truncate='yes' must be true or false"),
    ({"full_attention": {"rope_type": "default"}}, "per-layer-type settings"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0},
     "original_max_position_embeddings=0 must be positive"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_slow": 1e308}, "non-finite frequencies"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": -3.0}, "needs beta_fast, beta_slow > 0"),
    ({"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 1, "short_factor": [1.0] * 4,
      "long_factor": [1.0] * 4}, "attention factor from these parameters is nan"),
])
def test_bad_or_unsupported_scaling_is_one_clear_error(rope, message):
    with pytest.raises(ConfigError) as err:
        config_from_hf({**BASE, "rope_parameters": rope})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_families_without_scaling_still_refuse_it():
    from tgraph.models.palm import config_from_hf as neox_from_hf

    with pytest.raises(ConfigError, match=r"rope_scaling.type='linear' is not supported"):
        neox_from_hf({"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": 4,
                      "intermediate_size": 64, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match=r"partial_rotary_factor=0.5 with rope_type 'linear'"):
        config_from_hf({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                    "partial_rotary_factor": 0.5}})


# ------------------------------------------------------------------ Llama-3-8B shape, without 8B weights
LLAMA31_8B = {  # the config.json of meta-llama/Llama-3.1-8B (sizes and rope; no weights involved)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama31_8b_shaped_config_is_accepted_and_traced_without_weights():
    """Config checks, the size estimate and shape/dtype inference of the full 8B shape; the
    weights are lazy tensors that fail if anything reads them (nothing may, before writing)."""
    from tgraph.dsl import trace
    from tgraph.ir.lazy import LazyTensor
    from tgraph.models.registry import get_family
    from tgraph.passes import level_pipeline, optimize, parse_pipeline
    from tgraph.resources import estimate

    c = config_from_hf(LLAMA31_8B)
    assert (c.num_heads, c.kv_heads, c.head_size, c.vocab_size, c.rope_theta) == (32, 8, 128, 128256, 500000.0)
    assert c.rope_scaling == RopeScaling("llama3", factor=8.0, original_max_positions=8192, low_freq_factor=1.0,
                                         high_freq_factor=4.0)
    family = get_family("llama")
    d, f, v, kv = 4096, 14336, 128256, 8 * 128
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d        # q, o; k, v; gate, up, down; two norms
    assert estimate(family.build, c).parameters == 32 * per_layer + 2 * v * d + d == 8_030_261_248

    class Unread(LazyTensor):
        def _compute(self):
            raise AssertionError(f"weight {self.label} was read")

    model = family.build(c)
    for name, p in model.named_parameters():
        p.assign(Unread(p.shape, np.float32, name), name)
    graph = trace(model, model.input_specs())
    graph.verify()
    logits = graph.outputs["logits"] if isinstance(graph.outputs, dict) else \
        next(o for o in graph.outputs if o.name == "logits")
    assert logits.type.dtype.name == "float32" and list(logits.shape) == ["batch", "seq", 128256]
    inv = [np.asarray(v.const) for v in graph.constants.values() if v.name.startswith("inv_freq")]
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**LLAMA31_8B), "cpu")
    assert len(inv) == 1 and inv[0].shape == (128,)
    np.testing.assert_allclose(inv[0][:64], ref.numpy(), rtol=1e-6)
    optimize(graph, pipeline=parse_pipeline(level_pipeline(2)))
    hist = graph.op_histogram()
    assert (hist.get("Attention"), hist.get("RotaryEmbedding")) == (32, 64), hist


def test_scaled_down_llama31_rope_matches_transformers(tmp_path):
    """The same rope parameters (llama3, theta 500000, factor 8, L0 8192), GQA 4/1 and bfloat16
    weights (as Llama 3.1 ships) on a tiny model; the reference is HF's float32 model on the same
    (bf16-exact) weights."""
    hf_cfg = {**LLAMA31_8B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 211}
    for key in ("architectures", "model_type", "torch_dtype"):
        hf_cfg.pop(key)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**hf_cfg)
    path = _save(_hf_model(config).to(torch.bfloat16), tmp_path / "ckpt")
    # a fresh float32 model on the rounded weights (`.float()` would keep HF's bf16-rounded inv_freq buffer)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    hf.eval().load_state_dict({k: v.float() for k, v in transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16).state_dict().items()})
    with open(f"{path}/model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    loaded = load_model(path)
    assert loaded.config.rope_scaling.original_max_positions == 8192
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 211, (2, 48)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    check_all_backends(loaded, inputs, _hf_logits(hf, inputs))


# ------------------------------------------------------------------ greedy generation
@pytest.mark.parametrize("kind, kv_cache", [("llama3", "static"), ("llama3", "dynamic"), ("dynamic", "dynamic"),
                                            ("dynamic", "static"), ("yarn", "static")])
def test_greedy_generation_matches_hf_generate(tmp_path, kind, kv_cache):
    """Token-for-token equal to HF's greedy generate, prompts + new tokens running past L0
    (head_dim 16, so the static cache's in-op rotary tables are used for llama3 and for yarn,
    whose tables carry the attention factor; dynamic NTK rotates outside the op)."""
    from tgraph.generate import Generator

    cfg = _hf_config(kind)
    cfg.hidden_size, cfg.head_dim = 64, 16
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    torch.manual_seed(1)
    hf = _hf_model(cfg)
    path = _save(hf, tmp_path / "ckpt")
    prompts, new = [[5, 17, 3, 44, 9, 28, 13, 2, 71, 8], [31, 2, 50, 6]], 18      # 10 + 18 > L0
    ids = np.zeros((2, 10), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 10 - len(p):], mask[i, 10 - len(p):] = p, 1
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=new, pad_token_id=0).numpy()[:, 10:]
    got = Generator(path, provider="cpu", kv_cache=kv_cache, max_length=64).generate(prompts, max_new_tokens=new)
    np.testing.assert_array_equal(got.tokens, ref)
    assert all(len(set(row)) >= 4 for row in got.ids)                     # not a degenerate model


def test_cli_exports_a_scaled_checkpoint_and_refuses_an_unknown_type_in_one_line(tmp_path, capsys):
    import onnx

    from tgraph.cli import main

    torch.manual_seed(0)
    src = _save(_hf_model(_hf_config("yarn")), tmp_path / "ckpt")
    out = tmp_path / "yarn.onnx"
    assert main(["export", src, "-o", str(out)]) == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    capsys.readouterr()

    def unknown(cfg):
        cfg["rope_parameters"]["rope_type"] = "proportional"
    bad = _patched(src, tmp_path, unknown)
    assert main(["export", bad, "-o", str(tmp_path / "bad.onnx")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgraph: error: ") and "\n" not in err and "rope_type='proportional'" in err
    assert not (tmp_path / "bad.onnx").exists()
