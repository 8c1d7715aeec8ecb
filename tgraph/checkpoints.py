"""Hugging Face checkpoint directories -> DSL modules with real weights.

A checkpoint directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Each model family registers an `HFAdapter` for the
`model_type`s it implements: how the HF config maps to the family's dataclass (refusing
options we do not implement, by name), and a weight map from our parameter names to HF
tensor names plus a transform (transpose, split of a fused QKV ...).

Loading is strict: a missing, unexpected or mis-shaped tensor, or a corrupt file, is a
`CheckpointError` naming it. Pickle checkpoints are refused: unpickling runs code.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import CheckpointError, ConfigError
from .weight_checks import NonFiniteWeights, check_weight_dtype
from .ir.lazy import LazyTensor, contiguous, is_lazy

# our parameter name -> (HF tensor names, transform(*arrays) -> array). The arrays are lazy
# (`tgraph.ir.lazy`): a transform may slice, transpose and reshape them, and `contiguous`
# stands for np.ascontiguousarray.
WeightRule = Tuple[Tuple[str, ...], Callable[..., np.ndarray]]


def same(x: np.ndarray) -> np.ndarray:
    return x


def transposed(x: np.ndarray) -> np.ndarray:
    """PyTorch Linear stores [out, in]; our Linear is [in, out]."""
    return contiguous(x.T)


def rule(*hf_names: str, fn: Callable[..., np.ndarray] = same) -> WeightRule:
    return tuple(hf_names), fn


def linear(hf_prefix: str, ours: str, bias: bool = True, weights: Optional[Dict[str, WeightRule]] = None
           ) -> Dict[str, WeightRule]:
    """The usual torch.nn.Linear pair: `<hf>.weight` (transposed) and `<hf>.bias`."""
    out = weights if weights is not None else {}
    out[f"{ours}.weight"] = rule(f"{hf_prefix}.weight", fn=transposed)
    if bias:
        out[f"{ours}.bias"] = rule(f"{hf_prefix}.bias")
    return out


@dataclass
class HFAdapter:
    """How one family reads Hugging Face checkpoints."""

    family: str
    model_types: Sequence[str]
    config_from_hf: Callable[[Dict[str, Any]], Any]        # HF config dict -> family config (ConfigError if unsupported)
    weight_map: Callable[[Any], Dict[str, WeightRule]]      # family config -> {our name: rule}
    ignore: Sequence[str] = ()                              # regexes of HF tensors that carry no weights (buffers)
    accepts: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None  # extra check: None or a refusal reason
    base_prefixes: Sequence[str] = ()                       # where head models nest the base model ("transformer.")
    renames: Sequence[Tuple[str, str]] = ()                 # (regex, replacement) for legacy tensor names
    # (config, SafetensorsWeights) -> config: choices only the stored tensors reveal (T5: a saved
    # lm_head.weight means an untied head, whatever transformers>=5 wrote in config.json)
    refine: Optional[Callable[[Any, "SafetensorsWeights"], Any]] = None


HF_ADAPTERS: Dict[str, HFAdapter] = {}


def register_adapter(adapter: HFAdapter) -> HFAdapter:
    for t in adapter.model_types:
        HF_ADAPTERS[t] = adapter
    return adapter


def hf_get(hf: Mapping[str, Any], key: str, default: Any = None, *alts: str) -> Any:
    for k in (key,) + alts:
        if k in hf and hf[k] is not None:
            return hf[k]
    return default


def refuse_if(hf: Mapping[str, Any], key: str, allowed: Iterable[Any], model_type: str) -> None:
    """ConfigError when `hf[key]` is set to something we do not implement."""
    value = hf.get(key)
    if value is not None and value not in list(allowed):
        raise ConfigError(f"{model_type}: config option {key}={value!r} is not supported "
                          f"(supported: {', '.join(repr(a) for a in allowed)})")


# ---------------------------------------------------------------- files
def checkpoint_file(directory: Path, name: str) -> Path:
    """`directory / name`, refused (CheckpointError) if it resolves outside the directory.

    A symlink in a checkpoint directory could otherwise make tgraph read, and echo parts of, any
    file the user can read (model.safetensors -> /etc/passwd). The one exception is the Hugging
    Face cache's own layout, where `snapshots/<rev>/<file>` links to `../../blobs/<hash>`.
    """
    path = directory / name
    root = directory.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target == a or a in target.parents for a in allowed):
        raise CheckpointError(f"{path}: resolves to {target}, outside the checkpoint directory; "
                              "refusing to follow the link")
    return path


def read_json_file(path: Path) -> Any:
    """A JSON file's value; CheckpointError naming the file for malformed or absurdly nested JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to read") from None


