"""GPT-1 (openai-gpt) and GPT-2 checkpoints against Hugging Face transformers.

Tiny random HF models are saved as safetensors, loaded through tgraph's strict loader,
and compared on every backend (ONNX -O0/-O3 via onnxruntime, generated NumPy). Every
parameter is re-randomised before saving (HF initialises LayerNorms to 1/0 and biases
to 0), so a swapped or mis-split tensor cannot hide.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from model_harness import build, check_all_backends, rel_err, run_onnx  # noqa: E402
from tgraph.api import build as api_build  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.ir.evaluate import evaluate  # noqa: E402
from tgraph.models import get_family, make_config  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

T = transformers
SMALL = dict(n_embd=32, n_head=2, n_layer=2, vocab_size=97, n_positions=32, layer_norm_epsilon=1e-5)
WIDE = dict(n_embd=48, n_head=4, n_layer=2, vocab_size=128, n_positions=24, layer_norm_epsilon=1e-6)

# name -> (HF config class, HF model class, config kwargs)
CASES = {
    "gpt2-tied": (T.GPT2Config, T.GPT2LMHeadModel, SMALL),
    "gpt2-untied-gelu-erf-layerscale": (T.GPT2Config, T.GPT2LMHeadModel, dict(
        WIDE, n_inner=80, activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
        tie_word_embeddings=False)),
    "gpt2-base-unscaled-relu": (T.GPT2Config, T.GPT2Model, dict(
        SMALL, n_head=4, vocab_size=101, scale_attn_weights=False, activation_function="relu")),
    "gpt-tied": (T.OpenAIGPTConfig, T.OpenAIGPTLMHeadModel, SMALL),
    "gpt-untied-relu": (T.OpenAIGPTConfig, T.OpenAIGPTLMHeadModel, dict(WIDE, afn="relu", tie_word_embeddings=False)),
    "gpt-base-silu": (T.OpenAIGPTConfig, T.OpenAIGPTModel, dict(SMALL, n_head=4, vocab_size=101, afn="silu")),
}


class Case:
    def __init__(self, name: str, directory: Path):
        config_cls, model_cls, kwargs = CASES[name]
        torch.manual_seed(0)
        config = config_cls(**kwargs, attn_implementation="eager")
        self.name, self.dir, self.vocab = name, directory, kwargs["vocab_size"]
        self.model = model_cls(config).eval()
        with torch.no_grad():
            for pname, p in self.model.named_parameters():
                if ".ln_" in pname and pname.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        self.model.save_pretrained(str(directory), safe_serialization=True)

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            if hasattr(out, "logits"):
                return out.logits.numpy()
            # Base-model checkpoints: the LM head is the tied token embedding.
            return (out.last_hidden_state @ self.model.get_input_embeddings().weight.T).numpy()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(name, tmp_path_factory.mktemp(name))
        return made[name]
    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_hf_on_all_backends(cases, name):
    case = cases(name)
    ids = np.random.default_rng(1).integers(0, case.vocab, size=(2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    errors = check_all_backends(load_model(str(case.dir)), {"input_ids": ids, "attention_mask": mask},
                                {"logits": case.logits(ids, mask)})
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("name", ["gpt2-tied", "gpt2-untied-gelu-erf-layerscale", "gpt-tied", "gpt-untied-relu"])
def test_right_padding_keeps_real_tokens(cases, name):
    """A right-padded batch of two prompts gives each prompt's unpadded single-row logits."""
    case = cases(name)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, case.vocab, size=n).astype(np.int64) for n in (9, 5)]
    ids = np.zeros((2, 9), np.int64)
    mask = np.zeros((2, 9), np.int64)
    for row, p in enumerate(prompts):
        ids[row, :len(p)], mask[row, :len(p)] = p, 1
    loaded = load_model(str(case.dir))
    # Padded batch: all backends against HF's own padded run (pad rows included).
    check_all_backends(loaded, {"input_ids": ids, "attention_mask": mask}, {"logits": case.logits(ids, mask)})
    # Real tokens: identical to each prompt run alone, unpadded.
    ours = run_onnx(build(loaded, 0), {"input_ids": ids, "attention_mask": mask})["logits"]
    for row, p in enumerate(prompts):
        single = case.logits(p[None], np.ones((1, len(p)), np.int64))[0]
        assert rel_err(ours[row, :len(p)], single) <= 1e-4
    # Causality alone hides right padding from real tokens, so also pad on the left, where only
    # the mask keeps real tokens off the pads: real tokens must match HF's left-padded run.
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row, p in enumerate(prompts):
        left_ids[row, 9 - len(p):], left_mask[row, 9 - len(p):] = p, 1
    ours = run_onnx(build(loaded, 0), {"input_ids": left_ids, "attention_mask": left_mask})["logits"]
    ref = case.logits(left_ids, left_mask)
    real = left_mask.astype(bool)
    assert rel_err(ours[real], ref[real]) <= 1e-4


