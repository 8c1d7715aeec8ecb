"""Quantized exports and their error report: what `--quantize` does behind the CLI.

`quantize_graph` runs the `quantize-weights` pass on an optimised float graph (after the
fusions, which match float MatMuls). `error_report` measures the quantized graph against
the float one on a fixed batch with onnxruntime: per float output the max and mean relative
error and the cosine similarity of the last-axis vectors (logits, hidden states), the
mean-pooled embedding cosine for encoders, greedy agreement over N generated tokens for
decoders, and both file sizes. `report_dict` is what a generation directory's tgraph.json
records; `format_report` is what `--report` prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError
from .ir import Graph

QUANT_BITS = {"int4": 4, "int8": 8}
REPORT_BATCH, REPORT_SEQ, GREEDY_TOKENS = 2, 16, 8


@dataclass
class QuantizeOptions:
    """The CLI's quantization flags; `pipeline()` is the pass spec they stand for."""

    kind: str = "int4"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 0
    method: str = "rtn"
    head: bool = True
    calibration: Optional[str] = None
    head_bits: int = 0                 # 0: as `kind`; 8: the LM head at 8 bits
    int8_layers: Sequence[str] = ()    # MatMul name fragments kept at 8 bits (v_proj, down_proj)

    def __post_init__(self):
        if self.kind not in QUANT_BITS:
            raise ConfigError(f"--quantize must be int4 or int8, got {self.kind!r}")
        if self.calibration is not None and not os.path.isfile(self.calibration):
            raise ConfigError(f"--calibration file not found: {self.calibration}")

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.kind]

    def pass_instance(self):
        from .passes.quantize import QuantizeWeights

        return QuantizeWeights(bits=self.bits, block_size=self.block_size, symmetric=self.symmetric,
                               accuracy_level=self.accuracy_level, method=self.method, head=self.head,
                               head_bits=self.head_bits, int8_layers="+".join(self.int8_layers))


