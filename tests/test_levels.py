"""Every zoo family at every optimization level: same numbers, and fully fused at the top.

Correctness: onnxruntime, with its own graph optimizations disabled (ORT_DISABLE_ALL) so it
cannot hide a bug of ours, runs the -O0 graph and the graph of each level on the same
inputs (padding in the masks included); outputs must agree within 1e-5 (fp32, random
weights, tiny dims, 2 layers, an odd vocabulary).

Fusion: at the highest level every attention block is one fused attention op, every norm
one fused norm op, every GELU one Gelu and every rotary embedding one RotaryEmbedding;
the expected numbers are counted from the config, and none of the primitive ops those
formulas are made of (ReduceMean, Softmax, Erf, Exp, Sqrt, Pow, Neg) is left over.
"""
from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
import pytest

from model_harness import run_onnx
from tgraph.api import build
from tgraph.models import zoo  # noqa: F401  (registers every family)
from tgraph.models.registry import MODELS, make_config
from tgraph.passes.levels import MAX_LEVEL

VOCAB = 67                                  # odd, so no dim accidentally lines up with another
TOL = 1e-5

# Fused forms that count as "one op": the standard ops, and the onnxruntime contrib forms an
# -O3 pass may turn them into (a skip-norm also absorbs the residual Add, still one per norm).
ATTENTION_OPS = ("Attention", "com.microsoft.MultiHeadAttention", "com.microsoft.GroupQueryAttention")
NORM_OPS = ("LayerNormalization", "RMSNormalization", "com.microsoft.SkipLayerNormalization",
            "com.microsoft.SkipSimplifiedLayerNormalization")
ROTARY_OPS = ("RotaryEmbedding", "com.microsoft.RotaryEmbedding")
GELU_OPS = ("Gelu", "com.microsoft.Gelu", "com.microsoft.FastGelu", "com.microsoft.BiasGelu")
PRIMITIVES = ("ReduceMean", "Softmax", "Erf", "Exp", "Sqrt", "Pow", "Neg")


@dataclass(frozen=True)
class Expect:
    attention: int
    norms: int
    gelu: int = 0
    rotary: int = 0
    tanh: int = 0                           # tanh outside GELU (BERT's pooler)


def _gelu(act: str) -> bool:
    return act.startswith("gelu")


def _bert_like(c) -> Expect:
    mlm = c.head in ("mlm", "pretraining")
    return Expect(attention=c.num_layers, norms=1 + 2 * c.num_layers + mlm,
                  gelu=(c.num_layers + mlm) * _gelu(c.activation), tanh=int(c.head != "mlm"))


def _bart_like(c) -> Expect:
    """Each stack's layernorm_embedding, 2 (encoder) or 3 (decoder) norms a layer, mBART's final norms."""
    layers = c.encoder_layers + c.decoder_layers
    return Expect(attention=c.encoder_layers + 2 * c.decoder_layers,
                  norms=2 + 2 * c.encoder_layers + 3 * c.decoder_layers + 2 * c.normalize_before,
                  gelu=layers * _gelu(c.activation_function))


BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=2,
            encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64)

# family -> (tiny config overrides, expected fused counts from the config)
FAMILIES: Dict[str, tuple] = {
    "transformer": (dict(d_model=32, num_heads=4, d_ff=48, num_encoder_layers=2, num_decoder_layers=2, max_len=64),
                    lambda c: Expect(c.num_encoder_layers + 2 * c.num_decoder_layers,
                                     2 * c.num_encoder_layers + 3 * c.num_decoder_layers)),
    "gpt": (dict(n_positions=64, n_embd=32, n_layer=2, n_head=4),
            lambda c: Expect(c.n_layer, 2 * c.n_layer, gelu=c.n_layer * _gelu(c.activation))),
    "gpt2": (dict(n_positions=64, n_embd=32, n_layer=2, n_head=4),
             lambda c: Expect(c.n_layer, 2 * c.n_layer + 1, gelu=c.n_layer * _gelu(c.activation))),
    "gpt_neo": (dict(max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4, window_size=3),
                lambda c: Expect(c.num_layers, 2 * c.num_layers + 1, gelu=c.num_layers * _gelu(c.activation))),
    "bert": (dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position_embeddings=64,
                  head="pretraining"), _bert_like),
    "roberta": (dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position_embeddings=64,
                     head="mlm"), _bert_like),
    "albert": (dict(hidden_size=32, embedding_size=16, num_layers=2, num_heads=4, intermediate_size=48,
                    max_position_embeddings=64, head="pretraining"), _bert_like),
    "t5": (dict(d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
           lambda c: Expect(c.num_layers + 2 * c.decoder_layers, 2 * c.num_layers + 1 + 3 * c.decoder_layers + 1)),
    "bart": (BART, _bart_like),
    "mbart": (BART, _bart_like),
    "llama": (dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48),
              lambda c: Expect(c.num_layers, 2 * c.num_layers + 1, rotary=2 * c.num_layers)),
    "palm": (dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, d_ff=48, rotary_pct=0.5),
             lambda c: Expect(c.num_layers, c.num_layers * (1 if c.shared_norm else 2) + 1, rotary=2 * c.num_layers)),
    "xlnet": (dict(d_model=30, num_layers=2, num_heads=3, d_inner=44),
              lambda c: Expect(c.num_layers, 2 * c.num_layers, gelu=c.num_layers * _gelu(c.ff_activation))),
}


