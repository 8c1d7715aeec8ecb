"""`tgraph generate --stream` prints whole characters (issue 8, item 6).

A byte-level BPE (trained here, offline, with `tokenizers`) splits "é", "ж" and "😀" into
several tokens. A random-shaped GPT-2 checkpoint whose weights make greedy decoding walk a
fixed chain of tokens (token k -> token k+1 of "café ж😀") makes the generated text known in
advance; Hugging Face's own greedy generate on the checkpoint confirms the chain.
"""
from __future__ import annotations

import numpy as np
import pytest

from tgraph.cli import main
from tgraph.tokens import TextTokenizer

TEXT = "café ж😀"


def train_byte_level_bpe(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=262, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["hello hello hello world", "the cat sat on the mat", TEXT], trainer)
    tok.save(str(path))
    return tok


def chain_checkpoint(path, chain, vocab):
    """GPT-2 whose greedy next token after chain[k] is chain[k+1]: attention and MLP outputs
    are zero, so logits = LN(wte[t]) . wte; wte[chain[k]] = r^k (b_k + b_(k+1)) / sqrt 2 with
    orthonormal zero-mean b, so token k sees k+1 at r/2 times its own score (r = 2.5)."""
    import torch
    import transformers

    n = len(chain)
    d = 2 * (n + 1)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=d, n_layer=1, n_head=1,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    basis = np.zeros((n + 1, d))
    for k in range(n + 1):
        basis[k, 2 * k], basis[k, 2 * k + 1] = 2 ** -0.5, -(2 ** -0.5)       # zero mean, orthonormal
    wte = np.zeros((vocab, d))
    for k, t in enumerate(chain):
        wte[t] = 2.5 ** k * (basis[k] + basis[k + 1]) / np.sqrt(2)
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")):
                p.zero_()
        sd["transformer.wte.weight"].copy_(torch.tensor(wte, dtype=torch.float32))
        sd["transformer.wpe.weight"].zero_()
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("chain")
    tok = train_byte_level_bpe(path / "tokenizer.json")
    ids = tok.encode(TEXT).ids
    assert len(set(ids)) == len(ids), "the chain needs distinct tokens"
    for ch in "éж😀":     # the point of the test: each of these spans several tokens
        assert not any(tok.id_to_token(i) == ch for i in ids) and len(tok.encode(ch).ids) > 1
    model = chain_checkpoint(path, ids, tok.get_vocab_size())
    out = model.generate(torch.tensor([ids[:1]]), max_new_tokens=len(ids) - 1, do_sample=False)
    assert out[0].tolist() == ids, "Hugging Face greedy decoding does not follow the chain"
    return str(path), ids


def test_stream_decoder_pieces_are_whole_characters(ckpt):
    path, ids = ckpt
    tok = TextTokenizer(path)
    decoder = tok.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.finish() == TEXT
    assert "" in pieces                     # a token that only starts a character shows nothing yet


def test_stream_decoder_finish_returns_an_unfinished_character_as_decode_does(ckpt):
    path, ids = ckpt
    tok = TextTokenizer(path)
    decoder = tok.stream_decoder()
    cut = ids[:7]                           # "café " and the first byte of "ж"
    shown = "".join(decoder.step(i) for i in cut)
    assert shown == "café "
    assert shown + decoder.finish() == tok.decode(cut)


def test_cli_stream_prints_the_generated_text(ckpt, capsys):
    path, ids = ckpt
    assert main(["generate", path, "--prompt-ids", str(ids[0]), "--max-new-tokens", str(len(ids) - 1),
                 "--stream", "--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == TEXT[1:], out               # "afé ж😀", not "af� ж�"


def test_cli_stream_with_several_prompts_prints_text(ckpt, capsys):
    path, ids = ckpt
    rows = [ids[:1], ids[:5]]               # "c" and "café": 7 new tokens end both on a character
    tok = TextTokenizer(path)
    expected = [tok.decode(ids[len(r):len(r) + 7]) for r in rows]
    assert expected == ["afé ж", " ж😀"]
    argv = ["generate", path, "--max-new-tokens", "7", "--stream", "--provider", "cpu"]
    for r in rows:
        argv += ["--prompt-ids", ",".join(map(str, r))]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    got = ["".join(l[len(f"[{i}] "):] for l in lines if l.startswith(f"[{i}] ")) for i in range(2)]
    assert got == expected, lines
    assert not any("\ufffd" in l for l in lines)
