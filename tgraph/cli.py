"""The `tgraph` command line.

    tgraph export MODEL -o OUT.onnx [-O N] [--opset N] [--set k=v ...] [--seed N]
    tgraph codegen numpy MODEL -o OUT.py [same model options]
    tgraph run MODEL_OR_ONNX [--backend ort|numpy] [--provider auto|cpu|cuda] [--check]
    tgraph inspect MODEL_OR_ONNX [--json]
    tgraph optimize IN.onnx -o OUT.onnx [-O N | --pipeline P] [--report]
    tgraph generate MODEL (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N] [--json] [--stream]

Every user mistake is one line on stderr and a non-zero exit; `--debug` shows the
traceback. Writers are atomic, so a failed command leaves no file behind.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ConfigError, InputError, TgraphError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3


# ---------------------------------------------------------------- argument parsing
def _parse_sets(items: Optional[List[str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _parse_dims(text: Optional[str]) -> Dict[str, int]:
    dims = {"batch": 1, "seq": 8, "decoder_seq": 8}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise ConfigError(f"--dims expects name=positive_int[,...], got {item!r}")
        dims[key.strip()] = int(value)
    return dims


def _given_dim_names(text: Optional[str]) -> List[str]:
    return [item.partition("=")[0].strip() for item in (text or "").split(",") if item.strip()]


def _check_dims(text: Optional[str], declared: List[tuple]) -> None:
    """Every dim named in --dims must be a symbolic dim of the model's inputs (else it would be ignored)."""
    known = sorted({d for shape in declared for d in (shape or ()) if isinstance(d, str)})
    unknown = [n for n in _given_dim_names(text) if n not in known]
    if unknown:
        raise ConfigError(f"--dims: the model has no dim {unknown[0]!r} (its inputs' dims are "
                          f"{', '.join(known) or 'all static'})")


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
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--seed", type=int, default=0, help="seed for random weight initialisation")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="weights and compute dtype (float16/bfloat16 keep norms, softmax and reductions in float32)")


def build_parser() -> argparse.ArgumentParser:
    from .quantize_report import add_quantize_options

    parser = argparse.ArgumentParser(prog="tgraph", description="Build, optimise and export Transformer graphs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX")
    _add_model_options(p)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23)")
    p.add_argument("--external-data", action="store_true", help="store weights in OUT.onnx.data")
    p.add_argument("--report", action="store_true", help="print what each pass changed")
    p.add_argument("--task", choices=["graph", "generate"], default="graph",
                   help="generate: write a generation directory (-o DIR; see tgraph.export_dir)")
    p.add_argument("--max-length", type=int, default=None, help="--task generate: KV-cache capacity in positions")
    p.add_argument("--target", choices=["cpu", "cuda"], default=None, help="--task generate: the provider to tune for "
                   "(default cpu)")
    add_quantize_options(p)

    p = sub.add_parser("codegen", help="generate code for a backend")
    p.add_argument("backend", choices=["numpy"])
    _add_model_options(p)
    add_quantize_options(p)

    p = sub.add_parser("run", help="run a model or an .onnx file on random (or given) inputs")
    _add_model_options(p, output=False)
    p.add_argument("--backend", choices=["ort", "numpy"], default="ort")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dims", default=None, help="symbolic dim sizes, e.g. batch=2,seq=16")
    p.add_argument("--inputs", default=None, help=".npz file with input arrays")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with the generated NumPy module")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs error allowed by --check")

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

    from .cli_generate import add_parser as add_generate_parser

    add_generate_parser(sub)
    from .cli_serve import add_parsers as add_serving_parsers   # deploy, serve

    add_serving_parsers(sub)
    return parser


# ---------------------------------------------------------------- commands
def _level(args) -> int:
    from .api import DEFAULT_LEVEL

    return DEFAULT_LEVEL if args.level is None else args.level


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
    return 0


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


def _load_inputs(path: str) -> Dict:
    import numpy as np

    if not os.path.isfile(path):
        raise ConfigError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read inputs file {path}: {e}") from None


def _summarise(outputs: Dict) -> List[str]:
    import numpy as np

    lines = []
    for name, array in outputs.items():
        a = np.asarray(array)
        floating = a.dtype.kind == "f" or a.dtype.name == "bfloat16"
        # accumulated in float64: an fp16 output's variance overflows fp16 (std inf)
        wide = a.astype(np.float64) if a.size and floating else None
        stats = f"mean {wide.mean():.6g} std {wide.std():.6g}" if wide is not None else ""
        lines.append(f"  {name}: {a.dtype}{list(a.shape)} {stats}".rstrip())
    return lines


