"""The subcommands that describe rather than build: what is there and how to ask for it.

    tgraph models [--json]          the model families, their config class and HF model types
    tgraph config MODEL [--json]    every --set key of MODEL: type, default, meaning
    tgraph passes [--json]          what each -O level runs, in order, and every pass
    tgraph doctor [--json]          versions, the onnxruntime wheel, providers, what stops CUDA

Everything printed is read from the registries and dataclasses it describes (models,
config fields and their comments, passes and the level table), never from a copy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict, List

from .errors import ConfigError


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the model families and the Hugging Face model types they read")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("config", help="every --set key of a model: type, default and meaning")
    p.add_argument("model", metavar="MODEL", help="registered name or checkpoint dir (then its values are shown)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_config)

    p = sub.add_parser("passes", help="what each -O level runs, in order, and every pass with its options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_passes)

    p = sub.add_parser("doctor", help="versions, onnxruntime wheel and providers, what stops CUDA, GPU visibility")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_doctor)


class VersionAction(argparse.Action):
    """`--version`: the line is made when asked for, not each time the parser is built."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the versions of tgraph, onnx and onnxruntime, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """``tgraph 0.1.0 (onnx 1.23.2, onnxruntime-gpu 1.31.1, python 3.11.7)``: no import of either."""
    import platform

    from . import __version__
    from .doctor import onnxruntime_wheels, version_of

    wheels = ", ".join(f"{w['name']} {w['version']}" for w in onnxruntime_wheels()) or "no onnxruntime"
    return f"tgraph {__version__} (onnx {version_of('onnx') or 'missing'}, {wheels}, python {platform.python_version()})"


def cli_value(value: Any) -> str:
    """A config value as `--set` spells it: true/false, none, strings unquoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return str(value)


def _print_json(data) -> int:
    print(json.dumps(data, indent=2, default=str))
    return 0


