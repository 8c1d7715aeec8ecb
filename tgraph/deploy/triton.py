"""Triton Inference Server model repositories for tgraph models.

    tgraph deploy triton MODEL_OR_DIR -o REPO [--name NAME] [--max-batch-size B] [--instances K]
                         [--kind cpu|gpu] [--dynamic-batching]

An ONNX graph (an .onnx file, a directory holding model.onnx, or any model tgraph can
build, exported first) becomes

    REPO/NAME/config.pbtxt           platform onnxruntime_onnx, every input and output
    REPO/NAME/1/model.onnx (+ data)  with its type and dims (-1 where dynamic)

A generation directory (`tgraph export MODEL --task generate`) becomes two models:

    REPO/NAME_decoder/...            the static-KV-cache decoder step, as above
    REPO/NAME/config.pbtxt           backend "python": the generation loop
    REPO/NAME/1/model.py             (`tgraph/deploy/triton_generate_model.py`, NumPy only) that
    REPO/NAME/1/decoder.json         calls NAME_decoder once per token through Triton's
    REPO/NAME/1/tgraph.json, tokenizer*.json    business-logic scripting (BLS)

`max_batch_size` > 0 (the default, 8, when every tensor's first dim is the same dynamic
axis) means Triton owns the batch axis: it is left out of `dims`. Every written
config.pbtxt is checked (`tgraph.deploy.triton_check`) before the model directory is
moved into place; with `tritonclient` installed that check parses it with Triton's own
`model_config_pb2`. Nothing is half-written: a model directory appears whole or not at all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional


from ..errors import ConfigError
from ..onnx_import import read_onnx_proto
from .onnx_signature import TensorSig, batch_axis_problem, external_files, onnx_signature
from .pbtxt import Enum, Map, to_text

DEFAULT_MAX_BATCH = 8
VERSION = "1"
ONNX_FILE = "model.onnx"                 # the onnxruntime backend's default_model_filename
PYTHON_FILE = "model.py"                 # the python backend's
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
GENERATE_TEMPLATE = Path(__file__).with_name("triton_generate_model.py")


# ------------------------------------------------------------------ configs
def _tensor_entry(t: TensorSig, batched: bool) -> Dict[str, Any]:
    dims = list(t.dims[1:] if batched else t.dims)
    entry: Dict[str, Any] = {"name": t.name, "data_type": Enum(t.data_type), "dims": dims or [1]}
    if not dims:                         # a [batch] tensor: Triton wants dims [1], reshaped away
        entry["reshape"] = {"shape": []}
    return entry


def preferred_batch_sizes(max_batch_size: int) -> List[int]:
    """Powers of two up to the maximum, and the maximum: what the batcher should aim for."""
    sizes = [1 << k for k in range(1, max_batch_size.bit_length()) if (1 << k) < max_batch_size]
    return sizes + [max_batch_size]


def onnx_config(name: str, inputs: List[TensorSig], outputs: List[TensorSig], *, max_batch_size: int,
                instances: int, kind: str, dynamic_batching: bool) -> Dict[str, Any]:
    """config.pbtxt of an onnxruntime_onnx model, as a message dict (`tgraph.deploy.pbtxt`)."""
    batched = max_batch_size > 0
    config: Dict[str, Any] = {
        "name": name, "platform": "onnxruntime_onnx", "max_batch_size": max_batch_size,
        "input": [_tensor_entry(t, batched) for t in inputs],
        "output": [_tensor_entry(t, batched) for t in outputs],
        "instance_group": [{"count": instances, "kind": Enum(KINDS[kind])}],
    }
    if dynamic_batching:
        config["dynamic_batching"] = {"preferred_batch_size": preferred_batch_sizes(max_batch_size),
                                      "max_queue_delay_microseconds": 100}
    # tgraph already fused the graph; onnxruntime's extended level (1) keeps its own fusions
    # available for what tgraph left, and costs nothing on a fused graph.
    optimization: Dict[str, Any] = {"graph": {"level": 1}}
    if kind == "gpu":
        # TF32 off: the CUDA provider's default rounds float32 matmuls to 10-bit mantissas,
        # which tgraph's accuracy checks (float32 against the reference) do not allow for.
        optimization["execution_accelerators"] = {"gpu_execution_accelerator": [
            {"name": "cuda", "parameters": Map({"use_tf32": "0"})}]}
    config["optimization"] = optimization
    params = {"execution_mode": "0"}        # sequential: tgraph graphs are one chain of fused ops
    if kind == "cpu":
        params.update(enable_mem_pattern="1", inter_op_thread_count="1")
    config["parameters"] = Map({k: {"string_value": v} for k, v in params.items()}, message_values=True)
    return config


GENERATE_INPUTS = [   # name, type, dims: every input optional, checked by model.py
    ("text_input", "TYPE_STRING", [1]), ("input_ids", "TYPE_INT64", [-1]), ("max_tokens", "TYPE_INT32", [1]),
    ("temperature", "TYPE_FP32", [1]), ("top_p", "TYPE_FP32", [1]), ("seed", "TYPE_INT64", [1]),
]
GENERATE_OUTPUTS = [("output_ids", "TYPE_INT64", [-1]), ("text_output", "TYPE_STRING", [1])]


def generate_config(name: str, decoder: str, instances: int) -> Dict[str, Any]:
    """config.pbtxt of the Python-backend generation loop (one request at a time per instance)."""
    return {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [{"name": n, "data_type": Enum(t), "dims": d, "optional": True} for n, t, d in GENERATE_INPUTS],
        "output": [{"name": n, "data_type": Enum(t), "dims": d} for n, t, d in GENERATE_OUTPUTS],
        "instance_group": [{"count": instances, "kind": Enum("KIND_CPU")}],   # the loop; compute is the decoder's
        "parameters": Map({"decoder_model": {"string_value": decoder}}, message_values=True),
    }


# ------------------------------------------------------------------ sources
def _resolve_onnx(source: str, overrides: Optional[Mapping[str, str]], tmp: Path) -> Path:
    """The .onnx file behind SOURCE: the file, DIR/model.onnx, or the model exported into `tmp`."""
    path = Path(source)
    if source.endswith(".onnx"):
        if not path.is_file():
            raise ConfigError(f"ONNX file not found: {source}")
        if overrides:
            raise ConfigError("--set applies to a model tgraph builds, not to an .onnx file")
        return path
    if path.is_dir() and (path / ONNX_FILE).is_file() and not (path / "config.json").is_file():
        return path / ONNX_FILE
    from ..api import export_onnx

    out = tmp / ONNX_FILE
    export_onnx(source, out, overrides=overrides)
    return out


def _default_name(source: str) -> str:
    path = Path(source.rstrip("/"))
    stem = path.stem if source.endswith(".onnx") else path.name
    stem = stem.rpartition(":")[2] if ":" in stem else stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-") or "model"


def _stage_onnx_model(stage: Path, name: str, onnx_path: Path, *, max_batch_size: Optional[int], instances: int,
                      kind: str, dynamic_batching: bool) -> Dict[str, Any]:
    """REPO/NAME (in `stage`): config.pbtxt and 1/model.onnx (+ its external data files)."""
    where = str(onnx_path)
    model = read_onnx_proto(onnx_path, ConfigError)
    inputs, outputs = onnx_signature(model, where)
    why = batch_axis_problem(inputs + outputs)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH if why is None else 0
    elif max_batch_size > 0 and why is not None:
        raise ConfigError(f"--max-batch-size {max_batch_size}: {where} has no batch axis Triton can own ({why}); "
                          "use --max-batch-size 0")
    if dynamic_batching and max_batch_size == 0:
        raise ConfigError("--dynamic-batching needs a batch axis (--max-batch-size > 0)")
    config = onnx_config(name, inputs, outputs, max_batch_size=max_batch_size, instances=instances, kind=kind,
                         dynamic_batching=dynamic_batching)
    version = stage / name / VERSION
    version.mkdir(parents=True)
    shutil.copyfile(onnx_path, version / ONNX_FILE)
    for file in external_files(model, where):
        if not (onnx_path.parent / file).is_file():
            raise ConfigError(f"{where}: its external data file {file} is missing")
        shutil.copyfile(onnx_path.parent / file, version / file)
    (stage / name / "config.pbtxt").write_text(to_text(config))
    return config


def _decoder_description(onnx_path: Path, manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """What model.py needs to drive the decoder without reading the graph."""
    from ..runtime.device_cache import PAST

    model = read_onnx_proto(onnx_path, ConfigError)
    inputs, outputs = onnx_signature(model, str(onnx_path))
    out_names = {o.name for o in outputs}
    dtypes = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_BF16": "bfloat16"}
    pasts = []
    for t in inputs:
        if PAST.match(t.name):
            if t.data_type == "TYPE_BF16":
                raise ConfigError(f"{onnx_path}: bfloat16 caches cannot cross Triton's Python backend as NumPy "
                                  "arrays (NumPy has no bfloat16); export the generation directory with --dtype "
                                  "float16 for Triton")
            present = t.name.replace("past_key_values.", "present.")
            if present not in out_names or t.data_type not in dtypes or len(t.dims) != 4:
                raise ConfigError(f"{onnx_path}: cache input {t.name!r} has no matching output {present!r} "
                                  "of rank 4")
            pasts.append({"name": t.name, "present": present, "heads": t.dims[1], "head_size": t.dims[3],
                          "dtype": dtypes[t.data_type]})
    others = sorted({t.name for t in inputs} - {p["name"] for p in pasts} - {"input_ids", "attention_mask"})
    if others or "logits" not in out_names:
        raise ConfigError(f"{onnx_path}: not a static-cache decoder step (inputs {others}, outputs "
                          f"{sorted(out_names)})")
    special = manifest.get("special_ids", {})
    return {"format": 1, "max_length": int(manifest["max_length"]), "pasts": pasts,
            "eos": list(special.get("eos") or []), "pad": special.get("pad") or 0, "bos": special.get("bos")}


# ------------------------------------------------------------------ the writer
def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: a Triton model name here is letters, digits, '_', '.', '-' "
                          "(it is also the directory name)")


def _check_counts(max_batch_size: Optional[int], instances: int, kind: str) -> None:
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or max_batch_size < 0):
        raise ConfigError(f"--max-batch-size must be >= 0, got {max_batch_size}")
    if isinstance(instances, bool) or instances < 1:
        raise ConfigError(f"--instances must be >= 1, got {instances}")
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")


def write_triton_repository(source: str, repo, *, name: Optional[str] = None, max_batch_size: Optional[int] = None,
                            instances: int = 1, kind: str = "cpu", dynamic_batching: bool = False,
                            overrides: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Write SOURCE's model(s) into the Triton repository `repo`; returns
    {"models": [names written], "checked_with": "model_config_pb2", or why nothing was checked}."""
    from ..export_dir import MANIFEST, is_generation_dir, read_manifest
    from .triton_check import check_model_dir

    _check_counts(max_batch_size, instances, kind)
    name = name or _default_name(source)
    _check_name(name)
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"{repo}: exists and is not a directory")
    generation = is_generation_dir(source)
    if generation and overrides:
        raise ConfigError("--set applies to a model tgraph builds; a generation directory is fixed when exported")
    names = [name + "_decoder", name] if generation else [name]
    for n in names:
        if (repo / n).exists():
            raise ConfigError(f"{repo / n}: already exists; remove it or give another --name")
    created = [p for p in (repo, *repo.parents) if not p.exists()]      # removed again on failure
    repo.mkdir(parents=True, exist_ok=True)
    # staged beside REPO, not in it: a server polling REPO never sees a half-written model
    stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.{name}.tgraph-", dir=repo.resolve().parent))
    moved: List[Path] = []
    try:
        os.chmod(stage, 0o755)
        work = stage / ".export"
        work.mkdir()
        checked_with = None
        if generation:
            manifest = read_manifest(source)
            decoder_onnx = Path(source) / manifest["model_file"]
            _stage_onnx_model(stage, names[0], decoder_onnx, max_batch_size=max_batch_size, instances=instances,
                              kind=kind, dynamic_batching=dynamic_batching)
            version = stage / name / VERSION
            version.mkdir(parents=True)
            shutil.copyfile(GENERATE_TEMPLATE, version / PYTHON_FILE)
            (version / "decoder.json").write_text(json.dumps(_decoder_description(decoder_onnx, manifest),
                                                             indent=2) + "\n")
            shutil.copyfile(Path(source) / MANIFEST, version / MANIFEST)
            for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "generation_config.json"):
                if (Path(source) / extra).is_file():
                    shutil.copyfile(Path(source) / extra, version / extra)
            (stage / name / "config.pbtxt").write_text(to_text(generate_config(name, names[0], instances)))
        else:
            onnx_path = _resolve_onnx(source, overrides, work)
            _stage_onnx_model(stage, name, onnx_path, max_batch_size=max_batch_size, instances=instances,
                              kind=kind, dynamic_batching=dynamic_batching)
        shutil.rmtree(work)
        for n in names:
            checked_with = check_model_dir(stage / n, expected_name=n)
        for n in names:                         # the decoder first: the loop never names a missing model
            os.replace(stage / n, repo / n)
            moved.append(repo / n)
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        for path in created:                    # deepest first; only what this call made, and only if empty
            try:
                path.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return {"models": names, "checked_with": checked_with}