def overrides(family: str) -> Dict[str, str]:
    return {"vocab_size": str(VOCAB), **{k: str(v) for k, v in FAMILIES[family][0].items()}}


def feeds_for(graph, seed: int = 0) -> Dict[str, np.ndarray]:
    """Token ids in the vocabulary, masks with the last position of batch row 0 padded."""
    rng = np.random.default_rng(seed)
    dims = {"batch": 2, "seq": 7, "decoder_seq": 5}
    out = {}
    for v in graph.inputs:
        shape = tuple(dims[d] if isinstance(d, str) else d for d in v.shape)
        if v.name.endswith("mask"):
            a = np.ones(shape, np.int64)
            a[0, -1] = 0
        elif v.name.endswith("token_type_ids"):
            a = rng.integers(0, 2, shape)
        else:
            a = rng.integers(0, VOCAB, shape)
        out[v.name] = a.astype(v.dtype.numpy)
    return out


def test_every_family_is_covered():
    assert set(FAMILIES) == set(MODELS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_levels_agree_and_fuse_fully(family):
    ov = overrides(family)
    graphs = {level: build(family, ov, level=level).graph for level in range(MAX_LEVEL + 1)}
    feeds = feeds_for(graphs[0])
    want = run_onnx(graphs[0], feeds)
    for level in range(1, MAX_LEVEL + 1):
        got = run_onnx(graphs[level], feeds)
        assert set(got) == set(want)
        for name in want:
            diff = float(np.max(np.abs(got[name].astype(np.float64) - want[name])))
            assert diff <= TOL, f"{family} -O{level} {name}: max abs diff {diff:.3g} vs -O0"

    expect: Expect = FAMILIES[family][1](make_config(MODELS[family].config_cls, ov))
    for level in sorted({2, MAX_LEVEL}):          # the fusion level, and the highest
        hist = graphs[level].op_histogram()
        where = f"{family} -O{level}"
        count: Callable[[tuple], int] = lambda ops: sum(hist.get(op, 0) for op in ops)   # noqa: E731
        assert count(ATTENTION_OPS) == expect.attention, f"{where}: attention ops {hist}"
        assert count(NORM_OPS) == expect.norms, f"{where}: norm ops {hist}"
        assert count(GELU_OPS) == expect.gelu, f"{where}: gelu ops {hist}"
        assert count(ROTARY_OPS) == expect.rotary, f"{where}: rotary ops {hist}"
        assert hist.get("Tanh", 0) == expect.tanh, f"{where}: Tanh outside GELU {hist}"
        left = {op: hist[op] for op in PRIMITIVES if op in hist}
        assert not left, f"{where}: primitive ops left after fusion: {left}"
        assert "tgraph.CausalMask" not in hist


def test_O0_keeps_the_formulas():
    """The counts above are the fusions' doing: -O0 has none of the fused ops."""
    hist = build("llama", overrides("llama"), level=0).graph.op_histogram()
    assert not any(op in hist for op in ATTENTION_OPS + NORM_OPS + ROTARY_OPS)
    assert hist.get("ReduceMean") == 5 and hist.get("Neg") == 4


# ---------------------------------------------------------------- the level table (issue 11, item 3)
def test_every_name_in_the_level_table_is_a_registered_pass():
    from tgraph.passes import PASSES
    from tgraph.passes.levels import LEVEL_TABLE

    unknown = {level: [n for n in names if n not in PASSES] for level, names in LEVEL_TABLE.items()}
    assert not any(unknown.values()), f"level table names unregistered passes: {unknown}"
    assert LEVEL_TABLE[0] == () and sorted(LEVEL_TABLE) == list(range(MAX_LEVEL + 1))


def test_canonicalize_runs_first_at_O2_once_it_exists():
    """The `canonicalize` pass normalises formulas for the fusions, so it must open -O2 and -O3."""
    from tgraph.passes import PASSES
    from tgraph.passes.levels import LEVEL_TABLE

    if "canonicalize" in PASSES:
        assert LEVEL_TABLE[2][0] == LEVEL_TABLE[3][0] == "canonicalize", "put it in levels.CANONICALIZE"
    else:
        assert all("canonicalize" not in names for names in LEVEL_TABLE.values())


def test_the_order_of_the_table_matters_causal_mask_after_attention():
    """`causal-mask` makes explicit the masks fusion did not absorb: run before `fuse-attention`
    it would take every mask, and no attention block would fuse."""
    from tgraph.passes import level_pipeline, optimize
    from tgraph.passes.levels import CLEANUP, FUSIONS

    ov = overrides("llama")
    as_listed = build("llama", ov, level=2).graph.op_histogram()
    assert as_listed.get("Attention") == 2 and level_pipeline(2).index("causal-mask") > \
        level_pipeline(2).index("fuse-attention")
    moved = ("causal-mask",) + tuple(n for n in FUSIONS if n != "causal-mask")
    graph = build("llama", ov, level=0).graph
    optimize(graph, pipeline=list(CLEANUP + moved + CLEANUP))
    assert "Attention" not in graph.op_histogram()
