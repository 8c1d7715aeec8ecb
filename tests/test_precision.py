"""`to-fp16` / `to-bf16`: half-precision models stay close to float32 and do not overflow
where a naive "cast everything" conversion does.

Tolerances: half-precision logits must match float32 within 1e-2 relative
(max |fp16 - fp32| / max(1, max |fp32|)); measured errors are ~1e-3 or less.
The naive baseline below is written here, independently of the pass.
"""
import numpy as np
import onnx
import pytest

from model_harness import rel_err, run_numpy, run_onnx
from tgraph.api import build
from tgraph.errors import ConfigError, RuntimeBackendError
from tgraph.ir import DType, Graph, TensorType
from tgraph.ir.builder import Builder
from tgraph.passes import LEVELS, optimize
from tgraph.passes.precision import convert_array, convert_precision, precision_pipeline, precision_report

TOL = 1e-2
GPT2 = dict(n_embd="64", n_head="4", n_layer="2", vocab_size="97", n_positions="16", n_inner="128")
LLAMA = dict(d_model="64", num_heads="4", num_kv_heads="2", num_layers="2", vocab_size="97", d_ff="96")


def naive_half(graph: Graph) -> Graph:
    """The conversion people write first: every float32 tensor, constant and Cast becomes float16."""
    g = graph.copy()
    for v in g.values():
        if v.dtype is DType.float32:
            v.type = v.type.with_dtype(DType.float16)
            if v.const is not None:
                with np.errstate(over="ignore"):
                    v.const = v.const.astype(np.float16)
    for n in g.nodes:
        if n.op == "Cast" and n.attrs["to"] is DType.float32:
            n.attrs["to"] = DType.float16
    return g


def half(graph: Graph, pipeline="to-fp16") -> Graph:
    g = graph.copy()
    optimize(g, pipeline=pipeline)
    return g


def feeds(vocab=97, batch=2, seq=7, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ---------------------------------------------------------------- overflow, op by op
def layer_norm_graph(d=64):
    """An un-fused LayerNorm exactly as the DSL writes it (var = mean((x - mean)^2))."""
    g = Graph("ln")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.float32, ("batch", "seq", d)))
    mean = b.op("ReduceMean", x, axes=[-1])
    dev = b.op("Sub", x, mean)
    var = b.op("ReduceMean", b.op("Mul", dev, dev), axes=[-1])
    y = b.op("Div", dev, b.op("Sqrt", b.op("Add", var, b.const(np.float32(1e-5)))))
    rng = np.random.default_rng(1)
    gamma = g.add_constant(rng.normal(1, 0.1, d).astype(np.float32), "ln.weight", is_param=True, exact_name=True)
    beta = g.add_constant(rng.normal(0, 0.1, d).astype(np.float32), "ln.bias", is_param=True, exact_name=True)
    out = b.op("Add", b.op("Mul", y, gamma), beta)
    g.outputs = [out]
    return g, var