def test_gpt1_activation_gelu_is_tanh_form():
    """HF OpenAIGPT's afn="gelu" is gelu_new (tanh); GPT-2's activation_function="gelu" is exact erf."""
    from tgraph.models import gpt, gpt2

    assert gpt.config_from_hf({"afn": "gelu"}).activation == "gelu_tanh"
    assert gpt2.config_from_hf({"activation_function": "gelu"}).activation == "gelu"
    assert gpt2.config_from_hf({"activation_function": "gelu_new"}).activation == "gelu_tanh"


@pytest.mark.parametrize("family,overrides", [
    ("gpt2", dict(n_embd="32", n_head="4", n_layer="1", vocab_size="61", n_positions="8", n_inner="40")),
    ("gpt", dict(n_embd="24", n_head="3", n_layer="2", vocab_size="53", n_positions="8", activation="silu")),
])
def test_registered_random_model_builds_and_runs(family, overrides):
    graph = api_build(family, overrides, level=0).graph
    ids = np.array([[1, 2, 3, 4, 5]], np.int64)
    out = evaluate(graph, {"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"]
    assert out.shape == (1, 5, int(overrides["vocab_size"])) and np.isfinite(out).all()


# ---------------------------------------------------------------- refusals
def variant(src: Path, dst: Path, tensors=None, config=None) -> str:
    """A copy of checkpoint `src` with its tensors dict and/or config dict edited in place."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(src / "model.safetensors"))
    if tensors:
        tensors(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return str(dst)


def test_ignorable_buffers_load(cases, tmp_path):
    src = cases("gpt2-tied").dir

    def add_buffers(w):
        w["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        w["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)

    loaded = load_model(variant(src, tmp_path / "v", tensors=add_buffers))
    assert loaded.config.n_layer == 2


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.pop("transformer.h.1.ln_2.bias"), "missing tensor 'h.1.ln_2.bias'"),
    (lambda w: w.__setitem__("transformer.h.0.attn.q_extra.weight", np.zeros((32, 32), np.float32)),
     "unexpected tensor 'transformer.h.0.attn.q_extra.weight'"),
    (lambda w: w.__setitem__("transformer.h.0.attn.c_attn.weight", np.zeros((32, 90), np.float32)),
     "'transformer.h.0.attn.c_attn.weight' has an unexpected shape (32, 90)"),
    (lambda w: w.__setitem__("transformer.ln_f.weight", np.zeros((31,), np.float32)),
     "'transformer.ln_f.weight' gives shape (31,)"),
    (lambda w: w.__setitem__("h.0.ln_1.weight", w["transformer.h.0.ln_1.weight"]),
     "'h.0.ln_1.weight' and 'transformer.h.0.ln_1.weight'"),
], ids=["missing", "unexpected", "bad-qkv-shape", "bad-shape", "prefix-clash"])
def test_strict_loading_names_the_tensor(cases, tmp_path, edit, message):
    path = variant(cases("gpt2-tied").dir, tmp_path / "v", tensors=edit)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_untied_config_without_lm_head_is_refused(cases, tmp_path):
    path = variant(cases("gpt2-base-unscaled-relu").dir, tmp_path / "v",
                   config=lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_model(path)


@pytest.mark.parametrize("case,key,value,message", [
    ("gpt2-tied", "reorder_and_upcast_attn", True, "reorder_and_upcast_attn=True"),
    ("gpt2-tied", "add_cross_attention", True, "add_cross_attention=True"),
    ("gpt2-tied", "activation_function", "quick_gelu", "activation_function='quick_gelu'"),
    ("gpt2-tied", "architectures", ["GPT2DoubleHeadsModel"], "'GPT2DoubleHeadsModel'"),
    ("gpt2-tied", "n_head", 5, "gpt2: n_embd (32) is not divisible by n_head (5)"),
    ("gpt-tied", "afn", "gelu_accurate", "afn='gelu_accurate'"),
    ("gpt-tied", "architectures", ["OpenAIGPTDoubleHeadsModel"], "'OpenAIGPTDoubleHeadsModel'"),
    ("gpt-tied", "layer_norm_epsilon", 0.0, "gpt: layer_norm_epsilon must be in (0, 1]"),
])
def test_unsupported_config_is_refused(cases, tmp_path, case, key, value, message):
    path = variant(cases(case).dir, tmp_path / "v", config=lambda c: c.update({key: value}))
    with pytest.raises(ConfigError) as e:
        load_model(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("family,field,value,message", [
    ("gpt2", "n_inner", "0", "gpt2: n_inner must be positive"),
    ("gpt2", "activation", "tanh", "gpt2: activation 'tanh'"),
    ("gpt", "vocab_size", "0", "gpt: vocab_size must be positive"),
])
def test_config_validation_names_field(family, field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(get_family(family).config_cls, {field: value})