def read_config(directory: Path) -> Dict[str, Any]:
    path = checkpoint_file(directory, "config.json")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    config = read_json_file(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def read_index(index: Path) -> Dict[str, str]:
    """model.safetensors.index.json's `weight_map`: {tensor name: shard file name}, both strings."""
    data = read_json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must be a JSON object "
                              f"of tensor name -> shard file, got {type(weight_map).__name__})")
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name, got {fname!r}")
    return weight_map


class SafetensorsWeights:
    """Lazy, name-indexed access to one or more safetensors files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: Dict[str, Path] = {}          # tensor name -> file
        single = checkpoint_file(directory, "model.safetensors")
        index = checkpoint_file(directory, "model.safetensors.index.json")
        if index.is_file():
            weight_map = read_index(index)
            for name, fname in weight_map.items():
                if os.sep in fname or "/" in fname or fname.startswith("."):
                    raise CheckpointError(f"{index}: shard name {fname!r} points outside the directory")
                self.files[name] = checkpoint_file(directory, fname)
        elif single.is_file():
            for name in self._keys(single):
                self.files[name] = single
        else:
            pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")] \
                + [p.name for p in directory.glob("*.pth")]
            if pickles:
                raise CheckpointError(
                    f"{directory / pickles[0]}: pickle checkpoints are refused because unpickling runs arbitrary code; "
                    "convert it once in a trusted environment: "
                    "transformers.AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self._handles: Dict[Path, Any] = {}
        self.stored: Dict[str, str] = {}          # name after strip_prefixes -> name in the file

    def strip_prefixes(self, prefixes: Sequence[str]) -> None:
        """Head-model checkpoints (GPT2LMHeadModel, BertForMaskedLM ...) nest the base model under a
        prefix; renaming `transformer.h.0...` to `h.0...` lets one weight map read both kinds."""
        files: Dict[str, Path] = {}
        stored: Dict[str, str] = {}
        for name, path in self.files.items():
            short = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
            if short in files:
                raise CheckpointError(f"{self.directory}: tensors {stored[short]!r} and {name!r} are the same "
                                      "weight with and without the base-model prefix")
            files[short], stored[short] = path, name
        self.files, self.stored = files, stored

    def rename(self, renames: Sequence[Tuple[str, str]]) -> None:
        """Legacy spellings -> current ones (TF-era BERT checkpoints say `LayerNorm.gamma`/`beta`
        for `weight`/`bias`), so one weight map reads both; messages keep the stored name."""
        if not renames:
            return
        patterns = [(re.compile(p), r) for p, r in renames]
        files: Dict[str, Path] = {}
        stored: Dict[str, str] = {}
        for name, path in self.files.items():
            new = name
            for pattern, replacement in patterns:
                new = pattern.sub(replacement, new)
            original = self.original(name)
            if new in files:
                raise CheckpointError(f"{self.directory}: tensors {stored[new]!r} and {original!r} are the same "
                                      "weight under a legacy and a current name")
            files[new], stored[new] = path, original
        self.files, self.stored = files, stored

    def original(self, name: str) -> str:
        """The tensor's name as stored in the file (for messages)."""
        return self.stored.get(name, name)

    @staticmethod
    def _keys(path: Path) -> List[str]:
        try:
            return list(_MappedSafetensors(path).entries)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None

    def names(self) -> List[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> "LazyTensor":
        """The tensor as a lazy, memory-mapped view of its file: nothing is read until it is used."""
        path = self.files[name]
        if not path.is_file():
            raise CheckpointError(f"{path}: shard file is missing (listed for tensor {name!r})")
        stored = self.original(name)
        try:
            if path not in self._handles:
                self._handles[path] = _MappedSafetensors(path)
            return self._handles[path].tensor(stored)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {stored!r} ({e})") from None


# safetensors dtype names -> NumPy (bfloat16 and float8 through ml_dtypes, as safetensors.numpy does)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
              "BOOL": "bool", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _numpy_dtype(name: str) -> np.dtype:
    if name not in _ST_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    np_name = _ST_DTYPES[name]
    if np_name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        dtype = np.dtype(getattr(ml_dtypes, np_name))
    else:
        dtype = np.dtype(np_name)
    return dtype if sys.byteorder == "little" else dtype.newbyteorder("<")     # the file is little-endian


class _MappedSafetensors:
    """One safetensors file's header: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw bytes, which the tensors must cover
    exactly (checked as the safetensors library does). Only the header is read; `tensor` is a
    lazy, memory-mapped view, so no address space is taken for the whole file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self.data_start = 8 + n
        self.entries: Dict[str, Tuple[np.dtype, List[int], int, int]] = {}
        for name, entry in header.items():
            if name != "__metadata__":
                self.entries[name] = self._entry(name, entry)
        end = 0
        for _, _, begin, stop in sorted(self.entries.values(), key=lambda e: (e[2], e[3])):
            if begin != end:
                raise ValueError(f"tensor data {'overlaps' if begin < end else 'has a gap'} at byte {end}")
            end = stop
        if self.data_start + end != size:
            raise ValueError(f"the tensors end at byte {self.data_start + end} but the file has {size} bytes")

    @staticmethod
    def _entry(name: str, entry) -> Tuple[np.dtype, List[int], int, int]:
        if not isinstance(entry, dict):
            raise ValueError(f"tensor {name!r}: header entry is not an object")
        dtype = _numpy_dtype(entry.get("dtype"))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not hold {entry.get('dtype')}{shape}")
        return dtype, shape, begin, end

    def tensor(self, name: str):
        from .ir.lazy import MappedRegion

        if name not in self.entries:
            raise ValueError("not in the header")
        dtype, shape, begin, _ = self.entries[name]
        return MappedRegion(self.path, self.data_start + begin, shape, dtype, label=f"{self.path.name}:{name}")


def convert_weights(source: SafetensorsWeights, rules: Mapping[str, WeightRule], ignore: Sequence[str],
                    label: str) -> Dict[str, np.ndarray]:
    """Apply the weight map strictly; every HF tensor must be used or explicitly ignorable."""
    missing = sorted({h for hf_names, _ in rules.values() for h in hf_names if h not in source})
    if missing:
        raise CheckpointError(f"{label}: missing tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    used = {h for hf_names, _ in rules.values() for h in hf_names}
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(n for n in source.names() if n not in used and not any(p.fullmatch(n) for p in patterns))
    if unexpected:
        raise CheckpointError(f"{label}: unexpected tensor {source.original(unexpected[0])!r}" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                              " - the checkpoint does not match this architecture/config")
    out: Dict[str, np.ndarray] = {}
    items = list(rules.items())
    from .progress import phase

    nonfinite = NonFiniteWeights()
    with phase("load weights", total=len(items), unit="tensor") as bar:      # drawn past a second
        for ours, (hf_names, fn) in items:
            arrays = [source.get(h) for h in hf_names]
            for h, array in zip(hf_names, arrays):
                check_weight_dtype(array, source.original(h), label)
                nonfinite.count(array, source.original(h))
            try:
                converted = fn(*arrays)         # lazy: a view of the file plus transposes/slices, read at export
                out[ours] = converted if is_lazy(converted) else np.asarray(converted)
            except (ValueError, IndexError) as e:
                raise CheckpointError(f"{label}: tensor {source.original(hf_names[0])!r} has an unexpected shape "
                                      f"{tuple(arrays[0].shape)} for {ours} ({e})") from None
            bar.update(1)
    nonfinite.warn(label)
    return out
