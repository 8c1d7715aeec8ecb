"""The `tgraph` command line.

    tgraph export MODEL -o OUT.onnx [-O N] [--opset N] [--set k=v ...] [--seed N]
    tgraph codegen numpy MODEL -o OUT.py [same model options]
    tgraph run MODEL_OR_ONNX [--check] [--text T ... [--pool mean|cls] [--normalize]] [--output OUT.npz] [--json]
    tgraph inspect MODEL_OR_ONNX [--json]
    tgraph optimize IN.onnx -o OUT.onnx [-O N | --pipeline P] [--report]
    tgraph generate MODEL (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N] [--json] [--stream]
    tgraph models | config MODEL | passes | doctor          (tgraph.cli_info)

Every user mistake is one line on stderr and a non-zero exit; `--debug` (anywhere on the
line, like `--verbose`, `--quiet` and `--print-ir-after-all`) shows the traceback. Writers
are atomic, so a failed command leaves no file behind.

A subcommand lives in its own module when it is more than a few lines: the module has
`add_parsers(sub)`, and each parser it adds names its handler with
``p.set_defaults(handler=cmd_x)``; `build_parser` calls it (see SUBCOMMAND_MODULES).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

from . import cli_generate, cli_info, cli_serve, cli_view
from .cli_args import TgraphParser, add_global_flags_everywhere, provider_text
from .cli_args import check_dims as _check_dims, level_of as _level, parse_dims as _parse_dims
from .cli_args import parse_sets as _parse_sets
from .errors import ConfigError, InputError, TgraphError
from .interrupts import Terminated, raise_terminated as _raise_terminated

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3




def _check_seeds(args) -> None:
    for flag in ("seed", "init_seed"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a non-negative int, got {value}")


def _add_model_options(p: argparse.ArgumentParser, output: bool = True) -> None:
    p.add_argument("model", metavar="MODEL", help="registered name, path/to/file.py:factory, or checkpoint dir")
    if output:
        p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument("-O", dest="level", type=int, choices=[0, 1, 2, 3], default=None,
                   help="optimization level (0 = as built; default 2)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="override a config key (`tgraph config MODEL` lists them)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weight initialisation")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights and compute dtype (float16/bfloat16 keep norms, softmax and reductions in float32)")


#: Modules that add their own subcommands (see the module docstring).
SUBCOMMAND_MODULES = (cli_generate, cli_info, cli_view, cli_serve)


def build_parser() -> argparse.ArgumentParser:
    from .quantize_report import add_quantize_options

    parser = TgraphParser(prog="tgraph", description="Build, optimise and export Transformer graphs.",
                          epilog="`tgraph models` lists the models, `tgraph config MODEL` their --set keys, "
                                 "`tgraph passes` the -O levels, `tgraph doctor` the installation.")
    parser.add_argument("--version", action=cli_info.VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a model to ONNX")
    _add_model_options(p)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23)")
    p.add_argument("--external-data", action="store_true", help="store weights in OUT.onnx.data")
    p.add_argument("--report", action="store_true", help="print what each pass changed")
    p.add_argument("--task", choices=["graph", "generate"], default="graph",
                   help="generate: write a generation directory (-o DIR; see tgraph.export_dir)")
    p.add_argument("--max-length", type=int, default=None,
                   help="--task generate: KV-cache capacity in positions (default: the model's, capped at 4096)")
    p.add_argument("--target", choices=["cpu", "cuda"], default=None, help="--task generate: the provider to tune for "
                   "(default cpu)")
    add_quantize_options(p)

    p = sub.add_parser("codegen", help="generate code for a backend")
    p.add_argument("backend", choices=["numpy"])
    _add_model_options(p)
    add_quantize_options(p)

    from .cli_run import add_parser as add_run_parser

    add_run_parser(sub, _add_model_options)

    p = sub.add_parser("optimize", help="import an ONNX file, run the passes, write the result")
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("-o", "--output", required=True, help="file to write (.onnx)")
    p.add_argument("-O", dest="level", type=int, choices=[0, 1, 2, 3], default=None,
                   help="optimization level (default 2)")
    p.add_argument("--pipeline", default=None, help="explicit pass pipeline, e.g. dce,fuse-attention")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset to write (default 23)")
    p.add_argument("--report", action="store_true", help="what each pass did, and why rules did not fire")
    add_quantize_options(p)

    p = sub.add_parser("inspect", help="inputs, outputs, op histogram, parameter count")
    _add_model_options(p, output=False)
    p.add_argument("--json", action="store_true")

    for module in SUBCOMMAND_MODULES:
        module.add_parsers(sub)
    add_global_flags_everywhere(parser)
    return parser


# ---------------------------------------------------------------- commands


def cmd_export(args) -> int:
    from .api import export_onnx

    _check_task_options(args)
    if args.task == "generate":
        return _export_generation_dir(args)
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise ConfigError(f"output file must end in .onnx: {out}")
    from .quantize_report import cmd_export_quantized, options_from_args

    if options_from_args(args) is not None:         # also checks the quantization flags
        return cmd_export_quantized(args, _parse_sets(args.sets), _level(args))
    start = time.perf_counter()
    report = export_onnx(args.model, out, overrides=_parse_sets(args.sets), seed=args.seed, level=_level(args),
                         opset=args.opset, external_data=True if args.external_data else None,
                         dtype=args.dtype).report     # the graph is dropped before the file is read back
    took = time.perf_counter() - start
    nodes, params = _written_counts(out)
    print(f"wrote {out} ({params:,} parameters, {nodes} nodes, -O{_level(args)}, {took:.2f}s)")
    if args.report and report is not None:
        print(report)
        print(_fusions_line(report.fusions()))
    if args.report:
        print(_phases_line())
    return 0


def _phases_line() -> str:
    from .progress import timings_line

    return timings_line()


def _written_counts(path: Path) -> tuple:
    """What `inspect` will say of the file just written (its nodes and initializers, not the IR's)."""
    import onnx

    return onnx_counts(onnx.load(str(path), load_external_data=False))


def _check_task_options(args) -> None:
    """Options that belong to the other kind of export are refused, never silently ignored."""
    if args.task == "generate":
        for flag, given in (("--opset", args.opset is not None), ("--external-data", args.external_data)):
            if given:
                raise ConfigError(f"{flag} does not apply to --task generate (a generation directory is written "
                                  "at the default opset, with its weights in model.onnx.data)")
    else:
        for flag, given in (("--max-length", args.max_length is not None), ("--target", args.target is not None)):
            if given:
                raise ConfigError(f"{flag} needs --task generate")


def _export_generation_dir(args) -> int:
    from .export_dir import export_generation_dir
    from .quantize_report import options_from_args

    start = time.perf_counter()
    manifest = export_generation_dir(args.model, args.output, overrides=_parse_sets(args.sets), seed=args.seed,
                                     level=3 if args.level is None else args.level, dtype=args.dtype,
                                     target=args.target or "cpu", max_length=args.max_length,
                                     quantize=options_from_args(args))
    print(f"wrote generation directory {args.output} ({manifest['family']}, max_length {manifest['max_length']}, "
          f"{manifest['dtype']}, target {manifest['target']}"
          + (f", {manifest['quantization']['scheme']}" if manifest["quantization"] else "")
          + f", {time.perf_counter() - start:.2f}s)")
    if args.report:
        print(_phases_line())
    return 0


def _fusions_line(fusions: Dict[str, int]) -> str:
    return "fusions: " + (" ".join(f"{k}={v}" for k, v in fusions.items()) or "none")


def cmd_codegen(args) -> int:
    from .api import export_numpy

    out = Path(args.output)
    if out.suffix != ".py":
        raise ConfigError(f"output file must end in .py: {out}")
    from .quantize_report import cmd_codegen_quantized, options_from_args

    if options_from_args(args) is not None:
        return cmd_codegen_quantized(args, _parse_sets(args.sets), _level(args))
    built = export_numpy(args.model, out, overrides=_parse_sets(args.sets), seed=args.seed, level=_level(args),
                         dtype=args.dtype)
    print(f"wrote {out} and {out.with_suffix('.npz')} ({len(built.graph.nodes)} nodes)")
    return 0


def cmd_run(args) -> int:
    from .cli_run import cmd_run as run_model

    return run_model(args)


def _inspect_onnx(path: str) -> Dict:
    import onnx

    from .onnx_import import read_onnx_proto

    model = read_onnx_proto(path, ConfigError)

    def sig(vi, kind):
        t = vi.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, ValueError):
            raise ConfigError(f"{path}: graph {kind} {vi.name!r} has unknown element type {t.elem_type}") from None
        return {"name": vi.name, "dtype": dtype, "shape": dims}

    hist: Dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        hist[key] = hist.get(key, 0) + 1
    nodes, count = onnx_counts(model)
    return {"source": path, "inputs": [sig(v, "input") for v in model.graph.input],
            "outputs": [sig(v, "output") for v in model.graph.output],
            "ops": dict(sorted(hist.items())), "nodes": nodes, "parameters": count,
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


def onnx_counts(model) -> tuple:
    """(nodes, parameters) of an ONNX model, as `export` and `inspect` both report them:
    top-level nodes, and the elements of every initializer."""
    import numpy as np

    return len(model.graph.node), sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)