def big_activations(shape, seed=0):
    """Activations of magnitude 300..1000, as in a residual stream late in a deep model."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(300, 1000, shape) * rng.choice([-1, 1], shape)).astype(np.float32)


def test_naive_layer_norm_overflows_but_ours_does_not():
    g, var = layer_norm_graph()
    x = big_activations((2, 5, 64))
    ref = run_onnx(g, {"x": x})[g.outputs[0].name]

    naive = naive_half(g)
    naive.outputs.append(next(v for v in naive.values() if v.name == var.name))
    # The generated NumPy module computes float16 ops in float16, as CUDA kernels do.
    # (onnxruntime's CPU provider would hide the overflow: it runs chains of float16
    # elementwise ops in float32 behind inserted Casts, so only the exposed var is inf.)
    with np.errstate(over="ignore", invalid="ignore"):
        got_naive = run_numpy(naive, {"x": x.astype(np.float16)})
    assert np.isinf(got_naive[var.name]).all()              # (x - mean)^2 summed past 65504
    assert rel_err(got_naive[g.outputs[0].name], ref) > 0.5  # ... so the norm collapses to its bias
    assert np.isinf(run_onnx(naive, {"x": x.astype(np.float16)})[var.name]).all()

    ours = half(g)
    assert ours.inputs[0].dtype is DType.float16 and ours.outputs[0].dtype is DType.float16
    for backend in (run_onnx, run_numpy):
        got = backend(ours, {"x": x.astype(np.float16)})[ours.outputs[0].name]
        assert got.dtype == np.float16 and np.isfinite(got).all()
        assert rel_err(got, ref) < TOL
    hist = precision_report(ours)
    assert "ReduceMean" in hist["float32"] and "ReduceMean" not in hist["float16"]
    assert "Mul" in hist["float32"]                          # the square feeding the variance
    assert "Div" in hist["float16"]                          # normalising itself stays half


def attention_graph(d=64):
    g = Graph("attn")
    b = Builder(g)
    q, k, v = (g.add_input(n, TensorType(DType.float32, (1, 2, "seq", d))) for n in "qkv")
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.const(np.float32(d ** -0.5)))
    probs = b.op("Softmax", scores, axis=-1)
    g.outputs = [b.op("MatMul", probs, v)]
    return g


def test_naive_attention_scores_overflow_but_ours_do_not():
    g = attention_graph()
    rng = np.random.default_rng(0)
    q = rng.normal(0, 1, (1, 2, 6, 64)).astype(np.float32) * 40
    k = q + rng.normal(0, 1, q.shape).astype(np.float32)      # q.k ~ 1e5 > 65504
    v = rng.normal(0, 1, q.shape).astype(np.float32)
    inputs = {"q": q, "k": k, "v": v}
    out = g.outputs[0].name
    ref = run_onnx(g, inputs)[out]
    half_inputs = {n: a.astype(np.float16) for n, a in inputs.items()}

    with np.errstate(over="ignore", invalid="ignore"):
        got_naive = run_numpy(naive_half(g), half_inputs)[out]
    assert np.isnan(got_naive).any()                          # inf - inf inside the softmax

    ours = half(g)
    for backend in (run_onnx, run_numpy):
        got = backend(ours, half_inputs)[out]
        assert np.isfinite(got).all() and rel_err(got, ref) < TOL
    report = precision_report(ours)
    assert {"MatMul", "Softmax"} <= set(report["float32"]) and "MatMul" in report["float16"]


@pytest.mark.parametrize("pipeline", ["to-fp16", "to-fp16{half-attention=true}"])
def test_fused_attention_computes_scores_in_float32(pipeline):
    """-O2's fused Attention runs in float32 (inputs cast up): onnxruntime's CPU kernel
    computes q.k in float16 even with softmax_precision=1. `half-attention=true` keeps
    the op half precision with softmax_precision=float32, which the NumPy kernel honours
    (q.k = 1e5 would be inf in float16) and onnxruntime accepts at this size."""
    g = attention_graph()
    optimize(g, level=2)
    assert g.op_histogram().get("Attention") == 1
    rng = np.random.default_rng(0)
    q = (rng.normal(0, 1, (1, 2, 6, 64)) * 40).astype(np.float32)
    inputs = {"q": q, "k": q, "v": rng.normal(0, 1, q.shape).astype(np.float32)}
    ref = run_onnx(g, inputs)[g.outputs[0].name]
    ours = half(g, pipeline)
    node = next(n for n in ours.nodes if n.op == "Attention")
    if pipeline == "to-fp16":
        assert node.inputs[0].dtype is DType.float32 and node.outputs[0].dtype is DType.float32
    else:
        assert node.attrs["softmax_precision"] == 1 and node.outputs[0].dtype is DType.float16
    assert ours.outputs[0].dtype is DType.float16
    half_inputs = {n: a.astype(np.float16) for n, a in inputs.items()}
    for backend in (run_onnx, run_numpy):
        got = backend(ours, half_inputs)[g.outputs[0].name]
        assert np.isfinite(got).all() and rel_err(got, ref) < TOL


# ---------------------------------------------------------------- whole models
@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("family,overrides", [("gpt2", GPT2), ("llama", LLAMA)])
def test_registered_models_in_float16_match_float32(family, overrides, level):
    g32 = build(family, overrides, level=level).graph
    g16 = build(family, overrides, level=level, dtype="float16").graph
    x = feeds()
    ref = run_onnx(g32, x)["logits"]
    assert g16.inputs[0].dtype is DType.int64 and g16.outputs[0].dtype is DType.float16
    params = g16.parameters()
    assert set(params) == set(g32.parameters())              # parameters keep their names ...
    assert all(p.dtype is DType.float16 for p in params.values())   # ... and all become half
    errors = {"ort": rel_err(run_onnx(g16, x)["logits"], ref), "numpy": rel_err(run_numpy(g16, x)["logits"], ref)}
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("family,overrides,embedding", [("gpt2", GPT2, "wte.weight"),
                                                        ("llama", LLAMA, "embed_tokens.weight")])
def test_large_activations_break_naive_models_but_not_ours(family, overrides, embedding):
    """Embeddings scaled so the residual stream is ~300-1000: an un-fused norm's x*x overflows."""
    g32 = build(family, overrides, level=0).graph
    table = g32.constants[embedding]
    table.const = big_activations(table.const.shape, seed=3)
    x = feeds()
    ref = run_onnx(g32, x)["logits"]
    with np.errstate(over="ignore", invalid="ignore"):
        naive = run_numpy(naive_half(g32), x)["logits"]  # float16 computed in float16 (see above)
    ours = run_onnx(half(g32), x)["logits"]
    assert not rel_err(naive, ref) < 0.1                       # broken (inf/nan or collapsed norms)
    assert np.isfinite(ours).all() and rel_err(ours, ref) < TOL


