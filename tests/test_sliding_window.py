"""Sliding-window (local) attention: `tgraph.CausalMask`'s `window`, through every backend,
the fusions and both KV-cache layouts; Mistral and Qwen2 `sliding_window` against Hugging Face.

Oracles: the definition written as loops, onnxruntime (the ONNX lowering, its own
GroupQueryAttention `local_window_size`), the unfused graph (-O0) against the fused one, and
HF transformers (eager attention) on random-initialised checkpoints saved with
`save_pretrained` — forward logits on right- and left-padded batches longer than the window,
and greedy `generate` over prompt + new tokens longer than the window. GPT-Neo's local layers
are tested in tests/models/test_gpt_neo.py.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from model_harness import build, rel_err, run_numpy, run_onnx
from tgraph.dsl import InputSpec, Module, MultiHeadAttention, trace
from tgraph.errors import ConfigError
from tgraph.ir import DType
from tgraph.ir.evaluate import evaluate
from tgraph.ir.kernels import causal_mask
from tgraph.passes import optimize
from tgraph.sources import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW = 5
SEQ = 16


# ------------------------------------------------------------------------------ the op
def _by_definition(tq, tk, window):
    """keep[i, j]: key j is at most `window - 1` positions before query i + past, and not after it."""
    past = tk - tq
    keep = np.zeros((tq, tk), bool)
    for i in range(tq):
        for j in range(tk):
            keep[i, j] = j <= i + past and (window == 0 or j > i + past - window)
    return keep


@pytest.mark.parametrize("tq,tk,window", [(6, 6, 3), (1, 9, 4), (3, 8, 1), (4, 4, 9), (5, 3, 2), (7, 7, 0)])
def test_window_kernel_is_the_definition(tq, tk, window):
    scores = np.random.default_rng(0).normal(size=(2, tq, tk)).astype(np.float32)
    got = causal_mask(scores, window=window)
    keep = _by_definition(tq, tk, window)
    np.testing.assert_array_equal(got, np.where(keep, scores, np.finfo(np.float32).min))


def test_causal_mask_pass_writes_the_window_in_standard_ops():
    """`causal-mask` replaces the op by Range/Less/Where arithmetic that computes the same mask
    at every run-time shape (the graph's dims are symbolic)."""
    from tgraph.ir import Builder, TensorType

    b = Builder()
    g = b.graph
    x = g.add_input("scores", TensorType(DType.float32, ("b", "q", "k")))
    g.outputs = [b.op("CausalMask", x, domain="tgraph", window=3)]
    optimize(g, pipeline="causal-mask")
    assert "tgraph.CausalMask" not in g.op_histogram()
    for tq, tk in ((5, 5), (2, 7), (1, 4)):
        s = np.random.default_rng(tq).normal(size=(2, tq, tk)).astype(np.float32)
        np.testing.assert_array_equal(evaluate(g, {"scores": s})[g.outputs[0].name], causal_mask(s, window=3))
        np.testing.assert_array_equal(run_onnx(g, {"scores": s})[g.outputs[0].name], causal_mask(s, window=3))


def test_window_needs_causal_and_a_valid_size():
    with pytest.raises(ConfigError, match="window"):
        MultiHeadAttention(32, 4, window=3)                 # not causal
    with pytest.raises(ConfigError, match="window"):
        MultiHeadAttention(32, 4, causal=True, window=-1)


class _LocalBlock(Module):
    """Grouped-query causal self-attention with a window and a padding mask."""

    def __init__(self, window):
        super().__init__()
        self.attn = MultiHeadAttention(32, 4, num_kv_heads=2, causal=True, window=window)

    def input_specs(self):
        return {"x": InputSpec(DType.float32, ("batch", "seq", 32)), "mask": InputSpec(DType.int64, ("batch", "seq"))}

    def forward(self, x, mask):
        from tgraph.dsl import padding_keep_mask
        return {"y": self.attn(x, keep_mask=padding_keep_mask(mask))}


def test_fused_attention_keeps_the_window_as_an_explicit_mask():
    """At -O2 the windowed attention is one Attention op with is_causal=0 and a mask input
    (a window is not `is_causal`), and computes what the unfused graph does, padded rows too."""
    block = _LocalBlock(window=3)
    g0 = trace(block, block.input_specs())
    g2 = trace(block, block.input_specs())
    optimize(g2, level=2)
    att = [n for n in g2.nodes if n.op == "Attention"]
    assert len(att) == 1 and att[0].attrs["is_causal"] == 0 and len(att[0].inputs) == 4
    assert "Softmax" not in g2.op_histogram() and "tgraph.CausalMask" not in g2.op_histogram()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 9, 32)).astype(np.float32)
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0                                         # right padding
    mask[2, :4] = 0                                         # left padding: rows 0..3 see no key
    feeds = {"x": x, "mask": mask}
    want = evaluate(g0, feeds)["y"]
    for got in (run_onnx(g2, feeds)["y"], run_onnx(g0, feeds)["y"], evaluate(g2, feeds)["y"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = evaluate(trace(_LocalBlock(window=0), block.input_specs()), feeds)["y"]
    assert np.abs(full - want).max() > 1e-3                # the window changes the result


# ------------------------------------------------------------------ GroupQueryAttention
def _gqa_model(window, seq, max_len, heads=4, kv_heads=2, d=8):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"],
                            ["y", "present_k", "present_v"], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=kv_heads, local_window_size=window)
    f = T.FLOAT
    ins = [helper.make_tensor_value_info("q", f, [2, seq, heads * d]),
           helper.make_tensor_value_info("k", f, [2, seq, kv_heads * d]),
           helper.make_tensor_value_info("v", f, [2, seq, kv_heads * d]),
           helper.make_tensor_value_info("pk", f, [2, kv_heads, max_len, d]),
           helper.make_tensor_value_info("pv", f, [2, kv_heads, max_len, d]),
           helper.make_tensor_value_info("seqlens", T.INT32, [2]),
           helper.make_tensor_value_info("total", T.INT32, [])]
    outs = [helper.make_tensor_value_info(n, f, None) for n in ("y", "present_k", "present_v")]
    graph = helper.make_graph([node], "gqa", ins, outs)
    return onnx.helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                       helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("window", [1, 3, 6])
def test_group_query_attention_window_matches_onnxruntime(window):
    """The NumPy kernel's `local_window_size` (query at p sees p - W < j <= p) is onnxruntime's,
    on a prompt (rows of 8 and 5 valid tokens) and on a decode step after it."""
    import onnxruntime as ort

    from tgraph.ir.contrib import group_query_attention

    rng = np.random.default_rng(window)
    max_len, d = 12, 8
    attrs = dict(num_heads=4, kv_num_heads=2, local_window_size=window)
    for seq, lengths in ((8, [8, 5]), (1, [9, 6])):
        q = rng.normal(size=(2, seq, 32)).astype(np.float32)
        k, v = (rng.normal(size=(2, seq, 16)).astype(np.float32) for _ in range(2))
        past = [rng.normal(size=(2, 2, max_len, d)).astype(np.float32) for _ in range(2)]
        feeds = dict(q=q, k=k, v=v, pk=past[0], pv=past[1], seqlens=np.array(lengths, np.int32) - 1,
                     total=np.array(seq if seq > 1 else max(lengths), np.int32))
        sess = ort.InferenceSession(_gqa_model(window, seq, max_len).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        want = sess.run(["y"], feeds)[0]
        got = group_query_attention(*feeds.values(), **attrs)[0]
        for row, n in enumerate(lengths):              # prompt rows past their length are padding
            valid = n if seq > 1 else 1
            np.testing.assert_allclose(got[row, :valid], want[row, :valid], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Mistral and Qwen2
def _mistral(**kw):
    return transformers.MistralConfig(vocab_size=83, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                                      max_position_embeddings=64, tie_word_embeddings=False,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


def _qwen2(**kw):
    # 3 layers, the first full (max_window_layers=1), the others local: a mixed layout
    return transformers.Qwen2Config(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True,
                                    sliding_window=4, max_window_layers=1, max_position_embeddings=64,
                                    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                                    pad_token_id=None, **kw)


HF_CONFIGS = {"mistral": _mistral, "qwen2": _qwen2}


def _hf_model(config, state=None):
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if state is not None:
        model.load_state_dict(state)
        return model
    with torch.no_grad():              # larger than HF's init: attention far from uniform
        for name, p in model.named_parameters():
            p.normal_(0, 0.3) if p.ndim >= 2 else p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = _hf_model(make())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (str(path), model)
    return out


def padded_batch(vocab, seq=SEQ, seed=0):
    """Three rows longer than the window: full, right-padded (with a hole), left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, seq)).astype(np.int64)
    mask = np.ones((3, seq), np.int64)
    mask[1, seq - 3:], mask[1, 7] = 0, 0
    mask[2, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hf_logits(model, feeds):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(feeds["input_ids"]),
                     attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()


def check_parity(source, hf_model, feeds, tol=1e-4):
    """ONNX -O0 and -O3 and the NumPy module against HF at the real tokens (a padded query's
    output is not defined: HF averages its masked keys, ONNX Attention-23 gives zeros)."""
    real = feeds["attention_mask"].astype(bool)
    ref = hf_logits(hf_model, feeds)
    errors = {f"onnx-O{lvl}": rel_err(run_onnx(build(source, lvl), feeds)["logits"][real], ref[real])
              for lvl in (0, 3)}
    errors["numpy-O3"] = rel_err(run_numpy(build(source, 3), feeds)["logits"][real], ref[real])
    assert max(errors.values()) <= tol, errors
    return errors


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_sliding_window_matches_transformers(checkpoints, name):
    path, hf_model = checkpoints[name]
    loaded = load_model(path)
    check_parity(loaded, hf_model, padded_batch(loaded.config.vocab_size))
    g2 = build(loaded, 2)                              # every attention fused, windows included
    hist = g2.op_histogram()
    assert hist.get("Attention") == loaded.config.num_layers and "Softmax" not in hist, hist
    windows = [loaded.config.window(i) for i in range(loaded.config.num_layers)]
    causal = [n.attrs["is_causal"] for n in g2.nodes if n.op == "Attention"]
    assert causal == [int(w == 0) for w in windows]


def test_configs_mapped_as_intended(checkpoints):
    c = load_model(checkpoints["mistral"][0]).config
    assert [c.window(i) for i in range(2)] == [WINDOW, WINDOW]
    c = load_model(checkpoints["qwen2"][0]).config
    assert [c.window(i) for i in range(3)] == [0, 4, 4]


@pytest.mark.parametrize("window", [WINDOW - 1, WINDOW + 1, None])
def test_a_wrong_window_is_detected(checkpoints, window):
    """The parity test can fail: HF with a window one narrower, one wider or none at all
    disagrees with tgraph's window-5 graph by far more than the tolerance."""
    path, model = checkpoints["mistral"]
    other = _hf_model(_mistral(), state=model.state_dict())
    other.config.sliding_window = window
    feeds = padded_batch(83)
    real = feeds["attention_mask"].astype(bool)
    got = run_onnx(build(load_model(path), 2), feeds)["logits"][real]
    assert rel_err(got, hf_logits(other, feeds)[real]) > 1e-3


def test_cached_decode_slides_the_window_over_the_past(checkpoints):
    """The dynamic-cache graph (-O2, past/present): a 6-token prefill, then one token at a time
    up to 16 — each step's logits equal HF's uncached logits at that position."""
    path, model = checkpoints["mistral"]
    graph = build(load_model(path, {"use_cache": "true"}), 2)
    assert graph.op_histogram().get("Attention") == 2
    ids = np.random.default_rng(3).integers(0, 83, (1, SEQ)).astype(np.int64)
    ref = hf_logits(model, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    past = {v.name: np.zeros((1, 2, 0, 8), np.float32) for v in graph.inputs if v.name.startswith("past")}
    for a, b in [(0, 6)] + [(t, t + 1) for t in range(6, SEQ)]:
        out = run_onnx(graph, {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b), np.int64),
                               "position_ids": np.arange(a, b)[None], **past})
        assert rel_err(out["logits"][0], ref[a:b]) <= 1e-4, (a, b)
        past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}


PROMPTS = [[5, 17, 3, 44, 9, 28, 13], [31, 2, 50]]       # row 1 is left-padded by HF
NEW = 12                                                   # prompt + new = 19 > the window of 5


def hf_generate(model, prompts, new):
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, max_new_tokens=new, pad_token_id=0)
    return out.numpy()[:, longest:]


@pytest.mark.parametrize("name,kv_cache,windows", [("mistral", "static", [WINDOW, WINDOW]), ("mistral", "dynamic", None),
                                                   ("qwen2", "static", [-1, 4, 4])])
def test_greedy_generation_matches_hf_generate(checkpoints, name, kv_cache, windows):
    from tgraph.generate import Generator

    path, model = checkpoints[name]
    ref = hf_generate(model, PROMPTS, NEW)
    gen = Generator(path, provider="cpu", kv_cache=kv_cache)
    assert gen.static == (kv_cache == "static")
    np.testing.assert_array_equal(gen.generate(PROMPTS, max_new_tokens=NEW).tokens, ref)
    if kv_cache == "static":                          # the window is the op's local_window_size (-1: none)
        g = build(load_model(path, {"use_cache": "true", "kv_cache": "static", "cache_length": "32"}), 3)
        gqa = [n for n in g.nodes if n.op == "GroupQueryAttention"]
        assert [n.attrs.get("local_window_size") for n in gqa] == windows
    if name != "mistral":
        return
    full = _hf_model(_mistral(), state=model.state_dict())
    full.config.sliding_window = None
    assert (hf_generate(full, PROMPTS, NEW) != ref).any()     # the window decides some tokens


# ------------------------------------------------------------------ refusals
def _patched(src, tmp_path, changes):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("changes, message", [
    ({"sliding_window": 0}, "sliding_window=0 must be a positive integer"),
    ({"sliding_window": "8"}, "sliding_window='8' must be a positive integer"),
    ({"layer_types": ["full_attention", "chunked_attention", "sliding_attention"]},
     "layer_types containing 'chunked_attention'"),
])
def test_bad_window_options_are_refused_in_one_line(checkpoints, tmp_path, changes, message):
    name = "qwen2" if "layer_types" in changes else "mistral"
    with pytest.raises(ConfigError) as err:
        load_model(_patched(checkpoints[name][0], tmp_path, changes))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_layer_pattern_is_refused_from_the_command_line(capsys):
    from tgraph.cli import main

    assert main(["export", "llama", "-o", "/nonexistent/x.onnx", "--set", "sliding_window=4",
                 "--set", "layer_types=full_attention,sparse"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgraph: error: llama: layer_types must be") and "\n" not in err
