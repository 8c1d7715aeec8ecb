"""Generation directories: everything a runtime needs to generate, exported once.

    tgraph export MODEL --task generate -o DIR [--max-length N] [--target cpu|cuda]

writes

    DIR/model.onnx (+ model.onnx.data)   the static-KV-cache decoder (`tgraph.dsl.cache`)
    DIR/genai_config.json                onnxruntime-genai's description of it (og.Model(DIR))
    DIR/tokenizer.json, tokenizer_config.json, generation_config.json, special_tokens_map.json
                                         copied from a checkpoint directory where present
    DIR/tgraph.json                      family, config, level, dtype, target, cache layout,
                                         max_length, special ids: what `Generator(DIR)` reads

An encoder-decoder (t5, bart, mbart, transformer) writes two graphs instead of model.onnx:

    DIR/encoder.onnx    input_ids (+ attention_mask) -> last_hidden_state and every decoder
                        layer's cross-attention K/V (`tgraph.dsl.cache.CROSS`): run once per request
    DIR/decoder.onnx    the static-KV-cache decoder; it reads those K/V (and
                        encoder_attention_mask) as they are, bound once per request

and tgraph.json names both (model_file, encoder_file) with the decoder start and forced ids.
No genai_config.json then: onnxruntime-genai 0.18 runs encoder-decoders only as its "whisper"
type (audio features in, its own encoder interface; src/models/model_type.h lists no t5, bart
or marian), not text encoder-decoders.

`tgraph generate DIR` and `tgraph.generate.Generator(DIR)` then only read the directory and
create the sessions: no tracing. The directory appears whole or not at all (it is written
next to DIR and renamed into place).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .errors import ConfigError
from .ir import DType, Graph
from .ir.core import Node, Value

MANIFEST = "tgraph.json"
MODEL_FILE = "model.onnx"
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"     # an encoder-decoder's two graphs
GENAI_CONFIG = "genai_config.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
TARGETS = ("cpu", "cuda")
FORMAT = 1


def is_generation_dir(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / MANIFEST).is_file()


def target_plan(target: str, dtype: str) -> Dict[str, Any]:
    """What a target gets, decided here once (bench/static_cache.py measured the CPU choice):
    the attention op, the graph's logits dtype, the session options a runtime should set."""
    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "cpu" and dtype == "bfloat16":
        raise ConfigError("--dtype bfloat16 needs --target cuda (onnxruntime's CPU provider has almost no "
                          "bfloat16 kernels)")
    return {
        "attention": "com.microsoft.GroupQueryAttention",   # in place, per-row lengths, rotary inside
        "logits_dtype": "float32",                         # so sampling never sees half precision
        "provider_options": [{"cuda": {"enable_cuda_graph": "0"}}] if target == "cuda" else [],
        "level": 3,
    }


#: onnxruntime rewrites for the static-cache decoder, after -O`level`'s passes: GroupQueryAttention
#: reads the packed QKV projection (no Split per layer).
GENERATION_PASSES = ("fuse-packed-gqa",)
#: ... and, for float32 on the CPU, residual Add + RMSNorm/LayerNorm as one contrib op (as
#: onnxruntime-genai's builder writes them). bench/decode_profile.py on the LLaMA-shaped 150M
#: decoder, onnxruntime 1.31 CPU, 2 threads, same process, alternating: decode step CPU time
#: 48.7 -> 44.6 ms with threads sleeping, 108 -> 97 ms spinning (a loaded machine, load ~8).
CPU_FLOAT32_PASSES = ("fuse-skip-layer-norm",)


def generation_pipeline(level: int, target: str = "cpu", dtype: str = "float32") -> list:
    """The passes a generation build runs: -O`level`'s, then `GENERATION_PASSES` (and
    `CPU_FLOAT32_PASSES` for a float32 CPU target) where the level runs the onnxruntime
    fusions (-O3), which they build on."""
    from .passes import level_pipeline
    from .passes.levels import ORT_FUSIONS

    names = level_pipeline(level)
    if not set(ORT_FUSIONS) <= set(names):
        return names
    extra = list(GENERATION_PASSES) + (list(CPU_FLOAT32_PASSES) if (target, dtype) == ("cpu", "float32") else [])
    return names + extra


def logits_to_float32(graph: Graph) -> bool:
    """Cast a half-precision `logits` output to float32 in the graph (the output keeps its name)."""
    for i, v in enumerate(graph.outputs):
        if v.name != "logits" or v.dtype in (DType.float32, DType.float64):
            continue
        inner = graph.names.fresh(f"logits_{v.dtype.name}")
        v.name = inner
        out = Value("logits", v.type.with_dtype(DType.float32))
        graph.append(Node("Cast", [v], [out], {"to": DType.float32}))
        graph.outputs[i] = out
        return True
    return False