def test_kv_cache_model_has_half_precision_cache():
    g = build("llama", {**LLAMA, "use_cache": "true"}, level=2, dtype="float16").graph
    io = {v.name: v.dtype for v in g.inputs + g.outputs}
    assert io["input_ids"] is DType.int64 and io["attention_mask"] is DType.int64
    assert io["past_key_values.0.key"] is DType.float16 and io["present.1.value"] is DType.float16


# ---------------------------------------------------------------- a real checkpoint
def test_hf_llama_checkpoint_in_float16_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tgraph.sources import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    x = feeds(seq=9)
    x["attention_mask"][1, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(x["input_ids"]),
                    attention_mask=torch.from_numpy(x["attention_mask"])).logits.numpy()
    loaded = load_model(str(tmp_path))
    for level in (0, 2):
        g = build(loaded, level=level, dtype="float16").graph
        for backend in (run_onnx, run_numpy):
            got = backend(g, x)["logits"]
            assert got.dtype == np.float16 and rel_err(got, ref) < TOL, (level, backend.__name__)


# ---------------------------------------------------------------- the pass itself
def test_pass_is_idempotent_and_in_no_level():
    assert all("to-fp16" not in LEVELS[k] and "to-bf16" not in LEVELS[k] for k in LEVELS)
    g = build("gpt2", GPT2, level=0).graph
    first = optimize(g, pipeline="to-fp16")
    assert first.changed
    assert not optimize(g, pipeline="to-fp16").changed


def test_keep_io_and_keep_ops_options():
    g = build("gpt2", GPT2, level=2).graph
    kept = half(g, "to-fp16{keep-io=true,keep-ops=Attention+Gelu}")
    assert kept.outputs[0].name == "logits" and kept.outputs[0].dtype is DType.float32
    report = precision_report(kept)
    assert {"Attention", "Gelu"} <= set(report["float32"]) and "MatMul" in report["float16"]
    x = feeds()
    assert rel_err(run_onnx(kept, x)["logits"], run_onnx(g, x)["logits"]) < TOL


def test_constants_are_clipped_not_overflowed():
    assert convert_array(np.array([-3.4e38, 1e5, np.inf, 0.5], np.float32), DType.float16).tolist() == \
        [-65504.0, 65504.0, np.inf, 0.5]
    big = convert_array(np.array([3e38], np.float32), DType.bfloat16)
    assert big.dtype.name == "bfloat16" and np.isfinite(big.astype(np.float32)).all()


