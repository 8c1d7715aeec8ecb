"""KV-cache export: prefill + step-by-step decoding with the cache gives the logits of one full run.

For every decoder (gpt, gpt2, llama with grouped KV heads, palm with one KV head, the
Transformer's, T5's and BART's decoders, split from their encoders, which compute the
cross-attention keys/values once) the reference is the model's own
graph without a cache run on the whole sequence; the cached graph is run on the first k tokens
with an empty past (past_seq = 0), then one token at a time, feeding each step's `present.*`
back as `past_key_values.*`. Checked on onnxruntime at -O0 and -O2 (where every layer's
attention must be one fused Attention) and on the generated NumPy module; GPT-2 and LLaMA
checkpoints are also compared with Hugging Face's own `past_key_values` decoding.
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest

from model_harness import rel_err
from tgraph.api import build
from tgraph.errors import ConfigError

TOL = 1e-4
VOCAB = 61

DECODERS = {   # family -> (small config, layers, kv heads, head_dim)
    "gpt2": (dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64), 2, 4, 8),
    "gpt": (dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64), 2, 4, 8),
    "llama": (dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, vocab_size=VOCAB), 2, 2, 8),
    "palm": (dict(num_layers=2, d_model=32, num_heads=4, d_ff=48, vocab_size=VOCAB, rotary_pct=0.5), 2, 1, 8),
}
SEQ2SEQ = {
    "transformer": (dict(num_encoder_layers=2, num_decoder_layers=2, d_model=32, num_heads=4, d_ff=48,
                         vocab_size=VOCAB, max_len=64), 2, 4, 8),
    "t5": (dict(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=48, vocab_size=VOCAB,
                relative_attention_num_buckets=8, relative_attention_max_distance=6), 2, 4, 8),
    "bart": (dict(encoder_layers=1, decoder_layers=2, d_model=32, encoder_attention_heads=2, decoder_attention_heads=4,
                  encoder_ffn_dim=48, decoder_ffn_dim=40, vocab_size=VOCAB, max_position_embeddings=64), 2, 4, 8),
}


def _set(cfg, **kw):
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in {**cfg, **kw}.items()}


# ------------------------------------------------------------------------------ runners
def onnx_runner(graph):
    import onnxruntime as ort

    from tgraph.codegen.onnx import to_onnx

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names, ins = [o.name for o in sess.get_outputs()], [i.name for i in sess.get_inputs()]
    return lambda feed: dict(zip(names, sess.run(names, {k: feed[k] for k in ins})))


def numpy_runner(graph, tmp=None):
    from tgraph.codegen.numpy import load_numpy_module, write_numpy_module

    module = load_numpy_module(write_numpy_module(graph, Path(tempfile.mkdtemp(prefix="kv-")) / "model.py"))
    ins = [v.name for v in graph.inputs]
    return lambda feed: module.run({k: feed[k] for k in ins})


RUNNERS = {"onnx-O0": (0, onnx_runner), "onnx-O2": (2, onnx_runner), "numpy-O2": (2, numpy_runner)}


def empty_past(graph, batch):
    return {v.name: np.zeros((batch, v.type.shape[1], 0, v.type.shape[3]), np.float32)
            for v in graph.inputs if v.name.startswith("past_key_values.")}


def decode(run, graph, ids, mask, prefill, positions=None, extra=None):
    """Prefill `prefill` tokens, then one token per step; returns (logits of every step, last outputs)."""
    batch, total = ids.shape
    past = empty_past(graph, batch)
    if positions is None:
        positions = np.broadcast_to(np.arange(total), (batch, total))
    logits, out = [], None
    for a, b in [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]:
        feed = dict(input_ids=ids[:, a:b], attention_mask=mask[:, :b],
                    position_ids=np.ascontiguousarray(positions[:, a:b]), **past, **(extra or {}))
        out = run(feed)
        logits.append(out["logits"])
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n.startswith("present.")}
    return np.concatenate(logits, axis=1), out


def _ids(batch=2, seq=6, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)


# ------------------------------------------------------------------------------ decoder-only
@pytest.mark.parametrize("family", list(DECODERS))
def test_cached_decoding_matches_the_full_sequence(family):
    cfg, layers, kv_heads, head_dim = DECODERS[family]
    ids = _ids()
    mask = np.ones_like(ids)
    ref = onnx_runner(build(family, _set(cfg), level=0).graph)(dict(input_ids=ids, attention_mask=mask))["logits"]
    for backend, (level, runner) in RUNNERS.items():
        graph = build(family, _set(cfg, use_cache=True), level=level).graph
        if level == 2:      # one fused attention per layer, the cache concatenated outside it
            assert graph.op_histogram().get("Attention") == layers, backend
            assert "tgraph.CausalMask" not in graph.op_histogram()
        got, last = decode(runner(graph), graph, ids, mask, prefill=3)
        assert rel_err(got, ref) <= TOL, (backend, rel_err(got, ref))
        for i in range(layers):
            for kind in ("key", "value"):
                assert last[f"present.{i}.{kind}"].shape == (2, kv_heads, ids.shape[1], head_dim)


def test_cache_graph_interface():
    cfg, layers, kv_heads, head_dim = DECODERS["llama"]
    g = build("llama", _set(cfg, use_cache=True), level=0).graph
    ins = {v.name: v.type.shape for v in g.inputs}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["attention_mask"] == ("batch", "past_seq + seq") and ins["position_ids"] == ("batch", "seq")
    assert ins["past_key_values.1.value"] == ("batch", kv_heads, "past_seq", head_dim)
    outs = {v.name: v.type.shape for v in g.outputs}
    assert list(outs) == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert outs["present.0.key"] == ("batch", kv_heads, "past_seq + seq", head_dim)
    plain = build("llama", _set(cfg), level=0).graph
    assert [v.name for v in plain.inputs] == ["input_ids", "attention_mask"]


def test_positions_from_the_past_length_without_position_ids():
    """use_position_ids=false: positions past_seq .. past_seq + seq - 1 come from the past's shape."""
    for family in ("gpt2", "llama"):
        cfg = DECODERS[family][0]
        ids, mask = _ids(seed=1), np.ones((2, 6), np.int64)
        ref = onnx_runner(build(family, _set(cfg), level=0).graph)(dict(input_ids=ids, attention_mask=mask))["logits"]
        graph = build(family, _set(cfg, use_cache=True, use_position_ids=False), level=2).graph
        assert "position_ids" not in [v.name for v in graph.inputs]
        got, _ = decode(onnx_runner(graph), graph, ids, mask, prefill=2)
        assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_with_position_ids(family):
    """Row 1 is left-padded by two tokens; position_ids = cumsum(mask) - 1 (as HF's generate
    computes them) make its real tokens' logits those of the same row run alone unpadded."""
    cfg = DECODERS[family][0]
    ids, mask = _ids(seed=2), np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    plain = onnx_runner(build(family, _set(cfg), level=0).graph)
    graph = build(family, _set(cfg, use_cache=True), level=2).graph
    got, _ = decode(onnx_runner(graph), graph, ids, mask, prefill=3, positions=positions)
    row0 = plain(dict(input_ids=ids[:1], attention_mask=mask[:1]))["logits"]
    row1 = plain(dict(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:]))["logits"]
    assert rel_err(got[:1], row0) <= TOL and rel_err(got[1:, 2:], row1) <= TOL


