"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019), a config variant of it.

Embeddings: word + learned absolute position + token type (segment), then LayerNorm.
Encoder: post-LN layers, LayerNorm(x + Attention(x)) then LayerNorm(x + FFN(x)), with
exact (erf) GELU. Pooler: tanh(dense(h[:, 0])).

RoBERTa changes no layer, only the inputs: no segments (type_vocab_size 1: the single
token-type row is added everywhere and there is no `token_type_ids` input), and
position ids that skip padding, `cumsum(ids != pad) * (ids != pad) + pad`
(HF `create_position_ids_from_input_ids`), so a padded row's real tokens keep their
positions whatever side the padding is on.

`head` picks the outputs:
  base         last_hidden_state (B, T, H), pooler_output (B, H)      BertModel / RobertaModel
  mlm          logits (B, T, V)                                       *ForMaskedLM (no pooler)
  nsp          logits (B, 2), the next-sentence head alone            BertForNextSentencePrediction
  pretraining  logits (B, T, V) and seq_relationship_logits (B, 2)    BertForPreTraining
The MLM head is dense + act + LayerNorm, then the decoder tied to the word embeddings
(`tie_word_embeddings=False`: its own matrix) plus an output bias.

ALBERT (`tgraph.models.albert`) reuses these modules with a factorised embedding width
and one shared layer; that is why the modules take their widths as arguments.

Hugging Face: model_type "bert" (BertModel, BertForMaskedLM, BertForPreTraining,
BertForNextSentencePrediction; the head follows `architectures`) and "roberta"
(RobertaModel, RobertaForMaskedLM). Head checkpoints nest the encoder under `bert.` /
`roberta.`; the loader strips it. Tensors HF itself drops for the chosen head are
ignored (bert-base-uncased is a BertForMaskedLM that still ships its pooler and NSP
weights), as are tied copies of the word embeddings. TF-era `LayerNorm.gamma/beta`
names are read as `weight/bias`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping

from ..checkpoints import HFAdapter, WeightRule, hf_get, refuse_if, register_adapter, rule, transposed
from ..dsl import (ACTIVATIONS, Embedding, FeedForward, InputSpec, LayerNorm, LearnedPositions, Linear, Module,
                   ModuleList, MultiHeadAttention, Parameter, padding_keep_mask)
from ..dsl.layers import activation
from ..errors import ConfigError
from ..ir import DType
from .hf_options import activation_from_hf
from .config_checks import check_fields, epsilon, repeated
from .registry import register_model

HEADS = ("base", "mlm", "nsp", "pretraining")
POSITIONS = ("absolute", "padding_offset")


