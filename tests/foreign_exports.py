"""Exports of small random-initialised Hugging Face models that tgraph did not write.

One job: turn a (kind, dtype, exporter, opset) case into an ONNX file the way a user's
`torch.onnx.export` call would, so tests/test_foreign_graphs_more.py can import and fuse
it. GPT-2 and LLaMA come from tests/test_foreign_graphs.py (the same configs); GPT-J
(interleaved rotary) and T5 (encoder-decoder, relative position bias, RMSNorm without
mean subtraction, no attention scale) are built here at the same size.
"""
import warnings

import numpy as np
import onnx
import pytest

from test_foreign_graphs import HEADS, HIDDEN, IDS, LAYERS, MASK, _hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# decoder side of T5: 4 target tokens, the second row padded after 3
DEC_IDS = np.random.default_rng(1).integers(0, 100, (2, 4)).astype(np.int64)
DEC_MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int64)


class _LastHidden(torch.nn.Module):
    """Decoder-only model -> last_hidden_state, no KV cache."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class _Seq2SeqHidden(torch.nn.Module):
    """Encoder-decoder model -> (decoder last_hidden_state, encoder last_hidden_state), no cache."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        out = self.m(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                     decoder_attention_mask=decoder_attention_mask, use_cache=False)
        return out.last_hidden_state, out.encoder_last_hidden_state


def gptj_model(impl: str = "eager"):
    cfg = transformers.GPTJConfig(vocab_size=100, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                  rotary_dim=8, n_inner=64, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.GPTJModel(cfg).eval()


def t5_model(impl: str = "eager"):
    cfg = transformers.T5Config(vocab_size=100, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=64, num_layers=LAYERS,
                                num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0,
                                eos_token_id=1)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.T5Model(cfg).eval()


def feeds_for(kind: str) -> dict:
    """The inputs every export of `kind` takes (with a padded row), as NumPy arrays."""
    feeds = {"input_ids": IDS, "attention_mask": MASK}
    if kind == "t5":
        feeds.update(decoder_input_ids=DEC_IDS, decoder_attention_mask=DEC_MASK)
    return feeds


def output_names_for(kind: str):
    return ["last_hidden_state", "encoder_last_hidden_state"] if kind == "t5" else ["last_hidden_state"]


def module_for(kind: str, impl: str, dtype: str):
    if kind in ("gpt2", "llama"):
        model = _hf_model(kind, impl)
    elif kind == "gptj":
        model = gptj_model(impl)
    elif kind == "t5":
        model = t5_model(impl)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if dtype == "fp16":
        model = model.half()
    return _Seq2SeqHidden(model) if kind == "t5" else _LastHidden(model)


def export(kind: str, impl: str, dtype: str, exporter: str, opset: int, path) -> onnx.ModelProto:
    """torch.onnx.export of the case into `path` (batch and sequence axes dynamic); the loaded model."""
    module = module_for(kind, impl, dtype)
    feeds = feeds_for(kind)
    names = list(feeds)
    args = tuple(torch.tensor(feeds[n]) for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {n: {0: "batch", 1: "dec_seq" if n.startswith("decoder") else "seq"} for n in names}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=output_names_for(kind),
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        else:
            pytest.importorskip("onnxscript")
            batch, seq, dec = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("dec_seq")
            shapes = {n: {0: batch, 1: dec if n.startswith("decoder") else seq} for n in names}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=output_names_for(kind),
                              dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False)
    return onnx.load(str(path))
