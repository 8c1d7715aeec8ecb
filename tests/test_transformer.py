"""The paper's Transformer against an independent NumPy transcription of its equations.

The reference below is written from "Attention Is All You Need" (sections 3.1-3.5), not
from tgraph's DSL: Attention(Q,K,V) = softmax(QKᵀ/√d_k)V, MultiHead = Concat(head_i)W^O,
FFN(x) = max(0, xW1 + b1)W2 + b2, post-LN sublayers LayerNorm(x + Sublayer(x)), sinusoidal
positions, shared embeddings scaled by √d_model and reused as the pre-softmax projection.
"""
import math

import numpy as np
import pytest

from model_harness import check_all_backends
from tgraph.dsl import trace
from tgraph.models import get_family, make_config
from tgraph.sources import LoadedModel


def paper_transformer(P, cfg, src, tgt, src_mask):
    d, h = cfg.d_model, cfg.num_heads
    dk = d // h

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * P[f"{name}.weight"] + P[f"{name}.bias"]

    def linear(x, name):
        return x @ P[f"{name}.weight"] + P[f"{name}.bias"]

    def mha(x, mem, name, causal, key_mask):
        b, tq, _ = x.shape
        tk = mem.shape[1]
        q = linear(x, f"{name}.q_proj").reshape(b, tq, h, dk).transpose(0, 2, 1, 3)
        k = linear(mem, f"{name}.k_proj").reshape(b, tk, h, dk).transpose(0, 2, 1, 3)
        v = linear(mem, f"{name}.v_proj").reshape(b, tk, h, dk).transpose(0, 2, 1, 3)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dk)
        allowed = np.ones((b, 1, tq, tk), bool)
        if causal:
            allowed &= np.tril(np.ones((tq, tk), bool))
        if key_mask is not None:
            allowed &= key_mask[:, None, None, :].astype(bool)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        heads = (p @ v).transpose(0, 2, 1, 3).reshape(b, tq, d)
        return linear(heads, f"{name}.o_proj")

    def ffn(x, name):
        return linear(np.maximum(0, linear(x, f"{name}.up")), f"{name}.down")

    def positions(n):
        pos = np.arange(n)[:, None]
        i = np.arange(d)[None, :]
        angle = pos / np.power(10000.0, (2 * (i // 2)) / d)
        return np.where(i % 2 == 0, np.sin(angle), np.cos(angle))

    E = P["embed.weight"]

    def embed(ids):
        return E[ids] * math.sqrt(d) + positions(ids.shape[1])

    x = embed(src)
    for i in range(cfg.num_encoder_layers):
        n = f"encoder.{i}"
        x = layer_norm(x + mha(x, x, f"{n}.self_attn", False, src_mask), f"{n}.self_attn_norm")
        x = layer_norm(x + ffn(x, f"{n}.ffn"), f"{n}.ffn_norm")
    y = embed(tgt)
    for i in range(cfg.num_decoder_layers):
        n = f"decoder.{i}"
        y = layer_norm(y + mha(y, y, f"{n}.self_attn", True, None), f"{n}.self_attn_norm")
        y = layer_norm(y + mha(y, x, f"{n}.cross_attn", False, src_mask), f"{n}.cross_attn_norm")
        y = layer_norm(y + ffn(y, f"{n}.ffn"), f"{n}.ffn_norm")
    return y @ E.T


CONFIGS = [
    dict(vocab_size=97, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=2),
    dict(vocab_size=50, d_model=48, num_heads=3, d_ff=40, num_encoder_layers=1, num_decoder_layers=3,
         layer_norm_eps=1e-6),
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_transformer_matches_paper_equations(overrides):
    family = get_family("transformer")
    cfg = make_config(family.config_cls, overrides)
    model = family.build(cfg)
    params = {n: v.const.astype(np.float64) for n, v in trace(model, model.input_specs(), seed=3).parameters().items()}
    rng = np.random.default_rng(0)
    src = rng.integers(0, cfg.vocab_size, (2, 7))
    tgt = rng.integers(0, cfg.vocab_size, (2, 5))
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0                                   # second row padded on the right
    ref = paper_transformer(params, cfg, src, tgt, mask)
    inputs = {"input_ids": src, "decoder_input_ids": tgt, "attention_mask": mask}
    loaded = LoadedModel(model, "transformer", "registered", cfg, cfg.vocab_size)

    from tgraph.api import build
    from model_harness import rel_err, run_onnx, run_numpy

    for level in (0, 1, 2, 3):
        graph = build(loaded, seed=3, level=level).graph
        assert rel_err(run_onnx(graph, inputs)["logits"], ref) <= 1e-4, level
    assert rel_err(run_numpy(build(loaded, seed=3, level=2).graph, inputs)["logits"], ref) <= 1e-4


def test_padding_does_not_change_real_tokens():
    family = get_family("transformer")
    cfg = make_config(family.config_cls, CONFIGS[0])
    loaded = LoadedModel(family.build(cfg), "transformer", "registered", cfg, cfg.vocab_size)
    from tgraph.api import build
    from model_harness import run_onnx

    graph = build(loaded, level=2).graph
    rng = np.random.default_rng(1)
    src = rng.integers(0, cfg.vocab_size, (1, 4))
    tgt = rng.integers(0, cfg.vocab_size, (1, 3))
    alone = run_onnx(graph, {"input_ids": src, "decoder_input_ids": tgt, "attention_mask": np.ones((1, 4), np.int64)})
    padded_src = np.concatenate([src, np.zeros((1, 3), np.int64)], axis=1)
    padded = run_onnx(graph, {"input_ids": padded_src, "decoder_input_ids": tgt,
                              "attention_mask": np.array([[1, 1, 1, 1, 0, 0, 0]])})
    np.testing.assert_allclose(padded["logits"], alone["logits"], atol=1e-5)


def test_config_errors_name_the_field():
    from tgraph.errors import ConfigError

    family = get_family("transformer")
    with pytest.raises(ConfigError, match=r"d_model \(30\) is not divisible by num_heads \(4\)"):
        make_config(family.config_cls, {"d_model": "30", "num_heads": "4"})
    with pytest.raises(ConfigError, match="--set dmodel: TransformerConfig has no such key .did you mean 'd_model'"):
        make_config(family.config_cls, {"dmodel": "32"})
    with pytest.raises(ConfigError, match="expected int"):
        make_config(family.config_cls, {"d_model": "big"})
