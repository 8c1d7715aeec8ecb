"""ALBERT (Lan et al. 2020): BERT with a factorised embedding and cross-layer sharing.

The embeddings (word, position, token type, LayerNorm) have a small width E and are
projected to the hidden width H once (`encoder.embedding_projection`). The encoder holds
`num_hidden_groups` groups of `inner_group_num` BERT layers; of its `num_layers` steps,
step i runs every layer of group int(i / (num_layers / num_hidden_groups)), HF's formula.
With the released settings (one group of one layer) all steps run the same module
instance, so its weights are one set of graph constants (the DSL materialises a
Parameter once per trace): the exported model is as small as the checkpoint. The MLM
head projects H -> E and decodes with the tied E-wide word embeddings; the pretraining
head adds sentence-order prediction (`sop_logits`). Default activation: gelu_new (tanh).

Everything but the encoder is `tgraph.models.bert`'s code: embeddings, layer, pooler, heads.

Hugging Face: model_type "albert"; AlbertModel, AlbertForMaskedLM, AlbertForPreTraining
(the head follows `architectures`; the `albert.` prefix of head checkpoints is stripped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict

from ..checkpoints import HFAdapter, WeightRule, hf_get, register_adapter
from ..dsl import Linear, Module, ModuleList
from ..errors import ConfigError
from .bert import (LEGACY_NAMES, BertConfig, BertLayer, BertModel, HFLayout, embedding_rules, encoder_fields,
                   head_rules, layer_rules, part_rules)
from .config_checks import repeated
from .registry import register_model


@dataclass
class AlbertConfig(BertConfig):
    """albert-base-v2."""

    vocab_size: int = 30000
    embedding_size: int = 128         # E: width of the embeddings and of the MLM decoder
    activation: str = "gelu_tanh"     # HF "gelu_new"
    num_hidden_groups: int = repeated(1)       # groups of distinct weights
    inner_group_num: int = repeated(1)         # layers per group, run in sequence at every step

    family: ClassVar[str] = "albert"

    def __post_init__(self):
        super().__post_init__()
        for name in ("embedding_size", "num_hidden_groups", "inner_group_num"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"albert: {name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_groups > self.num_layers:
            raise ConfigError(f"albert: num_hidden_groups ({self.num_hidden_groups}) exceeds num_layers "
                              f"({self.num_layers}); some groups would never run")

    def group_of(self, step: int) -> int:
        return int(step / (self.num_layers / self.num_hidden_groups))


class AlbertEncoder(Module):
    def __init__(self, c: AlbertConfig):
        super().__init__()
        self.config = c
        self.embedding_projection = Linear(c.embedding_size, c.hidden_size)
        self.groups = ModuleList([ModuleList([BertLayer(c) for _ in range(c.inner_group_num)])
                                  for _ in range(c.num_hidden_groups)])

    def forward(self, x, keep):
        x = self.embedding_projection(x)                                   # (B, T, E) -> (B, T, H)
        for step in range(self.config.num_layers):
            for layer in self.groups[self.config.group_of(step)]:          # the same instances, step after step
                x = layer(x, keep)
        return x


class Albert(BertModel):
    pair_output: ClassVar[str] = "sop_logits"

    @staticmethod
    def embedding_dim(c: AlbertConfig) -> int:
        return c.embedding_size

    @staticmethod
    def make_encoder(c: AlbertConfig) -> Module:
        return AlbertEncoder(c)


@register_model("albert", AlbertConfig)
def build(config: AlbertConfig) -> Albert:
    return Albert(config)


# ---------------------------------------------------------------- Hugging Face
ALBERT_LAYOUT = HFLayout(
    "encoder.albert_layer_groups.{g}.albert_layers.{j}",
    {"attention.q_proj": "attention.query", "attention.k_proj": "attention.key", "attention.v_proj": "attention.value",
     "attention.o_proj": "attention.dense", "attention_norm": "attention.LayerNorm",
     "ffn.up": "ffn", "ffn.down": "ffn_output", "ffn_norm": "full_layer_layer_norm"},
    pooler="pooler", mlm_dense="predictions.dense", mlm_norm="predictions.LayerNorm", mlm_bias="predictions.bias",
    mlm_decoder="predictions.decoder", pair="sop_classifier.classifier")

ALBERT_HEADS = {"AlbertModel": "base", "AlbertForMaskedLM": "mlm", "AlbertForPreTraining": "pretraining"}


def config_from_hf(hf: Dict[str, Any]) -> AlbertConfig:
    d = AlbertConfig()
    return AlbertConfig(
        **encoder_fields(hf, d, "albert", ALBERT_HEADS, "gelu_new"),
        embedding_size=hf_get(hf, "embedding_size", d.embedding_size),
        num_hidden_groups=hf_get(hf, "num_hidden_groups", d.num_hidden_groups),
        inner_group_num=hf_get(hf, "inner_group_num", d.inner_group_num),
    )


def weight_map(c: AlbertConfig) -> Dict[str, WeightRule]:
    weights: Dict[str, WeightRule] = {}
    embedding_rules(weights)
    part_rules("encoder.embedding_projection", "encoder.embedding_hidden_mapping_in", weights)
    for g in range(c.num_hidden_groups):
        for j in range(c.inner_group_num):
            layer_rules(f"encoder.groups.{g}.{j}", ALBERT_LAYOUT.layer.format(g=g, j=j), ALBERT_LAYOUT, weights)
    head_rules(c, ALBERT_LAYOUT, weights)
    return weights


register_adapter(HFAdapter(
    family="albert", model_types=("albert",), config_from_hf=config_from_hf, weight_map=weight_map,
    base_prefixes=("albert.",), renames=LEGACY_NAMES,
    ignore=(r"embeddings\.position_ids", r"pooler\.(weight|bias)", r"sop_classifier\.classifier\.(weight|bias)",
            r"predictions\.(bias|decoder\.weight|decoder\.bias)"),
))