# ------------------------------------------------------------------------------ encoder-decoder
@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_split_encoder_decoder_with_cache_matches_the_full_model(family):
    cfg, layers, kv_heads, head_dim = SEQ2SEQ[family]
    src, tgt = _ids(seq=5, seed=3), _ids(seq=6, seed=4)
    src_mask = np.ones_like(src)
    src_mask[1, 3:] = 0                                             # a right-padded source row
    full = onnx_runner(build(family, _set(cfg), level=0).graph)
    ref = full(dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt))["logits"]
    # the encoder runs once and returns each decoder layer's cross-attention K/V with its states
    encoded = onnx_runner(build(family, _set(cfg, part="encoder", use_cache=True), level=2).graph)(
        dict(input_ids=src, attention_mask=src_mask))
    cross = {k: v for k, v in encoded.items() if k.startswith("cross_attention.")}
    assert sorted(cross) == sorted(f"cross_attention.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    assert cross["cross_attention.0.key"].shape == (2, kv_heads, src.shape[1], head_dim)
    uncached = build(family, _set(cfg, part="decoder"), level=2).graph
    for backend, (level, runner) in RUNNERS.items():
        graph = build(family, _set(cfg, part="decoder", use_cache=True), level=level).graph
        assert "encoder_hidden_states" not in {v.name for v in graph.inputs}
        if level == 2:      # self- and cross-attention of every layer fused; no step re-projects the states
            assert graph.op_histogram().get("Attention") == 2 * layers, backend
            assert graph.op_histogram()["MatMul"] == uncached.op_histogram()["MatMul"] - 2 * layers
        got, last = decode(runner(graph), graph, tgt, np.ones_like(tgt), prefill=2,
                           extra=dict(cross, encoder_attention_mask=src_mask))
        assert rel_err(got, ref) <= TOL, (backend, rel_err(got, ref))
        assert last["present.1.value"].shape == (2, kv_heads, tgt.shape[1], head_dim)
    # the decoder alone, without a cache, is the full model's decoder too
    extra = dict(encoder_hidden_states=encoded["last_hidden_state"], encoder_attention_mask=src_mask)
    got = onnx_runner(uncached)(dict(input_ids=tgt, **extra))["logits"]
    assert rel_err(got, ref) <= TOL


def test_t5_decoder_padding_mask_covers_past_and_new_tokens():
    cfg = SEQ2SEQ["t5"][0]
    graph = build("t5", _set(cfg, part="decoder", use_cache=True, use_decoder_attention_mask=True), level=0).graph
    shapes = {v.name: v.type.shape for v in graph.inputs}
    assert shapes["attention_mask"] == ("batch", "past_seq + seq")
    assert shapes["cross_attention.1.value"] == ("batch", 4, "encoder_seq", 8)
    assert shapes["encoder_attention_mask"] == ("batch", "encoder_seq") and "encoder_hidden_states" not in shapes


def test_cache_options_are_checked():
    with pytest.raises(ConfigError, match="--set use_position_ids=true needs --set use_cache=true"):
        build("gpt2", _set(DECODERS["gpt2"][0], use_position_ids=True))
    with pytest.raises(ConfigError, match="--set use_cache=true needs --set part=decoder"):
        build("t5", _set(SEQ2SEQ["t5"][0], use_cache=True))
    with pytest.raises(ConfigError, match="part must be one of"):
        build("transformer", _set(SEQ2SEQ["transformer"][0], part="middle"))


# ------------------------------------------------------------------------------ Hugging Face
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, rope_theta=500.0),
}


@pytest.mark.parametrize("name", list(HF))
def test_matches_hf_past_key_values_decoding(tmp_path, name):
    from tgraph.sources import load_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF[name](), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim >= 2 else p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = _ids(seed=5), np.ones((2, 6), np.int64)
    mask[1, :2] = 0                                                  # left padding, as in batched generation
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    # Hugging Face: prefill 3 tokens, then one per step with its own past_key_values
    hf, past = [], None
    with torch.no_grad():
        for a, b in [(0, 3), (3, 4), (4, 5), (5, 6)]:
            out = model(input_ids=torch.from_numpy(ids[:, a:b]), attention_mask=torch.from_numpy(mask[:, :b]),
                        position_ids=torch.from_numpy(positions[:, a:b]), past_key_values=past, use_cache=True)
            hf.append(out.logits.float().numpy())
            past = out.past_key_values
    hf = np.concatenate(hf, axis=1)
    loaded = load_model(str(tmp_path), {"use_cache": "true"})
    graph = build(loaded, level=2).graph
    got, _ = decode(onnx_runner(graph), graph, ids, mask, prefill=3, positions=positions)
    real = mask.astype(bool)                                          # padded rows' logits are not compared
    assert rel_err(got[real], hf[real]) <= TOL
