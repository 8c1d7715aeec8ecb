"""GPT-Neo against Hugging Face transformers: global and local (windowed) layers.

Random-initialised `GPTNeoForCausalLM` checkpoints (odd sizes, windows of 4-5 tokens, sequences
of 16 — longer than the window) saved with `save_pretrained`, loaded through
`tgraph.sources.load_model`; logits on ONNX -O0/-O3 and the NumPy module at the real tokens of
right- and left-padded rows; greedy generation token for token against HF `generate`, with the
static and the dynamic KV cache.
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_harness import build, rel_err, run_numpy, run_onnx  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

SEQ = 16
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

HF_CONFIGS = {
    # GPT-3's layout cut to 3 layers (global, local, local), window 5, an odd FFN width
    "neo-global-local-local": lambda: transformers.GPTNeoConfig(
        vocab_size=67, max_position_embeddings=48, hidden_size=32, num_layers=3, num_heads=4, window_size=5,
        attention_types=[[["global", "local", "local"], 1]], intermediate_size=40, **NO_SPECIAL),
    # the released alternation, twice; window 4; exact GELU; default FFN width (4 * 48)
    "neo-alternating-gelu": lambda: transformers.GPTNeoConfig(
        vocab_size=71, max_position_embeddings=40, hidden_size=48, num_layers=4, num_heads=6, window_size=4,
        attention_types=[[["global", "local"], 2]], activation_function="gelu", layer_norm_epsilon=1e-6,
        **NO_SPECIAL),
}


def hf_model(config, state=None):
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if state is not None:
        model.load_state_dict(state)
        return model
    with torch.no_grad():                 # larger than HF's init, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim >= 2 else p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = hf_model(make())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (str(path), model)
    return out


def padded_batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, SEQ)).astype(np.int64)
    mask = np.ones((3, SEQ), np.int64)
    mask[1, SEQ - 4:] = 0                 # right-padded
    mask[2, :3] = 0                       # left-padded
    return {"input_ids": ids, "attention_mask": mask}


def hf_logits(model, feeds):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(feeds["input_ids"]),
                     attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_matches_transformers(checkpoints, name):
    path, model = checkpoints[name]
    loaded = load_model(path)
    feeds = padded_batch(loaded.config.vocab_size)
    real = feeds["attention_mask"].astype(bool)         # padded queries' outputs are not defined
    ref = hf_logits(model, feeds)[real]
    errors = {f"onnx-O{lvl}": rel_err(run_onnx(build(loaded, lvl), feeds)["logits"][real], ref) for lvl in (0, 3)}
    errors["numpy-O3"] = rel_err(run_numpy(build(loaded, 3), feeds)["logits"][real], ref)
    assert max(errors.values()) <= 1e-4, errors


def test_every_attention_is_fused_at_O2(checkpoints):
    """Global layers become Attention(is_causal=1), local ones Attention with the window as an
    explicit mask: no softmax or unfused mask is left."""
    loaded = load_model(checkpoints["neo-global-local-local"][0])
    g = build(loaded, 2)
    hist = g.op_histogram()
    assert hist.get("Attention") == 3 and "Softmax" not in hist and "tgraph.CausalMask" not in hist, hist
    att = [n for n in g.nodes if n.op == "Attention"]
    assert [n.attrs["is_causal"] for n in att] == [1, 0, 0]
    assert all(n.attrs["scale"] == 1.0 for n in att)              # GPT-Neo does not scale its scores


def test_config_mapped_as_intended(checkpoints):
    c = load_model(checkpoints["neo-global-local-local"][0]).config
    assert (c.attention_layers, c.windows(), c.d_ff, c.activation) == ("global,local,local", [0, 5, 5], 40,
                                                                         "gelu_tanh")
    c = load_model(checkpoints["neo-alternating-gelu"][0]).config
    assert (c.attention_layers, c.windows(), c.d_ff, c.activation) == ("global,local", [0, 4, 0, 4], 192, "gelu")


def test_the_window_decides_the_logits(checkpoints):
    """HF with the local layers made global (or their window one wider) disagrees with tgraph by
    far more than the tolerance: the parity test sees the window."""
    path, model = checkpoints["neo-global-local-local"]
    feeds = padded_batch(67)
    real = feeds["attention_mask"].astype(bool)
    got = run_onnx(build(load_model(path), 3), feeds)["logits"][real]
    for changes in ({"attention_types": [[["global"], 3]]}, {"window_size": 6}):
        config = HF_CONFIGS["neo-global-local-local"]()
        for k, v in changes.items():
            setattr(config, k, v)
        config.attention_layers = config.expand_attention_types_params(config.attention_types)
        other = hf_model(config, state=model.state_dict())
        assert rel_err(got, hf_logits(other, feeds)[real]) > 1e-3, changes


PROMPTS = [[5, 17, 3, 44, 9, 28, 13], [31, 2, 50]]
NEW = 12                                  # prompt + new (19) > window (5)


@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
def test_greedy_generation_matches_hf_generate(checkpoints, kv_cache):
    from tgraph.generate import Generator

    path, model = checkpoints["neo-global-local-local"]
    longest = max(map(len, PROMPTS))
    ids, mask = np.zeros((2, longest), np.int64), np.zeros((2, longest), np.int64)
    for i, p in enumerate(PROMPTS):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=NEW, pad_token_id=0).numpy()[:, longest:]
    gen = Generator(path, provider="cpu", kv_cache=kv_cache)
    assert gen.static == (kv_cache == "static")
    got = gen.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(got.tokens, ref)
    assert all(len(set(row)) >= 3 for row in got.ids)           # not one token forever
    if kv_cache == "static":                      # local layers: the op's local_window_size, global: none
        g = build(load_model(path, {"use_cache": "true", "kv_cache": "static", "cache_length": "32"}), 3)
        gqa = [n for n in g.nodes if n.op == "GroupQueryAttention"]
        assert [n.attrs.get("local_window_size") for n in gqa] == [-1, 5, 5]


def test_registered_family_builds_and_fuses():
    from tgraph.api import build as api_build

    g = api_build("gpt_neo", {"hidden_size": "32", "num_layers": "2", "num_heads": "4", "vocab_size": "50",
                              "max_position_embeddings": "32", "window_size": "4"}, level=2).graph
    out = run_onnx(g, {"input_ids": np.array([[1, 2, 3, 4, 5, 6]]), "attention_mask": np.ones((1, 6), np.int64)})
    assert out["logits"].shape == (1, 6, 50) and g.op_histogram()["Attention"] == 2


# ------------------------------------------------------------------ refusals
def _patched(src, tmp_path, changes):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("changes, message", [
    ({"attention_types": [[["global", "local"], 2]], "attention_layers": None},
     "attention_types gives 4 layers, num_layers is 3"),
    ({"attention_layers": ["global", "sparse", "local"]}, "attention_layers=['global', 'sparse', 'local']"),
    ({"window_size": 0}, "gpt_neo: window_size must be in [1, inf)"),
    ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu' is not supported"),
    ({"architectures": ["GPTNeoForSequenceClassification"]}, "GPTNeoForSequenceClassification"),
])
def test_unsupported_options_are_refused_in_one_line(checkpoints, tmp_path, changes, message):
    with pytest.raises((ConfigError, CheckpointError)) as err:
        load_model(_patched(checkpoints["neo-global-local-local"][0], tmp_path, changes))
    assert message in str(err.value) and "\n" not in str(err.value)