def read_calibration_ids(path: str, tokenizer=None, max_rows: int = 16, max_len: int = 128) -> List[List[int]]:
    """Calibration prompts from a file: one prompt per line, either token ids (``1 2 3`` or
    ``1,2,3``) or text, which needs the checkpoint's tokenizer.json."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read calibration file {path}: {e}") from None
    if not lines:
        raise ConfigError(f"calibration file {path} has no prompts")
    rows = []
    for i, line in enumerate(lines[:max_rows]):
        parts = line.replace(",", " ").split()
        if all(p.isdigit() for p in parts):
            rows.append([int(p) for p in parts][:max_len])
        elif tokenizer is None:
            raise ConfigError(f"calibration file {path} line {i + 1} is text, and the model has no tokenizer.json; "
                              "give token ids (1 2 3) instead")
        else:
            rows.append(tokenizer.encode(line)[:max_len])
    return rows


def _feeds(graph: Graph, ids: Sequence[int]) -> Dict[str, np.ndarray]:
    """Inputs for one prompt: the ids, ones for masks, zeros for token types and other integers,
    0..T-1 positions, empty (past_seq = 0) or zero float inputs."""
    from .runtime.session import resolve_dim

    sizes = {"batch": 1, "seq": len(ids), "decoder_seq": len(ids), "past_seq": 0}
    feeds = {}
    for v in graph.inputs:
        shape = tuple(resolve_dim(d, sizes) for d in (v.shape or ()))
        low = v.name.lower()
        if low.endswith("position_ids"):
            value = np.broadcast_to(np.arange(shape[-1]), shape)
        elif low.endswith("ids") and not low.endswith("token_type_ids"):
            value = np.asarray([ids]).reshape(shape)
        elif low.endswith("mask"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        feeds[v.name] = np.ascontiguousarray(value).astype(v.dtype.numpy)
    return feeds


def graph_model(graph: Graph):
    from .codegen.onnx import to_onnx

    return to_onnx(graph)


def activation_stats(graph: Graph, rows: Sequence[Sequence[int]], matmuls, gram: bool = False,
                     abs_mean: bool = False) -> Dict[str, np.ndarray]:
    """``{MatMul node name: E[x_k^2]}`` over the calibration tokens of each MatMul's activation
    input (``gram``: the whole ``E[x x^T]`` [K, K], for GPTQ; ``abs_mean``: `Moments` of the Gram
    matrix and ``E|x|``, for AWQ). onnxruntime computes them: the activations become extra graph
    outputs (10x faster than the reference interpreter on MiniLM). MatMuls reading the same
    activation share one array."""
    from onnx import helper

    gram = gram or abs_mean
    wanted = {m.name: m.inputs[0].name for m in matmuls}
    by_name = {m.inputs[0].name: m.inputs[0] for m in matmuls}
    model = graph_model(graph)
    present = {o.name for o in model.graph.output}
    for name in sorted(set(wanted.values()) - present):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(by_name[name].dtype.numpy))
        model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    sess = _session(model)
    sums: Dict[str, np.ndarray] = {}
    abs_sums: Dict[str, np.ndarray] = {}
    tokens: Dict[str, List[np.ndarray]] = {}       # awq: the tokens themselves while there are at most K
    counts: Dict[str, int] = {}
    for ids in rows:
        values = _run(sess, _feeds(graph, ids))
        for value in set(wanted.values()):
            x = np.asarray(values[value], np.float64)
            x = x.reshape(-1, x.shape[-1])
            counts[value] = counts.get(value, 0) + x.shape[0]
            if abs_mean:
                abs_sums[value] = abs_sums.get(value, 0) + np.sum(np.abs(x), axis=0)
                if value not in sums:
                    tokens.setdefault(value, []).append(x)
                    if counts[value] <= x.shape[1]:
                        continue
                    x = np.concatenate(tokens.pop(value))      # too many: sum the Gram matrix instead
            sums[value] = sums.get(value, 0) + (x.T @ x if gram else np.sum(x * x, axis=0))
    if abs_mean:
        from .passes.quant_awq import Moments, gram_factor

        means = {v: Moments(abs_sums[v] / counts[v],
                            gram_factor(sums[v] / counts[v] if v in sums else None,
                                        np.concatenate(tokens[v]) if v in tokens else None))
                 for v in counts}
    else:
        means = {v: sums[v] / counts[v] for v in sums}
    return {node: means[value] for node, value in wanted.items()}


def calibration_stats(graph: Graph, rows: Sequence[Sequence[int]], matmuls, method: str) -> Dict:
    """The statistics `method` needs: E[x^2] (search), the Gram matrix (gptq), Moments (awq*)."""
    return activation_stats(graph, rows, matmuls, gram=method == "gptq", abs_mean=method.startswith("awq"))


def quantize_graph(graph: Graph, options: QuantizeOptions, tokenizer=None):
    """Quantize `graph` in place; returns the pass's `PipelineResult` (with the pass's refusals)."""
    from .passes import optimize

    qpass = options.pass_instance()
    if options.method != "rtn" and options.calibration:
        from .passes.quantize import find_linears

        rows = read_calibration_ids(options.calibration, tokenizer)
        qpass.act_stats = calibration_stats(graph, rows, [lin.matmul for lin in find_linears(graph)], options.method)
    result = optimize(graph, pipeline=[qpass])
    result.refused = list(qpass.refused)
    return result


# ---------------------------------------------------------------- measuring
def _session(source):
    """An onnxruntime CPU session of a Graph, a ModelProto or a file."""
    import onnxruntime as ort

    if isinstance(source, Graph):
        source = graph_model(source)
    model = source if isinstance(source, (str, os.PathLike)) else source.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model) if isinstance(model, os.PathLike) else model, opts,
                                providers=["CPUExecutionProvider"])


def _run(sess, feeds) -> Dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1] if np.ndim(a) else 1)
    b = np.asarray(b, np.float64).reshape(a.shape)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, np.sum(a * b, axis=1) / np.where(den > 0, den, 1), 1.0)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, np.float64)[..., None]
    return np.sum(np.asarray(hidden, np.float64) * m, axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                    mask: Optional[np.ndarray] = None) -> Dict[str, Dict[str, float]]:
    """Per float output: max/mean relative error and mean/min last-axis cosine (and pooled cosine)."""
    out = {}
    for name, r in ref.items():
        if np.asarray(r).dtype.kind != "f" or name.startswith("present"):
            continue
        r64, g64 = np.asarray(r, np.float64), np.asarray(got[name], np.float64)
        cos = cosine_rows(r64, g64)
        entry = {"max_rel_error": float(np.max(np.abs(g64 - r64)) / max(np.max(np.abs(r64)), 1e-12)),
                 "mean_rel_error": float(np.mean(np.abs(g64 - r64)) / max(np.mean(np.abs(r64)), 1e-12)),
                 "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
        if mask is not None and "hidden" in name and r64.ndim == 3 and r64.shape[:2] == np.shape(mask):
            pooled = cosine_rows(mean_pool(r64, mask), mean_pool(g64, mask))
            entry["mean_pooled_cosine"] = float(pooled.mean())
            entry["mean_pooled_cosine_min"] = float(pooled.min())
        out[name] = entry
    return out


def greedy_ids(sess, feeds: Dict[str, np.ndarray], steps: int) -> np.ndarray:
    """Greedy continuation by re-running the whole sequence (no cache): [batch, steps] ids."""
    ids_name = next(n for n in feeds if n.endswith("input_ids"))
    feeds = dict(feeds)
    new = []
    for _ in range(steps):
        logits = _run(sess, feeds)["logits"]
        nxt = np.argmax(logits[:, -1, :], axis=-1).astype(feeds[ids_name].dtype)
        new.append(nxt)
        for name, value in list(feeds.items()):
            low = name.lower()
            if name == ids_name:
                feeds[name] = np.concatenate([value, nxt[:, None]], axis=1)
            elif low.endswith("mask") and value.ndim == 2:
                feeds[name] = np.concatenate([value, np.ones_like(value[:, :1])], axis=1)
            elif low.endswith("position_ids"):
                feeds[name] = np.concatenate([value, value[:, -1:] + 1], axis=1)
    return np.stack(new, axis=1)


def _is_decoder(sess) -> bool:
    ins = {i.name for i in sess.get_inputs()}
    outs = {o.name for o in sess.get_outputs()}
    return "logits" in outs and "input_ids" in ins and not any("past" in n or "decoder" in n or "encoder" in n
                                                                for n in ins)


def error_report(reference: Graph, quantized: Graph, feeds: Optional[Dict[str, np.ndarray]] = None, *,
                 greedy_tokens: int = GREEDY_TOKENS, vocab_size: Optional[int] = None,
                 quantized_path: Optional[str] = None) -> Dict:
    """The quantized graph against the float one on a fixed batch (see the module docstring)."""
    from .runtime.session import make_random_inputs

    ref_model = graph_model(reference)
    ref_sess = _session(ref_model)
    q_model = graph_model(quantized) if quantized_path is None else None
    q_sess = _session(q_model if q_model is not None else Path(quantized_path))
    if feeds is None:
        feeds = make_random_inputs(ref_model, {"batch": REPORT_BATCH, "seq": REPORT_SEQ, "decoder_seq": REPORT_SEQ,
                                               "past_seq": 0}, seed=0, vocab_size=vocab_size)
    mask = next((v for k, v in feeds.items() if k == "attention_mask"), None)
    report = {"outputs": compare_outputs(_run(ref_sess, feeds), _run(q_sess, feeds), mask),
              "batch": {k: list(np.shape(v)) for k, v in feeds.items()}}
    if greedy_tokens and _is_decoder(ref_sess):
        a, b = greedy_ids(ref_sess, feeds, greedy_tokens), greedy_ids(q_sess, feeds, greedy_tokens)
        same = a == b
        first = [int(np.argmin(row)) if not row.all() else greedy_tokens for row in same]
        report["greedy"] = {"tokens": greedy_tokens, "agreement": float(same.mean()),
                            "first_divergence": first}
    q_bytes = _file_bytes(quantized_path) if quantized_path else q_model.ByteSize()
    report["file_bytes"] = {"float": ref_model.ByteSize(), "quantized": q_bytes,
                            "ratio": q_bytes / max(ref_model.ByteSize(), 1)}
    return report


def _file_bytes(path: str) -> int:
    """The model file plus its external data file (OUT.onnx.data), if it has one."""
    data = Path(str(path) + ".data")
    return os.path.getsize(path) + (data.stat().st_size if data.is_file() else 0)


def report_dict(options: QuantizeOptions, result, error: Optional[Dict] = None) -> Dict:
    """What tgraph.json records about a quantized export."""
    counts = result.counts().get("quantize-weights", {}) if result is not None else {}
    d = {"scheme": options.kind, "bits": options.bits, "block_size": options.block_size,
         "symmetric": options.symmetric, "accuracy_level": options.accuracy_level, "method": options.method,
         "lm_head_quantized": options.head, "lm_head_bits": (options.head_bits or options.bits) if options.head else None,
         "int8_layers": list(options.int8_layers), "at_8_bits": counts.get("at_8_bits", 0),
         "embeddings_quantized": False,
         "quantized_matmuls": counts.get("quantized", 0), "padded": counts.get("padded", 0),
         "refused": list(getattr(result, "refused", []) or [])}
    if options.method.startswith("awq"):     # where each group's 1/s went (see passes/quant_awq.py)
        d["awq_scaled_into"] = {k[len("awq_into_"):]: v for k, v in counts.items() if k.startswith("awq_into_")}
    if error is not None:
        d["error"] = error
    return d


def format_report(d: Dict) -> str:
    lines = [f"quantization: {d['scheme']} block {d['block_size']} "
             f"{'symmetric' if d['symmetric'] else 'asymmetric'} {d['method']}, accuracy_level {d['accuracy_level']}, "
             f"{d['quantized_matmuls']} MatMuls -> MatMulNBits ({d['padded']} padded), LM head "
             f"{'int%d' % d['lm_head_bits'] if d.get('lm_head_bits') else 'float'}, embeddings float"
             + (f", {d['at_8_bits']} at 8 bits ({', '.join(d['int8_layers'])})" if d.get("int8_layers") else "")]
    if "awq_scaled_into" in d:
        where = d["awq_scaled_into"]
        lines.append(f"  awq scales: {where.get('norm', 0)} folded into norms, {where.get('linear', 0)} into linears, "
                     f"{where.get('mul', 0)} Muls inserted")
    for r in d.get("refused", []):
        lines.append(f"  kept float: {r}")
    err = d.get("error")
    if err:
        for name, e in err["outputs"].items():
            text = (f"  {name}: max rel error {e['max_rel_error']:.3e}, mean rel error {e['mean_rel_error']:.3e}, "
                    f"cosine mean {e['cosine_mean']:.6f} min {e['cosine_min']:.6f}")
            if "mean_pooled_cosine" in e:
                text += f", mean-pooled cosine {e['mean_pooled_cosine']:.6f}"
            lines.append(text)
        if "greedy" in err:
            g = err["greedy"]
            lines.append(f"  greedy agreement over {g['tokens']} tokens: {g['agreement']:.3f} "
                         f"(first divergence per row: {g['first_divergence']})")
        fb = err["file_bytes"]
        lines.append(f"  file size: {fb['quantized']:,} bytes vs {fb['float']:,} float ({fb['ratio']:.3f}x)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the CLI's --quantize
def add_quantize_options(p) -> None:
    """`--quantize` and its companions, for `tgraph export` and `tgraph optimize`."""
    p.add_argument("--quantize", choices=sorted(QUANT_BITS), default=None,
                   help="weight-only quantization of linear layers to com.microsoft.MatMulNBits")
    p.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=32, help="quantization block (K)")
    p.add_argument("--symmetric", action="store_true", help="no zero points (default: asymmetric)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="onnxruntime's accuracy_level; default 4 (int8 activations inside the CPU kernel: "
                        "2.6x faster int4 decode than 0 in bench/quantize.py, same logit cosine)")
    p.add_argument("--quant-method", choices=["rtn", "search", "gptq", "awq", "awq+gptq"], default="rtn",
                   help="round-to-nearest; a per-block clipping search (weighted by --calibration); GPTQ "
                        "(error feedback through the calibration activations); AWQ (activation-aware "
                        "per-channel scales, then RTN or GPTQ); gptq and awq need --calibration")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="prompts, one per line (text or token ids), for --quant-method search, gptq, awq")
    p.add_argument("--float-head", action="store_true", help="keep the LM head in float")
    p.add_argument("--head-bits", type=int, choices=[4, 8], default=None,
                   help="bits of the LM head (default: those of --quantize)")
    p.add_argument("--int8-layers", default=None, metavar="NAMES",
                   help="comma-separated name fragments of linears kept at 8 bits, e.g. v_proj,down_proj")


def options_from_args(args) -> Optional[QuantizeOptions]:
    if getattr(args, "quantize", None) is None:
        for flag in ("symmetric", "float_head", "head_bits", "int8_layers"):
            if getattr(args, flag, False):
                raise ConfigError(f"--{flag.replace('_', '-')} needs --quantize int4|int8")
        if getattr(args, "calibration", None):
            raise ConfigError("--calibration needs --quantize int4|int8")
        return None
    if args.calibration and args.quant_method == "rtn":
        raise ConfigError("--calibration is used by --quant-method search, gptq or awq, not rtn")
    if args.quant_method in ("gptq", "awq", "awq+gptq") and not args.calibration:
        raise ConfigError(f"--quant-method {args.quant_method} needs --calibration FILE")
    if args.float_head and getattr(args, "head_bits", None):
        raise ConfigError("--float-head and --head-bits contradict each other; give one")
    fragments = tuple(f.strip() for f in (getattr(args, "int8_layers", None) or "").split(",") if f.strip())
    return QuantizeOptions(args.quantize, args.block_size, args.symmetric, args.accuracy_level,
                           args.quant_method, not args.float_head, args.calibration,
                           getattr(args, "head_bits", None) or 0, fragments)


def quantize_for_cli(graph: Graph, options: QuantizeOptions, tokenizer=None):
    """(float copy, result): quantize `graph` in place, keeping the float graph for the error report."""
    reference = graph.copy()
    return reference, quantize_graph(graph, options, tokenizer)


def print_quantize_report(options: QuantizeOptions, reference: Graph, graph: Graph, result, out_path,
                          full: bool, vocab_size: Optional[int] = None) -> Dict:
    error = error_report(reference, graph, vocab_size=vocab_size, quantized_path=str(out_path))
    d = report_dict(options, result, error)
    if full:
        print(format_report(d))
    else:
        head = next(iter(error["outputs"].items()), None)
        summary = f"{head[0]} cosine {head[1]['cosine_mean']:.5f}" if head else "no float outputs"
        print(f"quantized {d['quantized_matmuls']} MatMuls to {options.kind}: {summary}, "
              f"file {error['file_bytes']['ratio']:.3f}x of float (--report for details)")
    return d


def cmd_export_quantized(args, overrides: Mapping[str, str], level: int) -> int:
    """`tgraph export MODEL --quantize ...`: build, optimise, quantize, write, report."""
    import time

    from .api import build
    from .codegen.onnx import DEFAULT_OPSET, save_onnx
    from .tokens import find_tokenizer

    options = options_from_args(args)
    start = time.perf_counter()
    built = build(args.model, overrides, seed=args.seed, level=level, dtype=args.dtype)
    tokenizer = find_tokenizer(args.model) if options.calibration else None
    reference, result = quantize_for_cli(built.graph, options, tokenizer)
    save_onnx(built.graph, args.output, opset=args.opset or DEFAULT_OPSET,
              external_data=True if args.external_data else None)
    took = time.perf_counter() - start
    print(f"wrote {args.output} ({built.graph.parameter_count():,} parameters, {len(built.graph.nodes)} nodes, "
          f"-O{level}, {options.kind}, {took:.2f}s)")
    if args.report and built.report is not None:
        print(built.report)
    print_quantize_report(options, reference, built.graph, result, args.output, args.report,
                          vocab_size=built.model.vocab_size)
    return 0


def cmd_codegen_quantized(args, overrides: Mapping[str, str], level: int) -> int:
    """`tgraph codegen numpy MODEL --quantize ...`: the NumPy module dequantizes with the op's kernel."""
    from .api import build
    from .codegen.numpy import write_numpy_module
    from .tokens import find_tokenizer

    options = options_from_args(args)
    built = build(args.model, overrides, seed=args.seed, level=level, dtype=args.dtype)
    result = quantize_graph(built.graph, options, find_tokenizer(args.model) if options.calibration else None)
    out = write_numpy_module(built.graph, args.output)
    counts = result.counts().get("quantize-weights", {})
    print(f"wrote {out} and {Path(out).with_suffix('.npz')} ({len(built.graph.nodes)} nodes, "
          f"{counts.get('quantized', 0)} MatMuls as {options.kind})")
    return 0
