"""Hostile checkpoints and configs: each is one line naming the offending tensor, field or file.

Every row corrupts a small saved checkpoint (or gives absurd `--set` sizes) and expects, through the
CLI `main()` (in process) and through the Python API: exit status 2 / a `TgraphError`, a message
containing the row's substring, no traceback, and no output file left behind. The checkpoints are
written with `safetensors.numpy` under Hugging Face's tensor names, so no torch is needed.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, List, NamedTuple

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tgraph.api import export_onnx
from tgraph.cli import main
from tgraph.errors import TgraphError, TgraphWarning

C, V, P, LAYERS = 8, 16, 8, 2       # width, vocabulary, positions, blocks


def gpt2_tensors(rng) -> dict:
    t = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(LAYERS):
        t.update({f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,), f"h.{i}.ln_2.weight": (C,),
                  f"h.{i}.ln_2.bias": (C,), f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
                  f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
                  f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
                  f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,)})
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in t.items()}


GPT2_CONFIG = {"model_type": "gpt2", "n_embd": C, "n_head": 2, "n_layer": LAYERS, "vocab_size": V,
               "n_positions": P, "layer_norm_epsilon": 1e-5, "architectures": ["GPT2LMHeadModel"]}


def llama_tensors(rng) -> dict:
    t = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,), "lm_head.weight": (V, C),
         "model.layers.0.input_layernorm.weight": (C,), "model.layers.0.post_attention_layernorm.weight": (C,),
         "model.layers.0.mlp.gate_proj.weight": (16, C), "model.layers.0.mlp.up_proj.weight": (16, C),
         "model.layers.0.mlp.down_proj.weight": (C, 16)}
    for p in "qkvo":
        t[f"model.layers.0.self_attn.{p}_proj.weight"] = (C, C)
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in t.items()}


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": C, "num_attention_heads": 2, "num_key_value_heads": 2,
                "intermediate_size": 16, "num_hidden_layers": 1, "vocab_size": V, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False}


def write_checkpoint(directory: Path, config: dict, tensors: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hi": 1, "there": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))


# ---------------------------------------------------------------- corruptions: (checkpoint dir, a dir outside it)
def edit_config(**changes) -> Callable[[Path, Path], None]:
    def corrupt(ckpt: Path, outside: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        config.update(changes)
        (ckpt / "config.json").write_text(json.dumps(config))     # json writes inf/nan as Infinity/NaN
    return corrupt


def edit_tensor(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path, Path], None]:
    def corrupt(ckpt: Path, outside: Path) -> None:
        tensors = load_file(str(ckpt / "model.safetensors"))
        tensors[name] = fn(tensors[name])
        save_file(tensors, str(ckpt / "model.safetensors"))
    return corrupt


def deep_config(ckpt: Path, outside: Path) -> None:
    depth = 100_000
    (ckpt / "config.json").write_text('{"model_type": "gpt2", "x": ' + "[" * depth + "]" * depth + "}")


def sharded(weight_map) -> Callable[[Path, Path], None]:
    def corrupt(ckpt: Path, outside: Path) -> None:
        (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return corrupt


def link_out(name: str, target: str = "") -> Callable[[Path, Path], None]:
    """Replace `name` in the checkpoint by a symlink to `target` (default: a valid copy of it outside)."""
    def corrupt(ckpt: Path, outside: Path) -> None:
        if name.startswith("model-0000"):
            sharded({k: name for k in load_file(str(ckpt / "model.safetensors"))})(ckpt, outside)
        if name == "tokenizer.json":
            write_tokenizer(ckpt / name)
        dest = Path(target) if target else outside / name
        if not target:
            shutil.copyfile(ckpt / name, dest)
        (ckpt / name).unlink()
        os.symlink(dest, ckpt / name)
    return corrupt


class Case(NamedTuple):
    id: str
    model: str                               # "gpt2-ckpt", "llama-ckpt" or a registered name
    corrupt: Callable[[Path, Path], None] = None
    sets: tuple = ()
    message: str = ""
    command: str = "export"                  # or "generate" (reads the checkpoint's tokenizer.json)


CASES: List[Case] = [
    # item 3: integer and bool tensors are refused, not cast
    Case("i32-header-over-float-bytes", "gpt2-ckpt", edit_tensor("h.0.attn.c_attn.weight", lambda a: a.view(np.int32)),
         message="tensor 'h.0.attn.c_attn.weight' has dtype int32; expected a floating-point tensor (float32)"),
    Case("int64-wte", "gpt2-ckpt", edit_tensor("wte.weight", lambda a: np.arange(a.size, dtype=np.int64).reshape(a.shape)),
         message="tensor 'wte.weight' has dtype int64"),
    Case("bool-norm", "gpt2-ckpt", edit_tensor("h.1.ln_2.weight", lambda a: a > 0),
         message="tensor 'h.1.ln_2.weight' has dtype bool"),
    # item 4: float config fields are finite and in range, in every family
    Case("eps-infinity", "gpt2-ckpt", edit_config(layer_norm_epsilon=float("inf")),
         message="gpt2: layer_norm_epsilon must be a finite number, got inf"),
    Case("transformer-eps-negative-set", "transformer", sets=("layer_norm_eps=-1",),
         message="transformer: layer_norm_eps must be in (0, 1], got -1.0"),
    Case("eps-absurd", "gpt2-ckpt", edit_config(layer_norm_epsilon=1e10),
         message="gpt2: layer_norm_epsilon must be in (0, 1], got 10000000000.0"),
    Case("rms-eps-infinity", "llama-ckpt", edit_config(rms_norm_eps=float("inf")),
         message="llama: rms_norm_eps must be a finite number, got inf"),
    Case("rope-theta-string", "llama-ckpt", edit_config(rope_theta="fast"),
         message="config option rope_theta='fast' must be a finite number"),
    Case("rope-theta-infinity-set", "palm", sets=("rope_theta=inf",), message="palm: rope_theta must be a finite number"),
    # item 12: wrong JSON types, absurd nesting, malformed shard indexes
    Case("model-type-list", "gpt2-ckpt", edit_config(model_type=["gpt2"]),
         message="model_type must be a string, got ['gpt2']"),
    Case("n-head-string", "gpt2-ckpt", edit_config(n_head="2"), message="gpt2: n_head must be an integer, got str '2'"),
    Case("activation-list", "gpt2-ckpt", edit_config(activation_function=["gelu_new"]),
         message="gpt2: config option activation_function=['gelu_new'] is not supported"),
    Case("hidden-act-list", "llama-ckpt", edit_config(hidden_act=["silu"]),
         message="llama: config option hidden_act=['silu'] is not supported"),
    Case("tie-string", "gpt2-ckpt", edit_config(tie_word_embeddings="false"),
         message="gpt2: tie_word_embeddings must be true or false, got str 'false'"),
    Case("config-nested-100000-deep", "gpt2-ckpt", deep_config, message="config.json: JSON nested too deeply"),
    Case("index-weight-map-list", "gpt2-ckpt", sharded(["model-00001-of-00001.safetensors"]),
         message="model.safetensors.index.json: not a valid safetensors index (weight_map must be a JSON object"),
    Case("index-weight-map-int", "gpt2-ckpt", sharded({"wte.weight": 1}),
         message="weight_map['wte.weight'] must be a shard file name, got 1"),
    # item 11: nothing that resolves outside the checkpoint directory is read
    Case("weights-link-to-etc-passwd", "gpt2-ckpt", link_out("model.safetensors", "/etc/passwd"),
         message="model.safetensors: resolves to /etc/passwd, outside the checkpoint directory"),
    Case("weights-link-elsewhere", "gpt2-ckpt", link_out("model.safetensors"),
         message="model.safetensors: resolves to"),
    Case("config-link-elsewhere", "gpt2-ckpt", link_out("config.json"),
         message="config.json: resolves to"),
    Case("shard-link-elsewhere", "gpt2-ckpt", link_out("model-00001-of-00001.safetensors"),
         message="model-00001-of-00001.safetensors: resolves to"),
    Case("tokenizer-link-elsewhere", "gpt2-ckpt", link_out("tokenizer.json"), message="tokenizer.json: resolves to",
         command="generate"),
    # item 13 and the MemoryError of item 12: sizes are bounded before anything is built
    Case("a-million-layers", "gpt2-ckpt", edit_config(n_layer=1_000_000), message="but only"),
    Case("set-vocab-beyond-memory", "gpt2", sets=("vocab_size=100000000000",), message="needs about"),
]


@pytest.fixture
def case_dirs(tmp_path):
    root = tmp_path
    (root / "outside").mkdir()
    (root / "out").mkdir()
    return root


def prepare(case: Case, root: Path) -> str:
    if not case.model.endswith("-ckpt"):
        return case.model
    rng = np.random.default_rng(0)
    config, tensors = (GPT2_CONFIG, gpt2_tensors(rng)) if case.model == "gpt2-ckpt" else (LLAMA_CONFIG, llama_tensors(rng))
    ckpt = write_checkpoint(root / "ckpt", config, tensors)
    if case.corrupt is not None:
        case.corrupt(ckpt, root / "outside")
    return str(ckpt)


def sets_of(case: Case) -> dict:
    return dict(s.split("=", 1) for s in case.sets)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_refuses_in_one_line(case, case_dirs, capsys):
    model = prepare(case, case_dirs)
    out = case_dirs / "out" / "m.onnx"
    sets = [a for s in case.sets for a in ("--set", s)]
    argv = ["export", model, "-o", str(out), *sets] if case.command == "export" else \
        ["generate", model, "--prompt", "hi there", "--max-new-tokens", "1", *sets]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgraph: error:"), err
    assert case.message in lines[0]
    assert os.listdir(case_dirs / "out") == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api_refuses_with_a_tgraph_error(case, case_dirs):
    model = prepare(case, case_dirs)
    out = case_dirs / "out" / "m.onnx"
    with pytest.raises(TgraphError) as e:
        if case.command == "export":
            export_onnx(model, out, overrides=sets_of(case))
        else:
            from tgraph.generate import generate

            generate(model, "hi there", 1, overrides=sets_of(case))
    assert case.message in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(case_dirs / "out") == []


# ---------------------------------------------------------------- item 14: NaN/inf weights are loaded, with a warning
def nan_checkpoint(root: Path) -> str:
    tensors = gpt2_tensors(np.random.default_rng(0))
    tensors["h.0.mlp.c_fc.weight"][0, :2] = np.nan
    tensors["h.0.mlp.c_fc.weight"][1, 0] = np.inf
    tensors["wpe.weight"][3, 3] = -np.inf
    return str(write_checkpoint(root / "ckpt", GPT2_CONFIG, tensors))


NAN_MESSAGE = "2 checkpoint tensors hold NaN/inf weights: 'wpe.weight' (0 NaN, 1 inf), 'h.0.mlp.c_fc.weight' (2 NaN, 1 inf)"


def test_nan_weights_warn_in_one_line_from_the_cli(case_dirs, capsys):
    out = case_dirs / "out" / "m.onnx"
    assert main(["export", nan_checkpoint(case_dirs), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgraph: warning:") and NAN_MESSAGE in lines[0], err
    assert out.is_file()


def test_nan_weights_warn_through_the_api(case_dirs):
    with pytest.warns(TgraphWarning, match=r"hold NaN/inf weights") as record:
        export_onnx(nan_checkpoint(case_dirs), case_dirs / "out" / "m.onnx")
    assert [NAN_MESSAGE in str(w.message) for w in record if w.category is TgraphWarning] == [True]


def test_finite_checkpoint_gives_no_warning(case_dirs):
    ckpt = write_checkpoint(case_dirs / "ckpt", GPT2_CONFIG, gpt2_tensors(np.random.default_rng(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TgraphWarning)
        export_onnx(str(ckpt), case_dirs / "out" / "m.onnx")


def test_hugging_face_cache_links_are_followed(case_dirs):
    """The HF hub cache keeps files in blobs/ and links them from snapshots/<rev>/: that is not 'outside'."""
    repo = case_dirs / "models--tiny--gpt2"
    src = write_checkpoint(case_dirs / "ckpt", GPT2_CONFIG, gpt2_tensors(np.random.default_rng(0)))
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.move(str(src / name), repo / "blobs" / f"sha-{name}")
        os.symlink(Path("..", "..", "blobs", f"sha-{name}"), snap / name)
    export_onnx(str(snap), case_dirs / "out" / "m.onnx")
    assert (case_dirs / "out" / "m.onnx").is_file()


# ---------------------------------------------------------------- the general mechanisms behind the table
def registered_configs():
    from tgraph.models.registry import MODELS, get_family

    get_family("gpt2")                       # imports the zoo
    return sorted((name, family.config_cls) for name, family in MODELS.items())


@pytest.mark.parametrize("name,config_cls", registered_configs())
def test_every_field_of_every_family_is_type_and_range_checked(name, config_cls):
    """Each float field refuses inf, NaN and a string; each int field a string and a float; each bool a string."""
    import dataclasses
    import typing

    from tgraph.errors import ConfigError

    hints = typing.get_type_hints(config_cls)
    checked = 0
    for field in dataclasses.fields(config_cls):
        kind = hints[field.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        bad = {float: [float("inf"), float("nan"), "1e-5"], int: ["4", 4.0, True], bool: ["false", 1],
               str: [3]}.get(kind, [])
        for value in bad:
            with pytest.raises(ConfigError, match=rf"{field.name} must be"):
                config_cls(**{field.name: value})
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("name,config_cls", registered_configs())
def test_size_estimate_equals_the_built_model(name, config_cls):
    """The multilinear extrapolation from small probes is exact for every family (here at 3 of each
    repeated field, where 1 and 2 are the probes)."""
    from tgraph.models.config_checks import repeated_fields
    from tgraph.models.registry import MODELS
    from tgraph.resources import estimate

    family = MODELS[name]
    config = config_cls(**{f: 3 for f in repeated_fields(config_cls())})
    model = family.build(config)
    est = estimate(family.build, config)
    assert (est.parameters, est.modules) == (model.parameter_count(), sum(1 for _ in model.named_modules()))


def test_memory_error_is_one_line_from_the_cli(case_dirs, capsys):
    """A model the estimate cannot see (a user's factory) that allocates too much: one line, exit 2."""
    src = case_dirs / "big.py"
    src.write_text("from tgraph.dsl import Module, Linear, InputSpec\n"
                   "from tgraph.ir import DType\n"
                   "class Big(Module):\n"
                   "    def __init__(self, width):\n"
                   "        super().__init__()\n"
                   "        self.fc = Linear(1000, width)\n"
                   "    def input_specs(self):\n"
                   "        return {'x': InputSpec(DType.float32, ('batch', 1000))}\n"
                   "    def forward(self, x):\n"
                   "        return {'y': self.fc(x)}\n"
                   "def make(width=3):\n"
                   "    return Big(width)\n")
    code = main(["export", f"{src}:make", "-o", str(case_dirs / "out" / "m.onnx"), "--set", "width=1000000000000"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgraph: error: out of memory (MemoryError"), err
    assert os.listdir(case_dirs / "out") == []