def _family_name(model: str) -> str:
    """The registered family behind MODEL ("custom" for file.py:factory)."""
    if os.path.isdir(model):
        from .checkpoints import read_config
        from .sources import adapter_for

        return adapter_for(read_config(Path(model)), Path(model)).family
    head, sep, _ = model.rpartition(":")
    return "custom" if sep and head.endswith(".py") else model


#: onnxruntime-genai 0.18's names for the checkpoints the llama family reads; every other decoder
#: family (gpt, gpt2, gpt_neo, palm) is written as its generic "decoder" type. Measured with
#: og.Model(DIR): "gpt2" is refused at the first step ("Model input was not found"), since genai's
#: gpt2 type expects its own builder's inputs; "decoder", "llama", "mistral" and "qwen2" run tgraph's
#: static-cache interface with the same greedy ids as `Generator(DIR)`.
GENAI_LLAMA_TYPES = ("llama", "mistral", "qwen2")
GENAI_GENERIC_TYPE = "decoder"


def genai_model_type(family: str, checkpoint_model_type: Optional[str] = None) -> str:
    """genai_config.json's model "type" for a decoder of `family` (from a checkpoint whose
    config.json says `checkpoint_model_type`)."""
    if family == "llama":
        return checkpoint_model_type if checkpoint_model_type in GENAI_LLAMA_TYPES else "llama"
    return GENAI_GENERIC_TYPE


def _checkpoint_model_type(model: str) -> Optional[str]:
    if not os.path.isdir(model):
        return None
    from .checkpoints import read_config

    value = read_config(Path(model)).get("model_type")
    return value if isinstance(value, str) else None


def _graph_facts(graph: Graph) -> Dict[str, int]:
    pasts = [v for v in graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith(".key")]
    attn = next((n for n in graph.nodes if n.qualified_op == "com.microsoft.GroupQueryAttention"), None)
    if not pasts or attn is None:
        raise ConfigError("the decoder has no static KV cache (no GroupQueryAttention over past_key_values.*)")
    head = int(pasts[0].type.shape[3])
    heads = int(attn.attrs["num_heads"])
    vocab = graph.outputs[0].type.shape[-1] if graph.outputs and graph.outputs[0].name == "logits" else None
    return {"num_layers": len(pasts), "kv_heads": int(pasts[0].type.shape[1]), "head_size": head,
            "num_heads": heads, "hidden_size": heads * head, "vocab_size": int(vocab)}