def _summary(obj) -> str:
    """The first line of the docstring of the module that defines `obj`."""
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    doc = (getattr(module, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


# ---------------------------------------------------------------- models
def model_table() -> List[Dict[str, Any]]:
    from .checkpoints import HF_ADAPTERS
    from .models import MODELS

    rows = []
    for name, family in sorted(MODELS.items()):
        types = sorted(t for t, a in HF_ADAPTERS.items() if a.family == name)
        rows.append({"name": name, "config": family.config_cls.__name__, "hf_model_types": types,
                     "about": _summary(family.build)})
    return rows


def cmd_models(args) -> int:
    rows = model_table()
    if args.json:
        return _print_json(rows)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        types = ", ".join(r["hf_model_types"]) or "-"
        print(f"{r['name']:<{width}}  {r['about']}")
        print(f"{'':<{width}}  config {r['config']}; Hugging Face model_type: {types}")
    print("\n`tgraph config MODEL` lists a model's --set keys; a checkpoint directory of one of these "
          "model types is a MODEL too.")
    return 0


# ---------------------------------------------------------------- config
def _config_of(model: str):
    """(label, config class, {key: value shown as default})."""
    import os
    from pathlib import Path

    from .models import get_family

    if os.path.isdir(model):
        from .checkpoints import read_config
        from .sources import adapter_for

        directory = Path(model)
        hf = read_config(directory)
        adapter = adapter_for(hf, directory)
        try:
            config = adapter.config_from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{directory / 'config.json'}: {e}") from None
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return f"{model} ({adapter.family}, from config.json)", type(config), values
    if model.endswith(".py") or ":" in model:
        raise ConfigError(f"{model}: a file.py:factory model takes its factory's keyword arguments, "
                          "which tgraph cannot list; `tgraph config` takes a registered name or checkpoint dir")
    family = get_family(model)
    return model, family.config_cls, None


def cmd_config(args) -> int:
    from .models.config_docs import config_keys

    label, config_cls, values = _config_of(args.model)
    keys = config_keys(config_cls)
    rows = [{"key": k.name, "type": k.type,
             "default": cli_value(values[k.name] if values is not None else k.default), "meaning": k.meaning}
            for k in keys]
    if args.json:
        return _print_json(rows)
    column = "value" if values is not None else "default"
    widths = [max(len(h), *(len(r[c]) for r in rows)) for h, c in (("key", "key"), ("type", "type"),
                                                                     (column, "default"))]
    print(f"{label}: {config_cls.__name__}; override with --set KEY=VALUE (repeatable)")
    print(f"  {'key':<{widths[0]}}  {'type':<{widths[1]}}  {column:<{widths[2]}}  meaning")
    for r in rows:
        print(f"  {r['key']:<{widths[0]}}  {r['type']:<{widths[1]}}  {r['default']:<{widths[2]}}  {r['meaning']}")
    return 0


# ---------------------------------------------------------------- passes
def pass_rows() -> List[Dict[str, Any]]:
    from .passes import PASSES, describe_passes, levels_of

    about = describe_passes()
    rows = []
    for name, cls in sorted(PASSES.items()):
        options = {f.name.replace("_", "-"): cli_value(f.default) for f in dataclasses.fields(cls)
                   if f.init and f.default is not dataclasses.MISSING}
        rows.append({"name": name, "levels": levels_of(name), "options": options, "about": about[name]})
    return rows


def cmd_passes(args) -> int:
    from .passes import DEFAULT_LEVEL, LEVELS

    rows = pass_rows()
    if args.json:
        return _print_json({"levels": {f"O{k}": v for k, v in LEVELS.items()}, "default_level": DEFAULT_LEVEL,
                            "passes": rows})
    print(f"optimization levels (-O{DEFAULT_LEVEL} is the default), each pass in the order it runs:")
    for level, names in LEVELS.items():
        print(f"  -O{level}: {', '.join(names) or '(nothing: the graph as built)'}")
    print("\npasses (run any list with `tgraph optimize --pipeline a,b{option=value}`; "
          "`--print-ir-after-all` shows the IR after each):")
    width = max(len(r["name"]) for r in rows)
    wheres = {r["name"]: "[" + (" ".join(f"-O{k}" for k in r["levels"]) or "by name") + "]" for r in rows}
    column = max(map(len, wheres.values()))
    for r in rows:
        print(f"  {r['name']:<{width}}  {wheres[r['name']]:<{column}}  {r['about']}")
        if r["options"]:
            print(f"  {'':<{width}}  {'':<{column}}  options: {', '.join(f'{k}={v}' for k, v in r['options'].items())}")
    return 0


# ---------------------------------------------------------------- doctor
def doctor_lines(facts: Dict[str, Any]) -> List[str]:
    """The report of `tgraph doctor`, from `tgraph.doctor.collect()`'s facts."""
    lines = [f"tgraph {facts['tgraph']} (python {facts['python']}, {facts['platform']})",
             f"onnx {facts['onnx'] or 'not installed'}"]
    wheels = facts["onnxruntime_wheels"]
    wheel_text = ", ".join(f"{w['name']} {w['version']}" for w in wheels) or "none"
    lines.append(f"onnxruntime wheel: {wheel_text}")
    if len(wheels) > 1:
        lines.append("  problem: several wheels install the same `onnxruntime` package and overwrite each other; "
                     "uninstall all of them and install one (onnxruntime-gpu for CUDA)")
    if facts.get("onnxruntime_import_error"):
        lines.append(f"  problem: import onnxruntime fails: {facts['onnxruntime_import_error']}")
        return lines
    lines.append(f"onnxruntime {facts['onnxruntime']}: providers available: {', '.join(facts['providers'])}")
    gpu = facts["gpu"]
    seen = gpu["nvidia_smi"] or gpu["devices"]
    lines.append("GPU: " + (("; ".join(gpu["nvidia_smi"]) if gpu["nvidia_smi"] else ", ".join(gpu["devices"]))
                            if seen else "none visible (no /dev/nvidia* device, no nvidia-smi)")
                 + (f"; driver: {gpu['driver']}" if gpu["driver"] else ""))
    lines.extend(cuda_verdict(facts))
    return lines


def cuda_verdict(facts: Dict[str, Any]) -> List[str]:
    """Whether `--provider cuda` can work here and, if not, each thing that stops it."""
    cuda = facts["cuda"]
    if cuda is None:
        return ["CUDA: not possible with this wheel: CUDAExecutionProvider is not among onnxruntime's providers "
                "(install onnxruntime-gpu instead of onnxruntime)"]
    stops = []
    if cuda["missing"]:
        names = [f"{n} (the NVIDIA driver's)" if n.startswith("libcuda.so") else n for n in cuda["missing"]]
        stops.append(f"the CUDA provider library needs {len(names)} libraries that are not found: "
                     f"{', '.join(names)}")
    elif cuda["load_error"]:
        stops.append(f"the CUDA provider library fails to load: {cuda['load_error']}")
    gpu = facts["gpu"]
    if not (gpu["devices"] or gpu["nvidia_smi"]):
        stops.append("no NVIDIA GPU is visible")
    if not stops:
        return ["CUDA: should work (--provider cuda; `generate`/`run` name the provider they used)"]
    return ["CUDA: not usable here; `--provider auto` runs on the CPU:"] + [f"  - {s}" for s in stops]


def cmd_doctor(args) -> int:
    from .doctor import collect

    facts = collect()
    if args.json:
        return _print_json(facts)
    print("\n".join(doctor_lines(facts)))
    return 0
