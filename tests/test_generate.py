"""Generation (`tgraph.generate`, `tgraph generate`): parity with Hugging Face's greedy `generate`,
sampling properties, EOS and padding, streaming, tokenizers and the CLI.

The references are independent: Hugging Face `generate(do_sample=False)` on the same
random-weight checkpoints (GPT-2, LLaMA with grouped KV heads and an untied head, T5), the
uncached graph run on the whole sequence, and hand-written definitions of top-k/top-p sets.
"""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tgraph.cli import main
from tgraph.errors import ConfigError, InputError
from tgraph.generate import Generator, generate
from tgraph.sampling import (SamplingConfig, allowed_tokens, next_tokens, softmax, top_k_filter, top_p_filter)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 61
NEW = 24
PROMPTS = [[5, 17, 3, 44, 9, 28, 13], [31, 2, 50]]        # different lengths: row 1 is padded


def _hf_configs():
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        "gpt2": transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          tie_word_embeddings=False, **common),
        "t5": transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                    eos_token_id=None, pad_token_id=0, decoder_start_token_id=0),
    }


def _hf_model(name):
    config = _hf_configs()[name]
    seed, std = {"gpt2": (0, 0.3), "llama": (1, 0.3), "t5": (3, 0.5)}[name]
    torch.manual_seed(seed)
    auto = transformers.AutoModelForSeq2SeqLM if name == "t5" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():          # larger than the default init, so argmax is not one token forever
        for p in model.parameters():
            p.normal_(0, std) if p.ndim >= 2 else p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name in ("gpt2", "llama", "t5"):
        path = tmp_path_factory.mktemp(name)
        model = _hf_model(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, str(path))
    return out


@pytest.fixture(scope="module")
def generators(checkpoints):
    return {name: Generator(path, provider="cpu") for name, (_, path) in checkpoints.items()}


def hf_generate(model, prompts, encoder_decoder, **kw):
    """HF's greedy generate on a padded batch (left for decoder-only, right for T5's encoder)."""
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(0, len(p)) if encoder_decoder else slice(longest - len(p), longest)
        ids[i, cols], mask[i, cols] = p, 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, **kw).numpy()
    return out[:, 1:] if encoder_decoder else out[:, longest:]


# ------------------------------------------------------------------ parity with Hugging Face
@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_greedy_matches_hf_generate(checkpoints, generators, name):
    model, _ = checkpoints[name]
    ref = hf_generate(model, PROMPTS, name == "t5", max_new_tokens=NEW, pad_token_id=0)
    got = generators[name].generate(PROMPTS, max_new_tokens=NEW)
    assert ref.shape == (2, NEW)
    np.testing.assert_array_equal(got.tokens, ref)
    assert got.ids == ref.tolist()                      # no EOS: every row has all its tokens
    for row in got.ids:                                 # not a degenerate model
        assert len(set(row)) >= 4, row
    assert got.tokens_per_s > 0 and got.provider.startswith("CPUExecutionProvider")


def test_eos_finishes_rows_like_hf(checkpoints):
    """An EOS id taken from the middle of row 0's greedy output: row 0 stops there, its later
    positions hold the pad id (HF's layout); `ids` keeps the EOS and drops the padding."""
    model, path = checkpoints["gpt2"]
    free = Generator(path, provider="cpu").generate(PROMPTS, max_new_tokens=NEW).ids[0]
    k = next(i for i in range(5, NEW) if free[i] not in free[:i])
    eos, pad = free[k], 60 if free[k] != 60 else 59
    ref = hf_generate(model, PROMPTS, False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    got = Generator(path, provider="cpu", eos_token_id=eos, pad_token_id=pad).generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(got.tokens, ref)
    assert got.ids[0] == free[:k + 1]
    assert (got.tokens[0, k + 1:] == pad).all()
    for i, row in enumerate(got.ids):
        assert row == got.tokens[i, :len(row)].tolist() and (eos not in row[:-1])


def test_stops_when_every_row_has_finished(checkpoints):
    _, path = checkpoints["llama"]
    gen = Generator(path, provider="cpu")
    free = gen.generate(PROMPTS, max_new_tokens=NEW).ids
    eos = sorted({free[0][3], free[1][4]})             # each row meets one of two EOS ids
    got = Generator(path, provider="cpu", eos_token_id=eos).generate(PROMPTS, max_new_tokens=NEW)
    ends = [next(i for i, t in enumerate(row) if t in eos) for row in free]
    assert [len(r) for r in got.ids] == [e + 1 for e in ends]
    assert got.tokens.shape[1] == max(ends) + 1        # no step after the last row finished


def test_cached_logits_equal_uncached(generators, checkpoints):
    """The -O3 cached decoder driven by the generator's device cache vs the plain graph on the
    whole sequence (left-padded batch, HF position ids)."""
    from tgraph.api import build
    from tgraph.codegen.onnx import to_onnx
    from tgraph.runtime import DeviceKVCache, Session
    from tgraph.tokens import pad_batch, position_ids

    gen = Generator(checkpoints["llama"][1], provider="cpu", kv_cache="dynamic")     # the Concat cache
    seqs = [p + r for p, r in zip(PROMPTS, gen.generate(PROMPTS, max_new_tokens=6).ids)]
    ids, mask = pad_batch(seqs, 0, "left")
    pos = position_ids(mask)
    plain = Session(to_onnx(build(checkpoints["llama"][1], level=3).graph), providers="cpu")
    ref = plain.run({"input_ids": ids, "attention_mask": mask})["logits"]
    cache, got, prefill = DeviceKVCache(gen.decoder, 2), [], 5
    for a, b in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        got.append(cache.step({"input_ids": ids[:, a:b], "attention_mask": mask[:, :b],
                               "position_ids": np.ascontiguousarray(pos[:, a:b])}, fetch=["logits"])["logits"])
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - ref[real])) <= 1e-4


