"""Would Triton load this model directory? Its documented rules, checked before the server sees it.

The Triton server cannot run everywhere tgraph does, so the repository is checked here
against the rules Triton applies when it loads a model (server docs: model_repository.md,
model_configuration.md; the onnxruntime backend's README):

- config.pbtxt parses as `inference.ModelConfig` with Triton's own `model_config_pb2`
  (from `tritonclient`, `tgraph[triton]`) and protobuf's `text_format`, so an unknown
  field or a bad enum fails (without tritonclient nothing is checked, and that is said);
- the config's `name` is the directory's name; the model is `onnxruntime_onnx` (or backend
  `onnxruntime`) or backend `python`;
- versions are directories with integer names, each holding the default file
  (`default_model_filename`, else model.onnx / model.py), and an ONNX model's external
  data files beside it;
- inputs and outputs: unique names, a valid data type, dims of -1 or positive; for ONNX the
  config's inputs are exactly the graph's inputs, its outputs graph outputs, each with the
  graph's type and dims (-1 exactly where the graph's dim is dynamic); with
  max_batch_size > 0 every graph tensor's first dim is dynamic and left out of `dims`;
- dynamic batching needs max_batch_size > 0 and preferred sizes in 1..max_batch_size;
  instance groups have count >= 1 and a CPU group names no GPUs.

Any break is one ConfigError line naming the file and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import onnx

from ..errors import ConfigError
from .onnx_signature import external_files, onnx_signature

TRITON_DATA_TYPES = ("TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
                     "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64",
                     "TYPE_STRING", "TYPE_BF16")
DEFAULT_FILES = {"onnx": "model.onnx", "python": "model.py"}


NOT_CHECKED = "not checked: tritonclient is not installed (pip install 'tgraph[triton]')"


def model_config_pb2():
    """Triton's `model_config_pb2` (generated from its model_config.proto) as tritonclient ships
    it, or None without tritonclient. Read from its file when `tritonclient.grpc` cannot be
    imported (that package needs grpcio; the protobuf module alone does not)."""
    import importlib.util
    import sys

    try:
        from tritonclient.grpc import model_config_pb2 as module
        return module
    except (ImportError, RuntimeError):      # RuntimeError: tritonclient without grpcio
        pass
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module                  # one registration of model_config.proto per process
    return module


def _parse(path: Path):
    """The config parsed by Triton's own model_config_pb2 (protobuf text_format), or None
    when tritonclient is not installed."""
    from google.protobuf import text_format          # protobuf comes with onnx

    pb2 = model_config_pb2()
    if pb2 is None:
        return None
    try:
        return text_format.Parse(path.read_text(), pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: not a valid Triton ModelConfig ({e})") from None


def _enum_name(message, field: str) -> str:
    value = getattr(message, field)
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


def _tensors(config, kind: str, path: Path) -> List[Dict[str, Any]]:
    out, seen = [], set()
    for t in getattr(config, kind):
        dtype = _enum_name(t, "data_type")
        if not t.name:
            raise ConfigError(f"{path}: an {kind} has no name")
        if t.name in seen:
            raise ConfigError(f"{path}: {kind} {t.name!r} is listed twice")
        seen.add(t.name)
        if dtype not in TRITON_DATA_TYPES:
            raise ConfigError(f"{path}: {kind} {t.name!r} has data_type {dtype}, not a Triton data type")
        dims = [int(d) for d in t.dims]
        if not dims or any(d < -1 or d == 0 for d in dims):
            raise ConfigError(f"{path}: {kind} {t.name!r} has dims {dims} (each dim is -1 or positive, at least one)")
        shape = [int(d) for d in t.reshape.shape] if t.HasField("reshape") else None
        out.append({"name": t.name, "data_type": dtype, "dims": dims, "reshape": shape,
                    "optional": bool(getattr(t, "optional", False))})
    return out


def _check_scheduling(config, path: Path) -> None:
    mbs = int(config.max_batch_size)
    if mbs < 0:
        raise ConfigError(f"{path}: max_batch_size {mbs} < 0")
    if config.HasField("dynamic_batching"):
        if mbs == 0:
            raise ConfigError(f"{path}: dynamic_batching needs max_batch_size > 0")
        bad = [int(s) for s in config.dynamic_batching.preferred_batch_size if not 1 <= int(s) <= mbs]
        if bad:
            raise ConfigError(f"{path}: dynamic_batching.preferred_batch_size {bad} outside 1..{mbs}")
    for group in config.instance_group:
        kind = _enum_name(group, "kind")
        if int(group.count) < 1:
            raise ConfigError(f"{path}: instance_group count {group.count} < 1")
        if kind == "KIND_CPU" and list(group.gpus):
            raise ConfigError(f"{path}: a KIND_CPU instance_group names gpus {list(group.gpus)}")


def _expected_dims(sig, batched: bool, where: str) -> List[int]:
    if batched:
        if not sig.dims or sig.dims[0] != -1:
            raise ConfigError(f"{where}: max_batch_size > 0 but the graph's {sig.name!r} has first dim "
                              f"{sig.dims[0] if sig.dims else 'none (a scalar)'}, not a dynamic batch axis")
        return list(sig.dims[1:])
    return list(sig.dims)


def _check_onnx_tensors(config_tensors, graph_tensors, kind: str, batched: bool, path: Path, model_file: Path):
    graph = {t.name: t for t in graph_tensors}
    listed = {t["name"] for t in config_tensors}
    if kind == "input":
        missing = [n for n in graph if n not in listed]
        if missing:
            raise ConfigError(f"{path}: the graph's input {missing[0]!r} is not in the config "
                              f"(the onnxruntime backend needs every input)")
    for t in config_tensors:
        if t["name"] not in graph:
            raise ConfigError(f"{path}: {kind} {t['name']!r} is not a {kind} of {model_file} "
                              f"(it has {', '.join(graph) or 'none'})")
        sig = graph[t["name"]]
        if t["data_type"] != sig.data_type:
            raise ConfigError(f"{path}: {kind} {t['name']!r} has data_type {t['data_type']}, the graph's is "
                              f"{sig.data_type}")
        want = _expected_dims(sig, batched, f"{path}: {kind} {t['name']!r}")
        have = t["reshape"] if t["reshape"] is not None else t["dims"]
        if t["reshape"] is not None and t["dims"] != [1] and t["reshape"] == []:
            raise ConfigError(f"{path}: {kind} {t['name']!r} reshapes dims {t['dims']} to a scalar")
        if have != want:
            raise ConfigError(f"{path}: {kind} {t['name']!r} has dims {have}, the graph's are {want} "
                              f"(-1 where dynamic{', batch axis left out' if batched else ''})")


def check_model_dir(model_dir, expected_name: Optional[str] = None) -> str:
    """Check one model directory of a repository; returns how config.pbtxt was parsed."""
    model_dir = Path(model_dir)
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.pbtxt")
    config = _parse(path)
    if config is None:
        return NOT_CHECKED
    want_name = expected_name or model_dir.name
    if config.name != want_name:
        raise ConfigError(f"{path}: name {config.name!r} is not the model directory's name {want_name!r}")
    platform, backend = config.platform, config.backend
    if platform == "onnxruntime_onnx" or (not platform and backend == "onnxruntime"):
        kind = "onnx"
    elif backend == "python" and not platform:
        kind = "python"
    else:
        raise ConfigError(f"{path}: platform {platform!r} / backend {backend!r}; tgraph writes onnxruntime_onnx "
                          "and python models only")
    _check_scheduling(config, path)
    inputs, outputs = _tensors(config, "input", path), _tensors(config, "output", path)
    if not outputs:
        raise ConfigError(f"{path}: no outputs")
    versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ConfigError(f"{model_dir}: no version directory (an integer name such as 1/)")
    filename = config.default_model_filename or DEFAULT_FILES[kind]
    for version in versions:
        model_file = version / filename
        if not model_file.is_file():
            raise ConfigError(f"{version}: no {filename} (the {kind} model file Triton loads)")
        if kind == "onnx":
            model = onnx.load(str(model_file), load_external_data=False)

            for extra in external_files(model, str(model_file)):
                if not (version / extra).is_file():
                    raise ConfigError(f"{model_file}: its external data file {extra} is missing")
            graph_in, graph_out = onnx_signature(model, str(model_file))
            batched = int(config.max_batch_size) > 0
            _check_onnx_tensors(inputs, graph_in, "input", batched, path, model_file)
            _check_onnx_tensors(outputs, graph_out, "output", batched, path, model_file)
    return "model_config_pb2"


def check_repository(repo) -> Dict[str, str]:
    """Check every model directory under `repo`; returns {model: how its config was parsed}."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ConfigError(f"{repo}: not a directory")
    models = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise ConfigError(f"{repo}: no model directories")
    return {m.name: check_model_dir(m) for m in models}