def cmd_inspect(args) -> int:
    if args.model.endswith(".onnx"):
        info = _inspect_onnx(args.model)
    else:
        from .api import build

        built = build(args.model, _parse_sets(args.sets), seed=args.seed, level=_level(args), dtype=args.dtype)
        g = built.graph
        info = {"source": args.model, "level": _level(args),
                "inputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in g.inputs],
                "outputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in g.outputs],
                "ops": g.op_histogram(), "nodes": len(g.nodes),
                "parameters": g.parameter_count()}
        info["fusions"] = built.report.fusions() if built.report is not None else {}
        if built.report is not None:
            info["passes"] = built.report.counts()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['source']}: {info['nodes']} nodes, {info['parameters']:,} parameters")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for v in info[kind]:
            print(f"  {v['name']}: {v['dtype']}[{', '.join(str(d) for d in v['shape'])}]")
    print("ops:")
    for op, n in info["ops"].items():
        print(f"  {op:<28} {n}")
    if info.get("passes"):
        print("passes:")
        for name, changes in info["passes"].items():
            print(f"  {name:<28} {changes}")
    if "fusions" in info:
        print(_fusions_line(info["fusions"]))
    return 0


def cmd_optimize(args) -> int:
    from .codegen.onnx import DEFAULT_OPSET, save_onnx
    from .onnx_import import import_onnx
    from .passes import optimize

    out = Path(args.output)
    if out.suffix != ".onnx":
        raise ConfigError(f"output file must end in .onnx: {out}")
    if args.level is not None and args.pipeline is not None:
        raise ConfigError("give -O or --pipeline, not both")
    start = time.perf_counter()
    graph = import_onnx(args.input)
    before = len(graph.nodes)
    from .quantize_report import options_from_args, print_quantize_report, quantize_for_cli

    quantize = options_from_args(args)
    result = optimize(graph, level=args.level, pipeline=args.pipeline)
    if quantize is not None:
        reference, qresult = quantize_for_cli(graph, quantize)
    # an older model is written at the default opset; a newer one keeps its own (never rewritten as older)
    opset = args.opset if args.opset is not None else max(DEFAULT_OPSET, graph.meta.get("onnx_opset", 0))
    save_onnx(graph, out, opset=opset)
    took = time.perf_counter() - start
    print(f"wrote {out} ({before} -> {len(graph.nodes)} nodes, {took:.2f}s)")
    if quantize is not None:
        print_quantize_report(quantize, reference, graph, qresult, out, args.report)
    if args.report:
        print(result)
        print(_phases_line())
        fired = result.summary()
        print("fired: " + (", ".join(f"{p}: {c}" for p, c in fired.items()) or "nothing"))
        misses = result.near_misses()
        if misses:
            print("near misses (rules that did not fire):")
            for rule, lines in misses.items():
                for line in lines[:5]:
                    print(f"  {rule} {line}")
                if len(lines) > 5:
                    print(f"  {rule}: ... {len(lines) - 5} more")
    return 0