# ------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible(generators):
    gen = generators["gpt2"]
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    a = gen.generate(PROMPTS, seed=7, **kw)
    b = gen.generate(PROMPTS, seed=7, **kw)
    c = gen.generate(PROMPTS, seed=8, **kw)
    assert a.ids == b.ids and a.ids != c.ids
    greedy = gen.generate(PROMPTS, max_new_tokens=NEW)
    assert a.ids != greedy.ids


logit_rows = st.integers(2, 40).flatmap(lambda v: arrays(
    np.float32, (3, v), elements=st.floats(-8, 8, width=32)))


def _topk_set(row, k):
    """Independent definition: fewer than k tokens have a strictly larger logit."""
    return np.array([np.sum(row > x) < k for x in row])


@settings(max_examples=150, deadline=None)
@given(logit_rows, st.integers(0, 45), st.floats(0.01, 1.0), st.floats(0.2, 3.0), st.integers(0, 2**32 - 1))
def test_sampled_tokens_stay_in_the_top_k_top_p_set(logits, k, p, temperature, seed):
    config = SamplingConfig(do_sample=True, temperature=temperature, top_k=k, top_p=p, seed=seed)
    allowed = allowed_tokens(logits, config)
    picks = next_tokens(logits, config, np.random.default_rng(seed))
    for row, ok, pick in zip(logits, allowed, picks):
        assert ok[pick]
        if k:
            assert _topk_set(row, k)[pick] and not (ok & ~_topk_set(row, k)).any()
        # top-p over the top-k survivors: the shortest highest-probability prefix with mass >= p
        scaled = top_k_filter(row.astype(np.float64) / temperature, k)
        probs = softmax(scaled)
        kept = probs[ok]
        assert kept.sum() >= p - 1e-9
        assert kept.sum() - kept.min() < p + 1e-9 or ok.sum() == 1
        assert not ((probs > kept.min() + 1e-12) & ~ok).any()     # nothing likelier was dropped


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (4, 12), elements=st.floats(-5, 5)), st.floats(0.01, 1.0))
def test_top_p_keeps_the_minimal_prefix(logits, p):
    kept = np.isfinite(top_p_filter(logits, p))
    for row, ok in zip(logits, kept):
        probs = softmax(row)
        order = np.argsort(-probs, kind="stable")
        total, n = 0.0, 0
        for q in probs[order]:                   # walk down the sorted distribution until mass >= p
            if total >= p:
                break
            total, n = total + q, n + 1
        before = total - probs[order][n - 1]
        if min(abs(total - p), abs(before - p)) < 1e-9:
            continue                             # p sits on a boundary: rounding decides
        assert sorted(np.flatnonzero(ok)) == sorted(order[:n])


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (3, 20), elements=st.floats(-5, 5)), st.integers(0, 2**32 - 1))
def test_temperature_to_zero_is_greedy(logits, seed):
    top2 = np.sort(logits, axis=1)[:, -2:]
    if not (top2[:, 1] - top2[:, 0] > 1e-3).all():
        return                                                       # a tie: greedy is ambiguous
    cold = SamplingConfig(do_sample=True, temperature=1e-6, seed=seed)
    assert (next_tokens(logits, cold) == np.argmax(logits, axis=1)).all()
    zero = SamplingConfig(do_sample=True, temperature=0.0, seed=seed)
    assert (next_tokens(logits, zero) == np.argmax(logits, axis=1)).all()


def test_sampling_options_are_checked():
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            SamplingConfig(do_sample=True, **bad)


# ------------------------------------------------------------------ streaming, text, errors
def test_streaming_sees_tokens_in_order(generators):
    gen = generators["t5"]
    seen = []
    result = gen.generate(PROMPTS, max_new_tokens=8, callback=lambda s: seen.append((s.index, s.tokens.copy())))
    assert [i for i, _ in seen] == list(range(8))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), result.tokens)
    streamed = [s.tokens.tolist() for s in gen.stream(PROMPTS, max_new_tokens=8)]
    assert streamed == result.tokens.T.tolist()


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[PAD]"])
    tok.save(str(path / "tokenizer.json"))


