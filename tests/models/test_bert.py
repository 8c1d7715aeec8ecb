"""BERT and RoBERTa checkpoints against Hugging Face transformers, on every backend.

Tiny random HF models (BertModel, BertForMaskedLM, BertForPreTraining,
BertForNextSentencePrediction, RobertaModel, RobertaForMaskedLM) are saved as
safetensors, loaded by tgraph's strict loader and compared on ONNX -O0/-O3
(onnxruntime, its optimizer off) and the generated NumPy module, with a right-padded
row in every batch. Configs vary heads (2/4), vocab (97/101/odd), eps, activation,
tied/untied decoders and segments.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_encoder_cases import (HFCase, Spec, cache, onnx_parameter_elements, row_outputs,  # noqa: E402
                              single_row)
from model_harness import build, check_all_backends, rel_err, run_onnx  # noqa: E402
from tgraph.api import build as api_build  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.ir.evaluate import evaluate  # noqa: E402
from tgraph.models import get_family, make_config  # noqa: E402
from tgraph.models.bert import BertConfig, RobertaConfig  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

T = transformers
SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
             max_position_embeddings=24)
WIDE = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=20, layer_norm_eps=1e-5)
BASE = ("last_hidden_state", "pooler_output")

SPECS = {
    "bert-base": Spec(T.BertConfig, T.BertModel, SMALL, BASE),
    "bert-mlm": Spec(T.BertConfig, T.BertForMaskedLM, dict(WIDE, type_vocab_size=3), ("logits",)),
    "bert-mlm-untied-relu": Spec(T.BertConfig, T.BertForMaskedLM,
                                 dict(SMALL, hidden_act="relu", tie_word_embeddings=False, layer_norm_eps=1e-6),
                                 ("logits",)),
    "bert-pretraining-gelu-new": Spec(T.BertConfig, T.BertForPreTraining, dict(WIDE, hidden_act="gelu_new"),
                                      ("logits", "seq_relationship_logits")),
    "bert-nsp": Spec(T.BertConfig, T.BertForNextSentencePrediction, dict(SMALL, num_attention_heads=4),
                     ("logits",)),
    "roberta-base": Spec(T.RobertaConfig, T.RobertaModel, dict(SMALL, type_vocab_size=1, pad_token_id=1,
                                                                 max_position_embeddings=26), BASE),
    "roberta-mlm": Spec(T.RobertaConfig, T.RobertaForMaskedLM, dict(WIDE, type_vocab_size=1, pad_token_id=1,
                                                                     max_position_embeddings=22), ("logits",)),
    "roberta-mlm-segments-pad3": Spec(T.RobertaConfig, T.RobertaForMaskedLM,
                                      dict(SMALL, type_vocab_size=2, pad_token_id=3, tie_word_embeddings=False,
                                           max_position_embeddings=16), ("logits",)),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return cache(tmp_path_factory, SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_hf_on_all_backends_with_padding(cases, name):
    case: HFCase = cases(name)
    feeds = case.inputs()
    assert feeds["attention_mask"][1, -1] == 0          # the second row is right-padded
    loaded = load_model(str(case.dir))
    assert set(loaded.module.input_specs()) == set(feeds)
    errors = check_all_backends(loaded, feeds, case.reference(feeds))
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("name", ["bert-mlm", "bert-pretraining-gelu-new", "roberta-base", "roberta-mlm"])
def test_right_padding_keeps_real_tokens(cases, name):
    """Each padded row's real tokens (and its pooled/NSP outputs) equal the row run alone, unpadded."""
    case = cases(name)
    lengths = (9, 5, 2)
    feeds = case.inputs(lengths, seed=3)
    ours = run_onnx(build(load_model(str(case.dir)), 0), feeds)
    for row, n in enumerate(lengths):
        single = case.reference(single_row(feeds, row, n))
        got = row_outputs(ours, row, n)
        for key, ref in single.items():
            assert rel_err(got[key], ref[0]) <= 1e-4, (key, row)


def test_roberta_positions_use_cumsum_and_skip_padding(cases):
    graph = build(load_model(str(cases("roberta-base").dir)), 3)
    assert graph.op_histogram().get("CumSum") == 1
    assert "token_type_ids" not in [v.name for v in graph.inputs]
    bert = build(load_model(str(cases("bert-base").dir)), 3)
    assert "CumSum" not in bert.op_histogram()
    # Left padding moves RoBERTa's positions with the tokens: real tokens match HF's left-padded run.
    case = cases("roberta-mlm")
    feeds = case.inputs((9, 4), seed=5)
    left = {k: v.copy() for k, v in feeds.items()}
    left["input_ids"][1] = np.roll(feeds["input_ids"][1], 5)
    left["attention_mask"][1] = np.roll(feeds["attention_mask"][1], 5)
    ours = run_onnx(build(load_model(str(case.dir)), 0), left)["logits"]
    ref = case.reference(left)["logits"]
    assert rel_err(ours, ref) <= 1e-4
    np.testing.assert_allclose(ours[1, 5:], case.reference(single_row(feeds, 1, 4))["logits"][0], atol=1e-4)


@pytest.mark.parametrize("name", ["bert-base", "bert-mlm", "bert-pretraining-gelu-new", "roberta-mlm"])
def test_parameter_count_matches_hf(cases, name):
    """Tied decoders are not exported twice: graph and ONNX parameters = HF's unique parameters."""
    from tgraph.codegen.onnx import to_onnx

    case = cases(name)
    loaded = load_model(str(case.dir))
    assert build(loaded, 3).parameter_count() == case.hf_parameter_count()
    graph = build(loaded, 2)          # -O3 packs Q/K/V weights under new names (fuse-packed-qkv)
    assert graph.parameter_count() == case.hf_parameter_count()
    names = [n for n, _ in loaded.module.named_parameters()]
    count, elements = onnx_parameter_elements(to_onnx(graph), names)
    assert (count, elements) == (len(names), case.hf_parameter_count())


