"""`tgraph run MODEL_OR_ONNX ...`: one forward pass, and its results out of the CLI.

    tgraph run MODEL_OR_ONNX [--backend ort|numpy] [--provider auto|cpu|cuda] [--check]
               [--dims batch=2,seq=16 | --inputs FILE.npz | --text T [T ...] | --text-file F]
               [--tokenizer tokenizer.json] [--pool mean|cls [--normalize]] [--batch-size N]
               [--output OUT.npz] [--json] [--report]

Inputs are random (shaped by `--dims`), read from an .npz, or made from text with the model's
tokenizer.json (`tgraph.text_inputs`; for an .onnx file, `--tokenizer` or a tokenizer.json
beside it), padded into one batch and run `--batch-size` rows at a time. `--pool` turns an
encoder's hidden states into one `embeddings` row per text (sentence-transformers' mean or
CLS pooling; `--normalize` for unit length). `--output` writes the outputs (or the embeddings)
to an .npz, all-or-nothing; `--json` prints them, values included, and nothing else on stdout.
Without either, a summary (dtype, shape, mean, std) is printed.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

from .cli_args import provider_text
from .errors import ConfigError, InputError, TgraphError


def add_parser(sub, add_model_options) -> None:
    p = sub.add_parser("run", help="run a model or an .onnx file on random, given or text inputs")
    add_model_options(p, output=False)
    p.add_argument("--backend", choices=["ort", "numpy"], default="ort")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dims", default=None, help="symbolic dim sizes of random inputs, e.g. batch=2,seq=16")
    p.add_argument("--inputs", default=None, help=".npz file with input arrays")
    p.add_argument("--text", nargs="+", default=None, metavar="TEXT", help="texts, tokenized into one padded batch")
    p.add_argument("--text-file", default=None, metavar="FILE", help="texts, one per line")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer.json (default: the checkpoint's, "
                   "or the one beside the .onnx file)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass for --text/--text-file")
    p.add_argument("--pool", choices=["mean", "cls"], default=None,
                   help="sentence embeddings from an encoder's hidden states")
    p.add_argument("--normalize", action="store_true", help="with --pool: scale each embedding to unit length")
    p.add_argument("-o", "--output", default=None, metavar="OUT.npz", help="write the outputs to an .npz file")
    p.add_argument("--json", action="store_true", help="print the outputs (values included) as JSON")
    p.add_argument("--report", action="store_true", help="the time each phase took")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with the generated NumPy module")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs error allowed by --check")


# ---------------------------------------------------------------- the model behind MODEL
class _Target:
    """What runs: an onnxruntime session and/or the generated NumPy module, plus what text needs."""

    def __init__(self, args):
        from .runtime import Session

        self.is_onnx = args.model.endswith(".onnx")
        self.directory = _model_directory(args.model)
        self.session = self.numpy_module = None
        self._tmp = None
        if self.is_onnx:
            if not os.path.isfile(args.model):
                raise ConfigError(f"ONNX file not found: {args.model}")
            if args.dtype != "float32":
                raise ConfigError("--dtype converts a model as it is built; an .onnx file runs in the dtype it was "
                                  "exported with")
            if args.backend == "numpy" or args.check:
                raise ConfigError("--backend numpy and --check need a model (name, file.py:factory or checkpoint), "
                                  "not an .onnx file")
            self.session = Session(args.model, providers=args.provider, threads=args.threads)
            self.specs = [(s.name, s.dtype, tuple(s.shape or ())) for s in self.session.inputs]
            self.positions, self.vocab_size, self.random_source = None, None, self.session
            return
        from .api import build
        from .cli_args import level_of as _level, parse_sets as _parse_sets
        from .codegen.onnx import to_onnx
        from .generate import POSITION_LIMITS

        built = build(args.model, _parse_sets(args.sets), seed=args.seed, level=_level(args), dtype=args.dtype)
        self.specs = [(v.name, v.dtype.numpy, tuple(v.shape)) for v in built.graph.inputs]
        config = built.model.config
        self.positions = next((int(getattr(config, k)) for k in POSITION_LIMITS if hasattr(config, k)), None)
        self.vocab_size = built.model.vocab_size
        model_proto = to_onnx(built.graph)
        if args.backend == "ort" or args.check:
            self.session = Session(model_proto, providers=args.provider, threads=args.threads)
        self.random_source = self.session if self.session is not None else model_proto
        if args.backend == "numpy" or args.check:
            from .codegen.numpy import load_numpy_module, write_numpy_module
            from .progress import phase

            self._tmp = tempfile.TemporaryDirectory(prefix="tgraph-")
            path = write_numpy_module(built.graph, Path(self._tmp.name) / "model.py")
            with phase("import model.py"):           # reads every weight from model.npz
                self.numpy_module = load_numpy_module(path)

    def backends(self) -> List[str]:
        return (["ort"] if self.session is not None else []) + (["numpy"] if self.numpy_module is not None else [])

    def run(self, backend: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if backend == "ort":
            return self.session.run(inputs)
        try:
            return self.numpy_module.run(dict(inputs))
        except self.numpy_module.InputError as e:          # a missing input, an id beyond the vocabulary...
            raise InputError(f"numpy backend: {e}") from None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


# ---------------------------------------------------------------- inputs
def _load_inputs(path: str) -> Dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ConfigError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read inputs file {path}: {e}") from None


def _texts(args) -> Optional[List[str]]:
    from .text_inputs import read_text_file

    if args.text is not None and args.text_file is not None:
        raise ConfigError("give --text or --text-file, not both")
    return list(args.text) if args.text is not None else read_text_file(args.text_file) if args.text_file else None


def _model_directory(model: str) -> Optional[Path]:
    """Where a model's tokenizer.json and sentence_bert_config.json live: a checkpoint directory,
    or the folder of an .onnx file; None for a registered name or a file.py:factory."""
    if model.endswith(".onnx"):
        return Path(model).parent
    return Path(model) if os.path.isdir(model) else None


def _tokenizer(args):
    """The tokenizer for --text, found before anything is built (so a missing one fails fast)."""
    from .tokens import TextTokenizer, find_tokenizer

    if args.tokenizer is not None:
        return TextTokenizer(args.tokenizer)
    directory = _model_directory(args.model)
    found = find_tokenizer(str(directory)) if directory is not None else None
    if found is not None:
        return found
    where = (f" in {directory or '.'} (beside the .onnx file)" if args.model.endswith(".onnx")
             else " in the checkpoint directory" if directory is not None else "")
    raise ConfigError(f"{args.model}: no tokenizer.json{where}, so --text cannot be tokenized "
                      "(give --tokenizer PATH, or --inputs FILE.npz)")


def _check_options(args) -> None:
    given = [f for f, v in (("--inputs", args.inputs), ("--text", args.text), ("--text-file", args.text_file),
                            ("--dims", args.dims)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of --dims, --inputs, --text, --text-file (got {' and '.join(given)})")
    if args.tokenizer is not None and args.text is None and args.text_file is None:
        raise ConfigError("--tokenizer needs --text or --text-file")
    if args.normalize and args.pool is None:
        raise ConfigError("--normalize needs --pool mean|cls")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive int, got {args.batch_size}")
    if args.output is not None and Path(args.output).suffix != ".npz":
        raise ConfigError(f"--output file must end in .npz: {args.output}")


def _make_inputs(args, target: _Target, texts: Optional[List[str]], tokenizer) -> Dict[str, np.ndarray]:
    from .cli_args import check_dims as _check_dims, parse_dims as _parse_dims
    from .runtime import make_random_inputs

    if texts is not None:
        from .text_inputs import max_text_length, text_feeds

        length = max_text_length(target.directory, target.positions, tokenizer)
        feeds, cut = text_feeds(texts, tokenizer, [(n, d) for n, d, _ in target.specs], length, args.model)
        if cut:
            print(f"tgraph: note: {len(cut)} text(s) cut to {length} tokens (the first: text {cut[0]})",
                  file=sys.stderr)
        return feeds
    if args.inputs is not None:
        return _load_inputs(args.inputs)
    _check_dims(args.dims, [shape for _, _, shape in target.specs])
    return make_random_inputs(target.random_source, _parse_dims(args.dims), seed=args.seed,
                              vocab_size=target.vocab_size)


def _batches(inputs: Mapping[str, np.ndarray], size: int, text: bool):
    """Row blocks of a text batch (every input is [batch, ...]); other inputs run whole."""
    rows = len(next(iter(inputs.values())))
    if not text or rows <= size:
        yield dict(inputs)
        return
    for start in range(0, rows, size):
        yield {k: v[start:start + size] for k, v in inputs.items()}


def _run_batches(target: _Target, inputs, size: int, text: bool):
    """(results per backend, seconds per backend), row blocks concatenated back into one batch."""
    from .progress import phase

    blocks = list(_batches(inputs, size, text))
    parts: Dict[str, List[Dict[str, np.ndarray]]] = {}
    seconds: Dict[str, float] = {}
    for backend in target.backends():
        # one block: a ticking line; several: a bar over them
        with phase(f"run {'onnxruntime' if backend == 'ort' else 'numpy'}",
                   total=len(blocks) if len(blocks) > 1 else None, unit="batch") as bar:
            start = time.perf_counter()
            for block in blocks:
                parts.setdefault(backend, []).append(target.run(backend, block))
                bar.update(1)
            seconds[backend] = time.perf_counter() - start
    joined = {b: (ps[0] if len(ps) == 1 else {k: np.concatenate([p[k] for p in ps]) for k in ps[0]})
              for b, ps in parts.items()}
    return joined, seconds


# ---------------------------------------------------------------- results
def summarise(outputs: Mapping[str, np.ndarray]) -> List[str]:
    lines = []
    for name, array in outputs.items():
        a = np.asarray(array)
        floating = a.dtype.kind == "f" or a.dtype.name == "bfloat16"
        # accumulated in float64: an fp16 output's variance overflows fp16 (std inf)
        wide = a.astype(np.float64) if a.size and floating else None
        stats = f"mean {wide.mean():.6g} std {wide.std():.6g}" if wide is not None else ""
        lines.append(f"  {name}: {a.dtype}{list(a.shape)} {stats}".rstrip())
    return lines


def _jsonable(array: np.ndarray):
    """Nested lists; inf/NaN become null (JSON has no such numbers); bfloat16 as float32."""
    a = np.asarray(array)
    if a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return np.where(np.isfinite(a), a.astype(object), None).tolist()
    return a.tolist()


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    from .atomic import write_files

    def write(f, _companion) -> None:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

    write_files(Path(path), write)


def _check(results, tolerance: float) -> Dict[str, float]:
    errors = {}
    for name, ref in results["ort"].items():
        got = results["numpy"][name]
        if np.shape(got) != np.shape(ref):
            raise TgraphError(f"--check: output {name} has shape {np.shape(got)} in NumPy, {np.shape(ref)} in ORT")
        errors[name] = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)))) \
            if np.size(ref) else 0.0
    return errors


def cmd_run(args) -> int:
    from .numerics import warn_nonfinite
    from .progress import timings_line

    _check_options(args)
    texts = _texts(args)
    tokenizer = _tokenizer(args) if texts is not None else None
    target = _Target(args)
    try:
        inputs = _make_inputs(args, target, texts, tokenizer)
        results, seconds = _run_batches(target, inputs, args.batch_size, texts is not None)
    finally:
        target.close()
    info = sys.stderr if args.json else sys.stdout          # stdout holds only the JSON then
    if target.session is not None:
        print(f"onnxruntime on {provider_text(target.session, args)}: {seconds['ort'] * 1e3:.1f} ms", file=info)
    if "numpy" in results:
        print(f"numpy backend: {seconds['numpy'] * 1e3:.1f} ms", file=info)
    shown = results.get(args.backend) or next(iter(results.values()))
    warn_nonfinite(shown, args.model if target.is_onnx else f"{args.model} ({args.dtype})")
    errors = _check(results, args.tolerance) if args.check else {}
    if args.pool is not None:
        from .text_inputs import hidden_output, pool

        hidden = hidden_output(shown, args.model)
        shown = {"embeddings": pool(shown[hidden], inputs.get("attention_mask"), args.pool, args.normalize)}
    if args.output is not None:
        _write_npz(args.output, shown)
        print(f"wrote {args.output} ({', '.join(f'{k} {list(np.shape(v))}' for k, v in shown.items())})", file=info)
    if args.json:
        doc = {"model": args.model, "backend": args.backend,
               "providers": list(target.session.providers) if target.session is not None else [],
               "outputs": {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)), "values": _jsonable(v)}
                           for k, v in shown.items()}}
        if args.check:
            doc["check"] = {"max_abs_error": errors, "tolerance": args.tolerance,
                            "passed": max(errors.values(), default=0.0) <= args.tolerance}
        if args.report:
            from .progress import timings

            doc["phases"] = {name.strip(): round(s, 4) for name, s in timings() if not name.startswith(" ")}
        print(json.dumps(doc))
    else:
        print("\n".join(summarise(shown)))
        if args.pool is not None and args.output is None:
            for i, row in enumerate(shown["embeddings"]):
                head = " ".join(f"{x:.4f}" for x in row[:8])
                print(f"  [{i}] {head}{' ...' if len(row) > 8 else ''} ({len(row)} values; --json or --output "
                      "for all)" if len(row) > 8 else f"  [{i}] {head}")
        for name, diff in errors.items():
            print(f"check {name}: max abs error onnxruntime vs numpy = {diff:.3e}")
        if args.report:
            print(timings_line())
    if args.check:
        worst = max(errors.values(), default=0.0)
        if not worst <= args.tolerance:
            print(f"tgraph: check FAILED: max abs error {worst:.3e} > {args.tolerance:g}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"check passed (max abs error {worst:.3e} <= {args.tolerance:g})")
    return 0
