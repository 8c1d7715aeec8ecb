"""ALBERT checkpoints against Hugging Face transformers, on every backend.

AlbertModel, AlbertForMaskedLM and AlbertForPreTraining with a factorised embedding
(E < H), heads 2/4, odd vocabularies, eps 1e-12/1e-5, gelu_new and exact gelu, and
grouped sharing (2 groups of 2 layers over 3 steps). The shared layer must be exported
once: the ONNX model carries HF's parameter count, not num_layers times the layer.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_encoder_cases import HFCase, Spec, cache, onnx_parameter_elements, row_outputs, single_row  # noqa: E402
from model_harness import build, check_all_backends, rel_err, run_onnx  # noqa: E402
from tgraph.errors import CheckpointError, ConfigError  # noqa: E402
from tgraph.models import get_family, make_config  # noqa: E402
from tgraph.models.albert import AlbertConfig  # noqa: E402
from tgraph.sources import load_model  # noqa: E402

T = transformers
SMALL = dict(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
             intermediate_size=37, max_position_embeddings=24)
WIDE = dict(vocab_size=101, embedding_size=24, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=20, layer_norm_eps=1e-5, hidden_act="gelu")

SPECS = {
    "albert-base": Spec(T.AlbertConfig, T.AlbertModel, SMALL, ("last_hidden_state", "pooler_output")),
    "albert-mlm": Spec(T.AlbertConfig, T.AlbertForMaskedLM, WIDE, ("logits",)),
    "albert-pretraining": Spec(T.AlbertConfig, T.AlbertForPreTraining, dict(SMALL, vocab_size=89),
                               ("logits", "sop_logits")),
    "albert-groups": Spec(T.AlbertConfig, T.AlbertModel, dict(WIDE, num_hidden_layers=3, num_hidden_groups=2,
                                                                inner_group_num=2, type_vocab_size=3),
                          ("last_hidden_state", "pooler_output")),
}
LAYER_TENSORS = 16      # q, k, v, o, ffn up/down (weight + bias) and two LayerNorms (weight + bias)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return cache(tmp_path_factory, SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_hf_on_all_backends_with_padding(cases, name):
    case: HFCase = cases(name)
    feeds = case.inputs()
    assert feeds["attention_mask"][1, -1] == 0
    errors = check_all_backends(load_model(str(case.dir)), feeds, case.reference(feeds))
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})


def test_right_padding_keeps_real_tokens(cases):
    case = cases("albert-pretraining")
    lengths = (9, 6, 1)
    feeds = case.inputs(lengths, seed=4)
    ours = run_onnx(build(load_model(str(case.dir)), 0), feeds)
    for row, n in enumerate(lengths):
        for key, ref in case.reference(single_row(feeds, row, n)).items():
            assert rel_err(row_outputs(ours, row, n)[key], ref[0]) <= 1e-4, (key, row)


@pytest.mark.parametrize("name,groups", [("albert-base", 1), ("albert-mlm", 1), ("albert-groups", 4)])
def test_shared_layers_are_exported_once(cases, name, groups):
    """The DSL materialises a reused layer's Parameters once per trace."""
    from tgraph.codegen.onnx import to_onnx

    case = cases(name)
    loaded = load_model(str(case.dir))
    # -O3 packs sibling projections into new parameters (fuse-packed-qkv): same count, new names
    assert build(loaded, 3).parameter_count() == case.hf_parameter_count()
    for level in (0, 2):
        graph = build(loaded, level)
        assert graph.parameter_count() == case.hf_parameter_count()
        names = [n for n, _ in loaded.module.named_parameters()]
        count, elements = onnx_parameter_elements(to_onnx(graph), names)
        assert elements == case.hf_parameter_count()
        assert count == len(names)
        layer_inits = [n for n in names if n.startswith("encoder.groups.")]
        assert len(layer_inits) == groups * LAYER_TENSORS
    # ... while the layer really runs num_layers times: one attention softmax per step and inner layer.
    c = loaded.config
    assert build(loaded, 0).op_histogram()["Softmax"] == c.num_layers * c.inner_group_num


def test_groups_follow_hf_schedule():
    c = AlbertConfig(num_layers=3, num_hidden_groups=2)
    assert [c.group_of(i) for i in range(3)] == [0, 0, 1]     # int(i / 1.5)
    c = AlbertConfig(num_layers=12, num_hidden_groups=4)
    assert [c.group_of(i) for i in range(12)] == [i // 3 for i in range(12)]


def test_heads_and_factorisation_from_config(cases):
    heads = {"albert-base": "base", "albert-mlm": "mlm", "albert-pretraining": "pretraining"}
    for name, head in heads.items():
        c = load_model(str(cases(name).dir)).config
        assert isinstance(c, AlbertConfig) and c.head == head
    c = load_model(str(cases("albert-mlm").dir)).config
    assert (c.embedding_size, c.hidden_size, c.activation, c.layer_norm_eps) == (24, 48, "gelu", 1e-5)
    assert load_model(str(cases("albert-base").dir)).config.activation == "gelu_tanh"   # HF default gelu_new


# ---------------------------------------------------------------- strict loading
def test_missing_shared_layer_tensor_is_named(cases, tmp_path):
    name = "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output.weight"
    d = cases("albert-pretraining").copy(tmp_path / "c", edit_weights=lambda w: w.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensor 'encoder\.albert_layer_groups\.0\.albert_layers\.0"
                                              r"\.ffn_output\.weight'"):
        load_model(str(d))


def test_group_count_mismatch_is_an_unexpected_tensor(cases, tmp_path):
    """A checkpoint with two groups read as one: the second group's tensors are unexpected."""
    d = cases("albert-groups").copy(tmp_path / "c", edit_config=lambda c: c.update(num_hidden_groups=1))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.albert_layer_groups\.1\."):
        load_model(str(d))


def test_misshaped_embedding_projection_is_named(cases, tmp_path):
    def widen(w):
        w["encoder.embedding_hidden_mapping_in.weight"] = np.zeros((32, 17), np.float32)
    d = cases("albert-base").copy(tmp_path / "c", edit_weights=widen)
    with pytest.raises(CheckpointError, match=r"encoder\.embedding_hidden_mapping_in\.weight.*shape"):
        load_model(str(d))


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "gelu_fast"),
    ("position_embedding_type", "relative_key_query"),
    ("architectures", ["AlbertForSequenceClassification"]),
])
def test_unsupported_options_are_refused(cases, tmp_path, key, value):
    d = cases("albert-base").copy(tmp_path / "c", edit_config=lambda c: c.update({key: value}))
    with pytest.raises(ConfigError, match=key):
        load_model(str(d))


@pytest.mark.parametrize("kwargs,field", [
    (dict(embedding_size=0), "embedding_size"),
    (dict(num_layers=2, num_hidden_groups=3), "num_hidden_groups"),
    (dict(inner_group_num=0), "inner_group_num"),
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
])
def test_impossible_configs_are_refused(kwargs, field):
    with pytest.raises(ConfigError, match=f"albert: .*{field}"):
        AlbertConfig(**kwargs)


def test_registered_albert_defaults():
    c = make_config(get_family("albert").config_cls)
    assert (c.vocab_size, c.embedding_size, c.hidden_size, c.activation) == (30000, 128, 768, "gelu_tanh")