def test_text_round_trip_with_a_tokenizer(checkpoints, tmp_path):
    import shutil

    _, path = checkpoints["llama"]
    shutil.copytree(path, tmp_path / "ckpt")
    _word_tokenizer(tmp_path / "ckpt")
    gen = Generator(str(tmp_path / "ckpt"), provider="cpu")
    text = [" ".join(f"w{i}" for i in p) for p in PROMPTS]
    result = gen.generate(text, max_new_tokens=10)
    assert result.ids == generate(path, PROMPTS, max_new_tokens=10, provider="cpu").ids
    assert result.text == [" ".join(f"w{i}" for i in row if i) for row in result.ids]


def test_bad_input_is_one_clear_error(generators, checkpoints):
    gen = generators["gpt2"]
    with pytest.raises(InputError, match="outside the vocabulary"):
        gen.generate([[1, VOCAB]])
    with pytest.raises(InputError, match="no tokenizer.json"):
        gen.generate("hello")
    with pytest.raises(InputError, match="no prompt"):
        gen.generate([])
    with pytest.raises(InputError, match="needs 67 positions but the model has 64"):
        gen.generate([list(range(60))], max_new_tokens=8)
    with pytest.raises(InputError, match="max_new_tokens"):
        gen.generate([[1]], max_new_tokens=0)
    with pytest.raises(ConfigError, match="cannot generate"):
        Generator("bert", overrides={"num_layers": "1", "d_model": "16", "num_heads": "2", "d_ff": "16",
                                     "vocab_size": "20"})


def test_registered_encoder_decoder_with_a_bos_option():
    """A registered Transformer (no checkpoint config): the decoder starts from the given BOS id;
    the reference is a greedy loop over the full, uncached model re-run on the whole prefix."""
    from tgraph.api import build
    from tgraph.codegen.onnx import to_onnx
    from tgraph.runtime import Session

    cfg = dict(num_encoder_layers="1", num_decoder_layers="1", d_model="16", num_heads="2", d_ff="16",
               vocab_size="30", max_len="32")
    src, mask = np.array([[3, 4, 5], [6, 0, 0]]), np.array([[1, 1, 1], [1, 0, 0]])
    got = generate("transformer", [[3, 4, 5], [6]], max_new_tokens=6, overrides=cfg, bos_token_id=7,
                   pad_token_id=0, provider="cpu")
    full = Session(to_onnx(build("transformer", cfg, level=0).graph), providers="cpu")
    out = np.full((2, 1), 7)
    for _ in range(6):
        logits = full.run({"input_ids": src, "attention_mask": mask, "decoder_input_ids": out})["logits"]
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(got.tokens, out[:, 1:])


# ------------------------------------------------------------------ CLI
def test_cli_json_and_stream(checkpoints, capsys):
    _, path = checkpoints["gpt2"]
    expected = generate(path, PROMPTS, max_new_tokens=6, provider="cpu").ids
    assert main(["generate", path, "--prompt-ids", "5,17,3,44,9,28,13", "--max-new-tokens", "6", "--json",
                 "--provider", "cpu"]) == 0
    out, err = capsys.readouterr()
    one = json.loads(out)
    assert set(one) == {"ids", "text", "tokens_per_s"} and one["ids"] == expected[0] and one["text"] is None
    assert "CPUExecutionProvider" in err
    assert main(["generate", path, "--prompt-ids", "5,17,3,44,9,28,13", "--prompt-ids", "31,2,50",
                 "--max-new-tokens", "6", "--json", "--provider", "cpu"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert [row["ids"] for row in batch] == expected
    assert main(["generate", path, "--prompt-ids", "31,2,50", "--max-new-tokens", "6", "--stream",
                 "--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    assert " ".join(map(str, expected[1])) in out and "CPUExecutionProvider" in out


def test_cli_sampling_and_text(checkpoints, tmp_path, capsys):
    import shutil

    shutil.copytree(checkpoints["llama"][1], tmp_path / "ckpt")
    _word_tokenizer(tmp_path / "ckpt")
    args = ["generate", str(tmp_path / "ckpt"), "--prompt", "w5 w17 w3", "--max-new-tokens", "8", "--json",
            "--temperature", "1.3", "--top-k", "10", "--top-p", "0.9", "--seed", "4", "--provider", "cpu"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["ids"], first["text"]) == (second["ids"], second["text"]) and len(first["ids"]) == 8
    assert first["text"] == " ".join(f"w{i}" for i in first["ids"] if i)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "3"], "give --prompt TEXT or --prompt-ids"),
    (["--prompt", "hello"], "no tokenizer.json"),
    (["--prompt-ids", "1,x"], "--prompt-ids expects"),
    (["--prompt-ids", "1,999"], "outside the vocabulary"),
    (["--prompt-ids", "1", "--greedy", "--top-k", "3"], "--greedy"),
])
def test_cli_errors_are_one_line(checkpoints, capsys, argv, message):
    assert main(["generate", checkpoints["gpt2"][1], "--provider", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_refuses_a_non_decoder(capsys):
    assert main(["generate", "bert", "--prompt-ids", "1,2", "--set", "num_layers=1", "--set", "d_model=16",
                 "--set", "num_heads=2", "--set", "d_ff=16"]) == 2
    assert "cannot generate" in capsys.readouterr().err