def genai_config(facts: Mapping[str, int], max_length: int, special: Mapping[str, Any], target: str,
                 model_type: str) -> Dict[str, Any]:
    """onnxruntime-genai's genai_config.json for a static-cache decoder: its standard decoder
    interface, past and present sharing one buffer (past_present_share_buffer)."""
    def one(x):
        return x[0] if isinstance(x, (list, tuple)) and len(x) == 1 else x
    eos = special.get("eos")
    return {
        "model": {
            "bos_token_id": special.get("bos") if special.get("bos") is not None else 0,
            "context_length": int(max_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": target_plan(target, "float32")["provider_options"]},
                "filename": MODEL_FILE,
                "head_size": facts["head_size"],
                "hidden_size": facts["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": facts["num_heads"],
                "num_hidden_layers": facts["num_layers"],
                "num_key_value_heads": facts["kv_heads"],
            },
            "eos_token_id": one(list(eos)) if eos else (special.get("pad") or 0),
            "pad_token_id": special.get("pad") if special.get("pad") is not None else 0,
            "type": model_type,
            "vocab_size": facts["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": int(max_length), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def export_generation_dir(model: str, out_dir, *, overrides: Optional[Mapping[str, str]] = None, level: int = 3,
                          dtype: str = "float32", target: str = "cpu", max_length: Optional[int] = None,
                          seed: int = 0, quantize=None) -> Dict[str, Any]:
    """Export `model` into the generation directory `out_dir`; returns the manifest.

    `quantize` (`tgraph.passes.quantize.QuantizeOptions`, from `--quantize`): the decoder's
    linear layers become MatMulNBits; tgraph.json records the scheme under "quantization"."""
    from .api import build
    from .codegen.onnx import save_onnx
    from .generate import GENERATION_KEYS, _config_class, _fields
    from .models.decoding import cache_length
    from .sources import load_model
    from .tokens import checkpoint_special_ids, resolve_special_tokens

    plan = target_plan(target, dtype)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty directory; remove it or choose another -o")
    overrides = dict(overrides or {})
    clash = [k for k in GENERATION_KEYS if k in overrides]
    if clash:
        raise ConfigError(f"--set {clash[0]}: --task generate sets it itself (use --max-length for the cache size)")
    cls = _config_class(model)
    fields = _fields(cls) if cls is not None else set()
    encoder_decoder = "part" in fields
    if cls is not None and "kv_cache" not in fields:
        raise ConfigError(f"{model}: {cls.__name__} has no static KV-cache decoder (generation directories need "
                          "a decoder: gpt, gpt2, llama, palm, t5, bart, mbart, transformer)")
    if encoder_decoder and quantize is not None:
        raise ConfigError(f"{model}: --quantize is not supported for encoder-decoder generation directories yet")
    if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
        raise ConfigError(f"--max-length must be a positive int, got {max_length!r}")
    sets = {**overrides, "use_cache": "true", "kv_cache": "static",
            **({"cache_length": str(int(max_length))} if max_length else {}),
            **({"part": "decoder"} if encoder_decoder else {})}
    loaded = load_model(model, sets)
    config = loaded.config
    from .generate import POSITION_LIMITS

    limit = next((int(getattr(config, k)) for k in POSITION_LIMITS if hasattr(config, k)), None)
    capacity = cache_length(config, limit)
    graph = build(loaded, seed=seed, pipeline=generation_pipeline(level, target, dtype), dtype=dtype).graph
    encoder = build(load_model(model, {**overrides, "part": "encoder", "use_cache": "true"}), seed=seed, level=level,
                    dtype=dtype).graph if encoder_decoder else None
    quantization = None
    if quantize is not None:
        from .quantize_report import quantize_graph, report_dict
        from .tokens import find_tokenizer

        tokenizer = find_tokenizer(model) if quantize.calibration else None
        quantization = report_dict(quantize, quantize_graph(graph, quantize, tokenizer))
    logits_to_float32(graph)
    facts = _graph_facts(graph)
    checkpoint = checkpoint_special_ids(model) if os.path.isdir(model) else {}
    special = resolve_special_tokens({}, checkpoint, config)
    special_ids = {"eos": list(special.eos) if special.eos else [], "pad": special.pad, "bos": special.bos}
    files = {"model_file": MODEL_FILE}
    if encoder_decoder:
        from .generate import ForcedTokens

        forced = ForcedTokens.of_checkpoint(model, True) if os.path.isdir(model) else ForcedTokens()
        named = checkpoint.get("decoder_start_token_id", getattr(config, "decoder_start_token_id", None))
        # the named start id, and the one it falls back to when a bos id is not given either
        special_ids.update(decoder_start=named, decoder_start_default=special.decoder_start,
                           forced_bos=forced.bos, forced_eos=list(forced.eos))
        files = {"model_file": DECODER_FILE, "encoder_file": ENCODER_FILE}
    manifest = {
        "format": FORMAT, "family": _family_name(model),
        "config_class": type(config).__name__, "config": dataclasses.asdict(config), "source": str(model),
        "level": level, "dtype": dtype, "target": target, "cache_layout": "static", "max_length": capacity,
        "attention": plan["attention"], "logits_dtype": plan["logits_dtype"], "seed": seed,
        "special_ids": special_ids, **files, "quantization": quantization, "encoder_decoder": encoder_decoder,
        "genai_config": None if encoder_decoder else GENAI_CONFIG,
    }
    family_type = manifest["family"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)                               # mkdtemp makes it private
        save_onnx(graph, tmp / files["model_file"], external_data=True)
        if encoder is not None:
            save_onnx(encoder, tmp / files["encoder_file"], external_data=True)
        else:
            model_type = genai_model_type(family_type, _checkpoint_model_type(model))
            (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(facts, capacity, special_ids, target, model_type),
                                                       indent=2) + "\n")
        if os.path.isdir(model):
            for name in COPIED_FILES:
                if (Path(model) / name).is_file():
                    shutil.copyfile(Path(model) / name, tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        if out.exists():
            out.rmdir()                                    # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path) -> Dict[str, Any]:
    """DIR/tgraph.json, checked: a clear one-line error names the file and field."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read the generation manifest ({e})") from None
    for key in ("format", "family", "config", "max_length", "cache_layout", "model_file"):
        if key not in manifest:
            raise ConfigError(f"{file}: missing field {key!r}")
    if manifest["format"] != FORMAT:
        raise ConfigError(f"{file}: format {manifest['format']!r}, this tgraph reads format {FORMAT}")
    if manifest["cache_layout"] != "static":
        raise ConfigError(f"{file}: cache_layout {manifest['cache_layout']!r}; generation directories are static")
    for key in ("model_file", "encoder_file"):
        name = manifest.get(key)
        if key == "encoder_file" and name is None:
            continue
        if not isinstance(name, str) or Path(name).name != name or not (Path(path) / name).is_file():
            raise ConfigError(f"{file}: {key} {name!r} is not a file in the directory (it is incomplete)")
    return manifest
