"""Query rows whose keys are all masked (left padding) mean the same thing everywhere.

ONNX Attention-23 gives such a row a zero output (its fully-masked-row guard), and
onnxruntime's Attention does too; softmax alone would average every value. tgraph
spells the guard in the unfused graph (`tgraph.dsl.layers.zero_fully_masked_rows`),
`fuse-attention` absorbs it, and the reference kernel applies it, so every level and
both backends agree at padded positions, not only at real tokens.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_harness import build, run_numpy, run_onnx  # noqa: E402
from tgraph.cli import main  # noqa: E402
from tgraph.ir import fused  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

LEVELS = (0, 1, 2, 3)


# ------------------------------------------------------------------ the kernel against ONNX
def _onnx_node_case(export_name: str):
    """Inputs, expected outputs and attributes of one of ONNX's own Attention node tests
    (the case is built by onnx's backend-test code with onnx's reference implementation)."""
    from onnx import helper
    from onnx.backend.test.case.node import _NodeTestCases
    from onnx.backend.test.case.node.attention import Attention

    def find():
        return next((c for c in _NodeTestCases if c.name == "test_" + export_name), None)
    if find() is None:                                # not collected yet in this process
        getattr(Attention, "export_" + export_name)()
    case = find()
    node = case.model.graph.node[0]
    (inputs, outputs), = case.data_sets
    return inputs, outputs[0], {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("export_name", ["attention_23_boolmask_fullymasked_row_nan_robustness",
                                         "attention_causal_boolmask_nan_robustness"])
def test_kernel_matches_onnx_node_test_on_fully_masked_rows(export_name):
    inputs, want, attrs = _onnx_node_case(export_name)
    got = fused.attention(*inputs, **attrs)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask_kind", ["bool", "float-inf"])
def test_kernel_matches_onnx_reference_grouped_3d(mask_kind):
    """Grouped heads on merged [B, T, H*D] inputs, a padding mask and is_causal: the
    left-padded rows are fully masked; onnx.reference is the oracle."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    b, t, hq, hk, d = 2, 5, 4, 2, 8
    q = rng.standard_normal((b, t, hq * d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, hk * d)).astype(np.float32) for _ in range(2))
    keep = np.ones((b, 1, t, t), bool)
    keep[1, ..., :3] = False                          # row 1 left-padded by three tokens
    mask = keep if mask_kind == "bool" else np.where(keep, 0, -np.inf).astype(np.float32)
    node = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], is_causal=1, q_num_heads=hq,
                            kv_num_heads=hk)
    mtype = TensorProto.BOOL if mask.dtype == bool else TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                            for n, a in (("q", q), ("k", k), ("v", v))]
                              + [helper.make_tensor_value_info("m", mtype, mask.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    want = ReferenceEvaluator(model).run(None, {"q": q, "k": k, "v": v, "m": mask})[0]
    got = fused.attention(q, k, v, mask, is_causal=1, q_num_heads=hq, kv_num_heads=hk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(got[1, :3])                     # the padded queries see no key: zero rows


# ------------------------------------------------------------------ models, every level
def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_head=2, n_layer=2, vocab_size=97, n_positions=32, attn_implementation="eager"))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation="eager"))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    model = {"gpt2": _gpt2, "llama": _llama}[request.param]().eval()
    with torch.no_grad():                             # weights large enough that attention is not uniform
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "ln" in name or "norm" in name else 0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def _left_padded(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 97, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0                                   # row 1 left-padded by three tokens
    ids[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_every_level_and_backend_agree_at_padded_positions(checkpoint):
    path, hf = checkpoint
    loaded = load_model(str(path))
    feed = _left_padded()
    got = {}
    for level in LEVELS:
        graph = build(loaded, level)
        got[f"onnxruntime -O{level}"] = run_onnx(graph, feed)["logits"]
        got[f"numpy -O{level}"] = run_numpy(graph, feed)["logits"]
    ref = got["onnxruntime -O0"]
    errors = {name: float(np.max(np.abs(out - ref))) for name, out in got.items()}
    assert max(errors.values()) <= 1e-4, errors
    # the real tokens are Hugging Face's (its padded positions average the values instead)
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.from_numpy(feed["input_ids"]),
                       attention_mask=torch.from_numpy(feed["attention_mask"])).logits.numpy()
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(ref[real], hf_logits[real], rtol=1e-4, atol=1e-4)


def test_padded_queries_attend_to_nothing(checkpoint):
    """At -O0 a padded position's logits are those of its token with zero attention output:
    the same as a run where that query's keys are all masked in another way (its token alone,
    its own key masked out too)."""
    path, _ = checkpoint
    graph = build(load_model(str(path)), 0)
    feed = _left_padded()
    padded = run_onnx(graph, feed)["logits"]
    # The first padded position sees only itself (causal) and is masked: its logits cannot
    # depend on anything but its own token id, so any other (masked) context gives the same.
    alone = run_onnx(graph, {"input_ids": feed["input_ids"][1:, :1],
                             "attention_mask": np.zeros((1, 1), np.int64)})["logits"]
    np.testing.assert_allclose(padded[1, 0], alone[0, 0], rtol=1e-5, atol=1e-5)
    # ... and with a zero attention output, not the mean of the values: position 0 of an
    # unmasked row attends to exactly its own value, which differs.
    unmasked = run_onnx(graph, {"input_ids": feed["input_ids"][1:, :1],
                                "attention_mask": np.ones((1, 1), np.int64)})["logits"]
    assert np.max(np.abs(unmasked[0, 0] - alone[0, 0])) > 1e-3


def test_cli_run_check_with_padded_inputs_agrees_at_every_level(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    inputs = tmp_path / "padded.npz"
    np.savez(inputs, **_left_padded(seed=1))
    means = []
    for level in LEVELS:
        code = main(["run", str(path), "-O", str(level), "--check", "--inputs", str(inputs)])
        out, err = capsys.readouterr()
        assert code == 0, f"-O{level}: {err or out}"
        assert "check passed" in out
        summary = [line for line in out.splitlines() if line.strip().startswith("logits:")][0].split()
        means.append([float(summary[summary.index(stat) + 1]) for stat in ("mean", "std")])
    np.testing.assert_allclose(means, [means[0]] * len(LEVELS), rtol=1e-4)   # the same logits at every level