@dataclass
class BertConfig:
    vocab_size: int = 30522           # bert-base-uncased
    hidden_size: int = 768
    num_layers: int = repeated(12)
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2          # 1: no token_type_ids input (RoBERTa)
    layer_norm_eps: float = epsilon(1e-12)
    activation: str = "gelu"          # a tgraph.dsl activation name; HF "gelu" is the exact erf GELU
    head: str = "base"                # base | mlm | nsp | pretraining (see the module docstring)
    tie_word_embeddings: bool = True  # the MLM decoder is the word embedding matrix
    positions: str = "absolute"       # absolute: 0..T-1; padding_offset: RoBERTa's pad-skipping ids
    pad_token_id: int = 0             # read only by padding_offset positions

    family: ClassVar[str] = "bert"

    def __post_init__(self):
        f = self.family
        check_fields(self, f)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{f}: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{f}: hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{f}: activation {self.activation!r} is not one of {', '.join(sorted(ACTIVATIONS))}")
        if self.head not in HEADS:
            raise ConfigError(f"{f}: head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"{f}: positions {self.positions!r} is not one of {', '.join(POSITIONS)}")
        if self.positions == "padding_offset" and not 0 <= self.pad_token_id < self.max_position_embeddings - 1:
            raise ConfigError(f"{f}: pad_token_id ({self.pad_token_id}) leaves no position ids below "
                              f"max_position_embeddings ({self.max_position_embeddings})")


@dataclass
class RobertaConfig(BertConfig):
    """roberta-base: BPE vocabulary, pad-skipping positions (514 = 512 + pad + 1), no segments."""

    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = epsilon(1e-5)
    positions: str = "padding_offset"
    pad_token_id: int = 1

    family: ClassVar[str] = "roberta"


# ---------------------------------------------------------------- modules
class BertEmbeddings(Module):
    """LayerNorm(word + token type + position), all of width `dim` (ALBERT: its E < H)."""

    def __init__(self, c: BertConfig, dim: int):
        super().__init__()
        self.positions, self.pad_token_id = c.positions, c.pad_token_id
        self.word = Embedding(c.vocab_size, dim)
        self.position = LearnedPositions(c.max_position_embeddings, dim)
        self.token_type = Embedding(c.type_vocab_size, dim)
        self.norm = LayerNorm(dim, c.layer_norm_eps)

    def position_table(self, input_ids):
        if self.positions == "absolute":
            seq = input_ids.shape_of(1, 2)                                 # [T]
            return self.position.weight.slice(0, 0, seq)                   # (T, E)
        real = input_ids.eq(self.pad_token_id).logical_not().cast(DType.int64)  # (B, T), 1 = not padding
        ids = real.cumsum(1) * real + self.pad_token_id                   # (B, T): pad+1, pad+2 ... ; pad stays pad
        return self.position(ids)                                          # (B, T, E)

    def forward(self, input_ids, token_type_ids=None):
        x = self.word(input_ids)                                           # (B, T, E)
        if token_type_ids is not None:
            x = x + self.token_type(token_type_ids)                        # (B, T, E)
        else:
            x = x + self.token_type.weight                                  # (B, T, E) + (1, E): the only segment
        return self.norm(x + self.position_table(input_ids))


class BertLayer(Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = MultiHeadAttention(c.hidden_size, c.num_heads)
        self.attention_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.ffn = FeedForward(c.hidden_size, c.intermediate_size, act=c.activation)
        self.ffn_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, x, keep):                                            # x: (B, T, H)
        x = self.attention_norm(x + self.attention(x, keep_mask=keep))
        return self.ffn_norm(x + self.ffn(x))


class BertEncoder(Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layers = ModuleList([BertLayer(c) for _ in range(c.num_layers)])

    def forward(self, x, keep):
        for layer in self.layers:
            x = layer(x, keep)
        return x


class Pooler(Module):
    """tanh(dense(h[:, 0])): the first ([CLS]) token stands for the sequence."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = Linear(hidden, hidden)

    def forward(self, x):
        first = x.gather(0, axis=1)                                        # (B, T, H) -> (B, H)
        return self.dense(first).tanh()


class MaskedLMHead(Module):
    """LayerNorm(act(dense(h))) projected on the vocabulary, plus an output bias.

    `dim` is the embedding width the decoder shares with the word embeddings (ALBERT's E)."""

    def __init__(self, c: BertConfig, hidden: int, dim: int):
        super().__init__()
        self.dense = Linear(hidden, dim)
        self.act = activation(c.activation)
        self.norm = LayerNorm(dim, c.layer_norm_eps)
        self.tied = c.tie_word_embeddings
        if not self.tied:
            self.decoder = Linear(dim, c.vocab_size, bias=False)
        self.bias = Parameter((c.vocab_size,), init="zeros")

    def forward(self, x, word_embeddings):                                 # x: (B, T, H)
        h = self.norm(self.act(self.dense(x)))                             # (B, T, E)
        if self.tied:
            logits = h @ word_embeddings.swap_last()                       # (B, T, E) @ (E, V) -> (B, T, V)
        else:
            logits = self.decoder(h)                                       # (B, T, V)
        return logits + self.bias


class BertModel(Module):
    """Embeddings, encoder and the heads `config.head` asks for."""

    pair_output: ClassVar[str] = "seq_relationship_logits"   # the sentence-pair head's output with the MLM's

    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        dim = self.embedding_dim(c)
        self.embeddings = BertEmbeddings(c, dim)
        self.encoder = self.make_encoder(c)
        if c.head != "mlm":
            self.pooler = Pooler(c.hidden_size)
        if c.head in ("mlm", "pretraining"):
            self.mlm = MaskedLMHead(c, c.hidden_size, dim)
        if c.head in ("nsp", "pretraining"):
            self.nsp = Linear(c.hidden_size, 2)

    @staticmethod
    def embedding_dim(c: BertConfig) -> int:
        return c.hidden_size

    @staticmethod
    def make_encoder(c: BertConfig) -> Module:
        return BertEncoder(c)

    def input_specs(self):
        ids = InputSpec(DType.int64, ("batch", "seq"))
        specs = {"input_ids": ids, "attention_mask": ids}
        if self.config.type_vocab_size > 1:
            specs["token_type_ids"] = ids
        return specs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        keep = padding_keep_mask(attention_mask)                           # (B, 1, 1, T)
        x = self.encoder(self.embeddings(input_ids, token_type_ids), keep)  # (B, T, H)
        head = self.config.head
        pooled = self.pooler(x) if head != "mlm" else None                 # (B, H)
        if head == "base":
            return {"last_hidden_state": x, "pooler_output": pooled}
        if head == "nsp":
            return {"logits": self.nsp(pooled)}                            # (B, 2)
        out = {"logits": self.mlm(x, self.embeddings.word.weight)}        # (B, T, V)
        if head == "pretraining":
            out[self.pair_output] = self.nsp(pooled)                       # (B, 2)
        return out


@register_model("bert", BertConfig)
def build(config: BertConfig) -> BertModel:
    return BertModel(config)


@register_model("roberta", RobertaConfig)
def build_roberta(config: RobertaConfig) -> BertModel:
    return BertModel(config)


# ---------------------------------------------------------------- Hugging Face
@dataclass(frozen=True)
class HFLayout:
    """Where one family's HF checkpoints keep each piece (after the base-model prefix is stripped)."""

    layer: str                                  # "encoder.layer.{i}"
    layer_parts: Mapping[str, str]              # our sub-module -> HF sub-module, within a layer
    pooler: str
    mlm_dense: str
    mlm_norm: str
    mlm_bias: str
    mlm_decoder: str
    pair: str = ""                              # the sentence-pair classifier (NSP / SOP)


BERT_LAYER_PARTS = {
    "attention.q_proj": "attention.self.query", "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value", "attention.o_proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn_norm": "output.LayerNorm",
}
BERT_LAYOUT = HFLayout("encoder.layer.{i}", BERT_LAYER_PARTS, pooler="pooler.dense",
                       mlm_dense="cls.predictions.transform.dense", mlm_norm="cls.predictions.transform.LayerNorm",
                       mlm_bias="cls.predictions.bias", mlm_decoder="cls.predictions.decoder",
                       pair="cls.seq_relationship")
ROBERTA_LAYOUT = HFLayout("encoder.layer.{i}", BERT_LAYER_PARTS, pooler="pooler.dense",
                          mlm_dense="lm_head.dense", mlm_norm="lm_head.layer_norm", mlm_bias="lm_head.bias",
                          mlm_decoder="lm_head.decoder")

# TF-era checkpoints (bert-base-uncased ...) name LayerNorm parameters gamma/beta.
LEGACY_NAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))


def part_rules(ours: str, hf: str, weights: Dict[str, WeightRule]) -> None:
    """One Linear (weight transposed to [in, out]) or LayerNorm (copied), with its bias."""
    norm = ours.endswith("norm")
    weights[f"{ours}.weight"] = rule(f"{hf}.weight") if norm else rule(f"{hf}.weight", fn=transposed)
    weights[f"{ours}.bias"] = rule(f"{hf}.bias")


def embedding_rules(weights: Dict[str, WeightRule]) -> None:
    for ours, hf in (("word", "word_embeddings"), ("position", "position_embeddings"),
                     ("token_type", "token_type_embeddings")):
        weights[f"embeddings.{ours}.weight"] = rule(f"embeddings.{hf}.weight")
    part_rules("embeddings.norm", "embeddings.LayerNorm", weights)


def layer_rules(ours: str, hf: str, layout: HFLayout, weights: Dict[str, WeightRule]) -> None:
    for our_part, hf_part in layout.layer_parts.items():
        part_rules(f"{ours}.{our_part}", f"{hf}.{hf_part}", weights)


def head_rules(c: BertConfig, layout: HFLayout, weights: Dict[str, WeightRule]) -> None:
    if c.head != "mlm":
        part_rules("pooler.dense", layout.pooler, weights)
    if c.head in ("mlm", "pretraining"):
        part_rules("mlm.dense", layout.mlm_dense, weights)
        part_rules("mlm.norm", layout.mlm_norm, weights)
        if c.tie_word_embeddings:
            weights["mlm.bias"] = rule(layout.mlm_bias)
        else:   # untied, HF's decoder keeps its own bias and the head's `bias` goes unread
            weights["mlm.decoder.weight"] = rule(f"{layout.mlm_decoder}.weight", fn=transposed)
            weights["mlm.bias"] = rule(f"{layout.mlm_decoder}.bias")
    if c.head in ("nsp", "pretraining"):
        if not layout.pair:
            raise ConfigError(f"{c.family}: head {c.head!r} has no sentence-pair classifier in Hugging Face checkpoints")
        part_rules("nsp", layout.pair, weights)


def bert_weight_map(c: BertConfig, layout: HFLayout) -> Dict[str, WeightRule]:
    weights: Dict[str, WeightRule] = {}
    embedding_rules(weights)
    for i in range(c.num_layers):
        layer_rules(f"encoder.layers.{i}", layout.layer.format(i=i), layout, weights)
    head_rules(c, layout, weights)
    return weights


def head_from_architectures(hf: Mapping[str, Any], heads: Mapping[str, str], model_type: str) -> str:
    """The head a checkpoint was saved with (no `architectures`: the bare encoder)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{model_type}: config option architectures={archs!r} is not a list of class names"[:200])
    found = set()
    for arch in archs:
        if arch not in heads:
            raise ConfigError(f"{model_type}: config option architectures={arch!r} is not supported "
                              f"(supported: {', '.join(heads)})")
        found.add(heads[arch])
    if len(found) > 1:
        raise ConfigError(f"{model_type}: config option architectures={list(archs)!r} names different heads")
    return found.pop() if found else "base"


def refuse_encoder_options(hf: Mapping[str, Any], model_type: str) -> None:
    """Options of the BERT-style encoders that change numerics and are not implemented."""
    refuse_if(hf, "position_embedding_type", ["absolute"], model_type)   # relative_key(_query): not implemented
    refuse_if(hf, "is_decoder", [False], model_type)                     # causal BERT (BertLMHeadModel)
    refuse_if(hf, "add_cross_attention", [False], model_type)


def encoder_fields(hf: Mapping[str, Any], defaults: BertConfig, model_type: str, heads: Mapping[str, str],
                   default_act: str) -> Dict[str, Any]:
    """The config fields BERT, RoBERTa and ALBERT read alike from config.json."""
    refuse_encoder_options(hf, model_type)
    return dict(
        vocab_size=hf_get(hf, "vocab_size", defaults.vocab_size),
        hidden_size=hf_get(hf, "hidden_size", defaults.hidden_size),
        num_layers=hf_get(hf, "num_hidden_layers", defaults.num_layers),
        num_heads=hf_get(hf, "num_attention_heads", defaults.num_heads),
        intermediate_size=hf_get(hf, "intermediate_size", defaults.intermediate_size),
        max_position_embeddings=hf_get(hf, "max_position_embeddings", defaults.max_position_embeddings),
        type_vocab_size=hf_get(hf, "type_vocab_size", defaults.type_vocab_size),
        layer_norm_eps=hf_get(hf, "layer_norm_eps", defaults.layer_norm_eps),
        activation=activation_from_hf(hf, model_type, default_act),
        head=head_from_architectures(hf, heads, model_type),
        tie_word_embeddings=hf_get(hf, "tie_word_embeddings", True),
        pad_token_id=hf_get(hf, "pad_token_id", defaults.pad_token_id),
    )


BERT_HEADS = {"BertModel": "base", "BertForMaskedLM": "mlm", "BertForPreTraining": "pretraining",
              "BertForNextSentencePrediction": "nsp"}
ROBERTA_HEADS = {"RobertaModel": "base", "RobertaForMaskedLM": "mlm"}


def bert_from_hf(hf: Dict[str, Any]) -> BertConfig:
    return BertConfig(**encoder_fields(hf, BertConfig(), "bert", BERT_HEADS, "gelu"))


def roberta_from_hf(hf: Dict[str, Any]) -> RobertaConfig:
    return RobertaConfig(**encoder_fields(hf, RobertaConfig(), "roberta", ROBERTA_HEADS, "gelu"))


register_adapter(HFAdapter(
    family="bert", model_types=("bert",), config_from_hf=bert_from_hf,
    weight_map=lambda c: bert_weight_map(c, BERT_LAYOUT), base_prefixes=("bert.",), renames=LEGACY_NAMES,
    ignore=(r"embeddings\.position_ids", r"pooler\.dense\.(weight|bias)", r"cls\.seq_relationship\.(weight|bias)",
            r"cls\.predictions\.(bias|decoder\.weight|decoder\.bias)"),
))

register_adapter(HFAdapter(
    family="roberta", model_types=("roberta",), config_from_hf=roberta_from_hf,
    weight_map=lambda c: bert_weight_map(c, ROBERTA_LAYOUT), base_prefixes=("roberta.",), renames=LEGACY_NAMES,
    ignore=(r"embeddings\.position_ids", r"pooler\.dense\.(weight|bias)",
            r"lm_head\.(bias|decoder\.weight|decoder\.bias)"),
))