def test_heads_follow_architectures(cases):
    expected = {"bert-base": "base", "bert-mlm": "mlm", "bert-pretraining-gelu-new": "pretraining",
                "bert-nsp": "nsp", "roberta-base": "base", "roberta-mlm": "mlm"}
    for name, head in expected.items():
        loaded = load_model(str(cases(name).dir))
        assert loaded.config.head == head
        assert type(loaded.config) is (RobertaConfig if name.startswith("roberta") else BertConfig)


def test_mlm_checkpoint_with_pooler_and_nsp_weights_loads(cases, tmp_path):
    """bert-base-uncased is a BertForMaskedLM whose file still holds pooler and NSP weights:
    it loads (HF drops them too) and gives the pretraining model's MLM logits."""
    case = cases("bert-pretraining-gelu-new")
    d = case.copy(tmp_path / "ckpt", edit_config=lambda c: c.update(architectures=["BertForMaskedLM"]))
    loaded = load_model(str(d))
    assert loaded.config.head == "mlm"
    feeds = case.inputs()
    out = run_onnx(build(loaded, 0), feeds)
    assert set(out) == {"logits"}
    assert rel_err(out["logits"], case.reference(feeds)["logits"]) <= 1e-4


def test_legacy_layernorm_gamma_beta_names(cases, tmp_path):
    case = cases("bert-mlm")

    def legacy(w):
        for k in [k for k in w if k.endswith("LayerNorm.weight") or k.endswith("LayerNorm.bias")]:
            w[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = w.pop(k)

    d = case.copy(tmp_path / "legacy", edit_weights=legacy)
    feeds = case.inputs()
    out = run_onnx(build(load_model(str(d)), 0), feeds)
    assert rel_err(out["logits"], case.reference(feeds)["logits"]) <= 1e-4


# ---------------------------------------------------------------- strict loading
def test_missing_tensor_is_named(cases, tmp_path):
    d = cases("bert-mlm").copy(tmp_path / "c", edit_weights=lambda w: w.pop("bert.encoder.layer.1.output.dense.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.layer\.1\.output\.dense\.weight'"):
        load_model(str(d))


def test_unexpected_tensor_is_named(cases, tmp_path):
    def extra(w):
        w["bert.encoder.layer.2.output.dense.weight"] = w["bert.encoder.layer.1.output.dense.weight"]
    d = cases("bert-mlm").copy(tmp_path / "c", edit_weights=extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'bert\.encoder\.layer\.2\.output\.dense\.weight'"):
        load_model(str(d))


def test_misshaped_tensor_is_named(cases, tmp_path):
    def shrink(w):
        w["embeddings.word_embeddings.weight"] = w["embeddings.word_embeddings.weight"][:-1]
    d = cases("roberta-base").copy(tmp_path / "c", edit_weights=shrink)
    with pytest.raises(CheckpointError, match=r"embeddings\.word_embeddings\.weight.*shape"):
        load_model(str(d))


@pytest.mark.parametrize("key,value", [
    ("position_embedding_type", "relative_key"),
    ("is_decoder", True),
    ("add_cross_attention", True),
    ("hidden_act", "gelu_fast"),
    ("architectures", ["BertForSequenceClassification"]),
])
def test_unsupported_options_are_refused(cases, tmp_path, key, value):
    d = cases("bert-base").copy(tmp_path / "c", edit_config=lambda c: c.update({key: value}))
    with pytest.raises(ConfigError, match=key):
        load_model(str(d))


def test_roberta_unsupported_architecture(cases, tmp_path):
    d = cases("roberta-base").copy(tmp_path / "c",
                                   edit_config=lambda c: c.update(architectures=["RobertaForCausalLM"]))
    with pytest.raises(ConfigError, match="RobertaForCausalLM"):
        load_model(str(d))


# ---------------------------------------------------------------- configs and the registry
def test_registered_roberta_has_roberta_defaults():
    c = make_config(get_family("roberta").config_cls)
    assert (c.positions, c.type_vocab_size, c.pad_token_id, c.max_position_embeddings) == \
        ("padding_offset", 1, 1, 514)
    assert make_config(get_family("bert").config_cls).positions == "absolute"


def test_registered_models_trace_and_run():
    small = dict(vocab_size=31, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                 max_position_embeddings=12)
    for name, head, outs in [("bert", "pretraining", {"logits", "seq_relationship_logits"}),
                             ("roberta", "mlm", {"logits"}), ("bert", "nsp", {"logits"})]:
        built = api_build(name, {**small, "head": head}, level=3)
        g = built.graph
        ids = np.array([[5, 6, 7, 1]], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in [v.name for v in g.inputs]:
            feeds["token_type_ids"] = np.zeros_like(ids)
        out = evaluate(g, feeds)
        assert set(out) == outs
        assert np.all(np.isfinite(out["logits"]))


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(head="classifier"), "head"),
    (dict(positions="rotary"), "positions"),
    (dict(activation="gelu_fast"), "activation"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(positions="padding_offset", pad_token_id=20, max_position_embeddings=16), "pad_token_id"),
])
def test_impossible_configs_are_refused(kwargs, field):
    with pytest.raises(ConfigError, match=f"bert: .*{field}"):
        BertConfig(**kwargs)