def cmd_run(args) -> int:
    from .numerics import warn_nonfinite
    from .runtime import Session, make_random_inputs

    dims = _parse_dims(args.dims)
    is_onnx = args.model.endswith(".onnx")
    if is_onnx:
        if not os.path.isfile(args.model):
            raise ConfigError(f"ONNX file not found: {args.model}")
        if args.dtype != "float32":
            raise ConfigError("--dtype converts a model as it is built; an .onnx file runs in the dtype it was "
                              "exported with")
        if args.backend == "numpy" or args.check:
            raise ConfigError("--backend numpy and --check need a model (name, file.py:factory or checkpoint), "
                              "not an .onnx file")
        session = Session(args.model, providers=args.provider, threads=args.threads)
        _check_dims(args.dims, [tuple(i.shape or ()) for i in session.inputs])
        inputs = _load_inputs(args.inputs) if args.inputs else make_random_inputs(session, dims, seed=args.seed)
        start = time.perf_counter()
        outputs = session.run(inputs)
        took = time.perf_counter() - start
        print(f"ran {args.model} with onnxruntime on {', '.join(session.providers)} in {took * 1e3:.1f} ms")
        print("\n".join(_summarise(outputs)))
        warn_nonfinite(outputs, args.model)
        return 0

    from .api import build
    from .codegen.onnx import to_onnx

    built = build(args.model, _parse_sets(args.sets), seed=args.seed, level=_level(args), dtype=args.dtype)
    _check_dims(args.dims, [v.shape for v in built.graph.inputs])
    model_proto = to_onnx(built.graph)
    session = Session(model_proto, providers=args.provider, threads=args.threads) \
        if (args.backend == "ort" or args.check) else None
    inputs = _load_inputs(args.inputs) if args.inputs else make_random_inputs(
        session if session is not None else model_proto, dims, seed=args.seed, vocab_size=built.model.vocab_size)
    results = {}
    if session is not None:
        start = time.perf_counter()
        results["ort"] = session.run(inputs)
        print(f"onnxruntime ({', '.join(session.providers)}): {(time.perf_counter() - start) * 1e3:.1f} ms")
    if args.backend == "numpy" or args.check:
        from .codegen.numpy import load_numpy_module, write_numpy_module

        with tempfile.TemporaryDirectory(prefix="tgraph-") as tmp:
            path = write_numpy_module(built.graph, Path(tmp) / "model.py")
            module = load_numpy_module(path)
            start = time.perf_counter()
            try:
                results["numpy"] = module.run(inputs)
            except module.InputError as e:                 # a missing input, an id beyond the vocabulary...
                raise InputError(f"numpy backend: {e}") from None
            print(f"numpy backend: {(time.perf_counter() - start) * 1e3:.1f} ms")
    shown = results.get(args.backend) or next(iter(results.values()))
    print("\n".join(_summarise(shown)))
    warn_nonfinite(shown, f"{args.model} ({args.dtype})")
    if args.check:
        import numpy as np

        worst = 0.0
        for name, ref in results["ort"].items():
            got = results["numpy"][name]
            if np.shape(got) != np.shape(ref):
                raise TgraphError(f"--check: output {name} has shape {np.shape(got)} in NumPy, {np.shape(ref)} in ORT")
            diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)))) if np.size(ref) else 0.0
            worst = max(worst, diff)
            print(f"check {name}: max abs error onnxruntime vs numpy = {diff:.3e}")
        if not worst <= args.tolerance:
            print(f"tgraph: check FAILED: max abs error {worst:.3e} > {args.tolerance:g}", file=sys.stderr)
            return 1
        print(f"check passed (max abs error {worst:.3e} <= {args.tolerance:g})")
    return 0


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


def cmd_generate(args) -> int:
    from .cli_generate import cmd_generate as run_generate

    return run_generate(args)


COMMANDS = {"export": cmd_export, "optimize": cmd_optimize, "codegen": cmd_codegen, "run": cmd_run, "inspect": cmd_inspect,
            "generate": cmd_generate}
from .cli_serve import COMMANDS as SERVING_COMMANDS  # noqa: E402  (deploy, serve)

COMMANDS.update(SERVING_COMMANDS)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds (and cleans up) as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


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
        with _sigterm_unwinds(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            code = COMMANDS[args.command](args)
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