def test_rotary_tables_stay_float32():
    """Positions past 2048 are not exact in float16: the angle p * inv_freq is computed in float32."""
    g = half(build("llama", LLAMA, level=2).graph)
    for op in ("Cos", "Sin"):
        node = next(n for n in g.nodes if n.op == op)
        assert node.inputs[0].dtype is DType.float32 and node.inputs[0].producer.op == "Mul"


def test_bfloat16_graph_and_where_it_runs():
    g = build("gpt2", GPT2, level=2, dtype="bfloat16").graph
    assert all(p.dtype is DType.bfloat16 for p in g.parameters().values())
    assert g.outputs[0].dtype is DType.bfloat16
    from tgraph.codegen.onnx import to_onnx
    from tgraph.runtime import Session

    model = to_onnx(g)
    assert {t.data_type for t in model.graph.initializer if t.name == "wte.weight"} == {onnx.TensorProto.BFLOAT16}
    with pytest.raises(RuntimeBackendError, match="bfloat16 kernel.*cuda"):   # ORT CPU lacks bf16 MatMul/Add...
        Session(model, providers="cpu")
    got = run_numpy(g, feeds())                       # the NumPy backend holds bf16 through ml_dtypes
    want = run_numpy(build("gpt2", GPT2, level=2).graph, feeds())
    for name, w in want.items():
        assert got[name].dtype.name == "bfloat16"
        err = np.max(np.abs(got[name].astype(np.float32) - w)) / max(1.0, np.max(np.abs(w)))
        assert err < 5e-2, (name, err)                # bf16 keeps 8 mantissa bits


def test_unknown_dtype_is_a_config_error():
    assert precision_pipeline("float32") == [] and precision_pipeline(None) == []
    with pytest.raises(ConfigError, match="float16 or bfloat16"):
        build("gpt2", GPT2, dtype="int8")
    with pytest.raises(ConfigError):
        convert_precision(Graph(), "float64")


# ---------------------------------------------------------------- CLI
def _cli(capsys, *args):
    from tgraph.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


SETS = [a for k, v in GPT2.items() for a in ("--set", f"{k}={v}")]


def test_cli_export_codegen_and_run_in_float16(tmp_path, capsys):
    out = tmp_path / "g16.onnx"
    code, _, err = _cli(capsys, "export", "gpt2", *SETS, "--dtype", "float16", "-o", str(out))
    assert code == 0, err
    model = onnx.load(str(out))
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {t.data_type for t in model.graph.initializer if t.name.endswith(".weight")} == {onnx.TensorProto.FLOAT16}
    code, _, err = _cli(capsys, "codegen", "numpy", "gpt2", *SETS, "--dtype", "float16", "-o", str(tmp_path / "g16.py"))
    assert code == 0, err
    assert "np.float16" in (tmp_path / "g16.py").read_text()
    code, stdout, err = _cli(capsys, "run", "gpt2", *SETS, "--dtype", "float16", "--check", "--tolerance", "1e-2")
    assert code == 0 and "logits: float16" in stdout, stdout + err
    code, _, err = _cli(capsys, "run", str(out), "--dtype", "bfloat16")
    assert code == 2 and "--dtype" in err


def test_random_graphs_convert_verify_and_reach_a_fixed_point():
    """On the pass tests' random graphs: the result verifies, runs on onnxruntime, and a
    second run changes nothing."""
    from hypothesis import HealthCheck, given, settings

    from test_passes import random_graphs

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(random_graphs())
    def check(case):
        graph, inputs = case
        g = graph.copy()
        optimize(g, pipeline="to-fp16")                 # verify() runs after the pass
        assert not optimize(g, pipeline="to-fp16").changed
        feeds = {v.name: np.asarray(inputs[v.name]).astype(v.dtype.numpy) for v in g.inputs}
        with np.errstate(all="ignore"):
            got, ref = run_onnx(g, feeds), run_onnx(graph, inputs)
        for name, r in ref.items():
            assert got[name].shape == np.shape(r)

    check()