COMMANDS = {"export": cmd_export, "optimize": cmd_optimize, "codegen": cmd_codegen, "run": cmd_run, "inspect": cmd_inspect}




@contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM takes SIGINT's path: writers remove their temporaries."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:                       # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _ir_printing(args):
    """`--print-ir-after-all`: every pass pipeline the command runs prints its IR (to stderr)."""
    if not getattr(args, "print_ir_after_all", False):
        yield
        return
    from .passes import print_ir_after_all

    with print_ir_after_all(sys.stderr):
        yield


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"tgraph: warning: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):     # stdout without a file descriptor (captured)
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_seeds(args)
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        from . import progress

        # progress goes to stderr; --json output is JSON alone, so it shows none either
        quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
        with _sigterm_unwinds(), warnings.catch_warnings(), _ir_printing(args), progress.command(quiet=quiet):
            warnings.showwarning = _one_line_warning
            code = handler(args)
        sys.stdout.flush()             # a reader that left shows here, inside these handlers
        return code
    except BrokenPipeError:            # `tgraph inspect ... | head`: the reader left; stop quietly
        _silence_stdout()
        return 141                     # 128 + SIGPIPE, what a shell reports for a killed writer
    except TgraphError as e:
        if args.debug:
            raise
        print(f"tgraph: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        print("tgraph: terminated" if isinstance(e, Terminated) else "tgraph: interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except (MemoryError, RecursionError) as e:   # input too large or too deep for this machine
        if args.debug:
            raise
        what = "out of memory" if isinstance(e, MemoryError) else "input nested too deeply"
        print(f"tgraph: error: {what} ({type(e).__name__}: {str(e)[:200] or 'no details'})", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if args.debug:
            raise
        print(f"tgraph: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug in tgraph, still reported in one line
        if args.debug:
            raise
        print(f"tgraph: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
