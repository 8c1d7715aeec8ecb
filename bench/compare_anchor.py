"""tgraph vs torch.onnx.export + onnxruntime's transformer optimizer, on onnxruntime CPU.

Builds random-initialised Hugging Face models (GPT-2 124M with the default config,
BERT-base, a small LLaMA: hidden 512, 8 layers, 8 heads, 2 KV heads), and exports each

* with tgraph at every optimization level (checkpoint directory -> `tgraph.api.build` ->
  `save_onnx`), plus any extra pipelines given with ``--extra`` (for fusion ablations);
* with `torch.onnx.export` (legacy TorchScript exporter and the dynamo exporter), each
  followed by `onnxruntime.transformers.optimizer.optimize_model` (the "anchors").

Every model runs in one onnxruntime CPU session (2 intra-op threads, ORT's default
ORT_ENABLE_ALL optimizations) at batch 1 and each sequence length, all contenders in
one process and alternating run by run, so machine noise hits all of them alike. It
prints medians, the ratio of each contender to the best anchor, achieved GFLOP/s
against a measured NumPy fp32 matmul peak (the minimum run is printed too: on a
shared machine it is the steadier number), each tool's export+optimize wall time, and
how many attention blocks each model carries as one fused attention op (in the file,
and after onnxruntime's own session optimizations).

Targets (the issue): tgraph's best level no slower than the best anchor at every
point (ratio <= 1.00); export+optimize at least 10x faster; fused attention in 100%
of attention blocks.

    python bench/compare_anchor.py                                  # the full spec (several minutes)
    python bench/compare_anchor.py --models gpt2 --seqs 128 --repeats 5 --anchors legacy
    python bench/compare_anchor.py --models llama --levels 2 --anchors none \\
        --extra "skip=fuse-skip-layer-norm"                         # -O2 plus one fusion, as a contender
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention"}


# ------------------------------------------------------------------------------ models
@dataclass
class ModelSpec:
    name: str
    make: Callable[[], "object"]        # -> a torch nn.Module (HF), random weights
    ort_types: List[str]                # optimize_model model_type candidates, tried in order
    num_heads: int
    hidden: int
    layers: int
    outputs: List[str]
    causal: bool


def _hf_models() -> Dict[str, ModelSpec]:
    import transformers as tf

    def gpt2():
        return tf.GPT2LMHeadModel(tf.GPT2Config(attn_implementation="eager"))

    def bert():
        return tf.BertModel(tf.BertConfig(attn_implementation="eager"), add_pooling_layer=True)

    def llama():
        cfg = tf.LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                             intermediate_size=1376, attn_implementation="eager")
        return tf.LlamaForCausalLM(cfg)

    return {
        "gpt2": ModelSpec("gpt2", gpt2, ["gpt2", "bert"], 12, 768, 12, ["logits"], True),
        "bert": ModelSpec("bert", bert, ["bert"], 12, 768, 12, ["last_hidden_state", "pooler_output"], False),
        "llama": ModelSpec("llama", llama, ["gpt2", "bert"], 8, 512, 8, ["logits"], True),
    }


def model_flops(model, seq: int) -> float:
    """Multiply-adds of one forward pass at batch 1 (x2 = FLOPs): every Linear/Conv1D weight and
    the LM head once per token, plus Q·Kᵀ and P·V over the full (unmasked) score matrix."""
    import torch

    cfg = model.config
    linear = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2 and not isinstance(mod, torch.nn.Embedding):
            linear += w.numel()
    tied_head = getattr(model, "lm_head", None) is not None and \
        model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied_head:
        linear += model.lm_head.weight.numel()        # counted once as an Embedding above, used as a matmul
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn = 2 * seq * seq * heads * head_dim * cfg.num_hidden_layers
    return 2.0 * (linear * seq + attn)


# ------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    name: str
    path: Optional[Path] = None
    export_s: float = float("nan")    # export + optimize (+ save) wall time
    load_s: float = 0.0               # tgraph only: reading the checkpoint directory
    note: str = ""
    fused_file: int = 0
    fused_session: Optional[int] = None
    session: object = None
    times: Dict[int, List[float]] = field(default_factory=lambda: collections.defaultdict(list))
    is_anchor: bool = False


def count_attention(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type in ATTENTION_OPS)


@contextlib.contextmanager
def quiet():
    """torch.onnx and the ORT optimizer are chatty; keep the benchmark's own output readable."""
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_tgraph(ckpt: Path, out: Path, label: str, level: Optional[int], pipeline: Optional[str]) -> Contender:
    from tgraph.api import build
    from tgraph.codegen.onnx import save_onnx
    from tgraph.sources import load_model

    t0 = time.perf_counter()
    with quiet():
        loaded = load_model(str(ckpt))
    t1 = time.perf_counter()
    built = build(loaded, level=level if level is not None else 2, pipeline=pipeline)
    save_onnx(built.graph, out)
    t2 = time.perf_counter()
    hist = built.graph.op_histogram()
    fusions = ", ".join(f"{k}:{v}" for k, v in sorted(hist.items()) if "." in k or k in (
        "Attention", "LayerNormalization", "RMSNormalization", "Gelu"))
    return Contender(label, out, export_s=t2 - t1, load_s=t1 - t0, note=fusions)


def _example_inputs(spec: ModelSpec, torch):
    ids = torch.randint(0, 1000, (1, 16))
    ones = torch.ones(1, 16, dtype=torch.int64)
    if spec.name == "bert":
        return ids, ones, torch.zeros(1, 16, dtype=torch.int64)
    return ids, ones


def _wrapper(spec: ModelSpec, model, torch):
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            if spec.name != "bert":
                kw["use_cache"] = False
            out = self.m(**kw)
            return tuple(getattr(out, k) for k in spec.outputs)

    return Wrapped().eval()


def export_anchor(spec: ModelSpec, model, kind: str, out_dir: Path, opset: int, opt_level: int) -> Contender:
    import onnx
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    name = f"torch-{kind}+ortopt"
    args = _example_inputs(spec, torch)
    in_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if len(args) == 3 else [])
    raw = out_dir / f"{spec.name}_{kind}_raw.onnx"
    final = out_dir / f"{spec.name}_{kind}_opt.onnx"
    wrapped = _wrapper(spec, model, torch)
    t0 = time.perf_counter()
    try:
        with quiet(), torch.no_grad():
            if kind == "dynamo":
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=1, max=4096)
                torch.onnx.export(wrapped, args, str(raw), dynamo=True, opset_version=opset, input_names=in_names,
                                  output_names=spec.outputs, dynamic_shapes={n: {0: batch, 1: seq} for n in in_names},
                                  external_data=False)
            else:
                torch.onnx.export(wrapped, args, str(raw), dynamo=False, opset_version=opset, input_names=in_names,
                                  output_names=spec.outputs, dynamic_axes={n: {0: "batch", 1: "seq"} for n in in_names})
    except Exception as e:  # noqa: BLE001 - a failed anchor is reported, not fatal
        return Contender(name, None, note=f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                         is_anchor=True)
    t1 = time.perf_counter()
    errors = []
    for model_type in spec.ort_types:
        t1 = time.perf_counter()
        try:
            with quiet():
                opt = optimize_model(str(raw), model_type=model_type, num_heads=spec.num_heads,
                                     hidden_size=spec.hidden, opt_level=opt_level)
                opt.save_model_to_file(str(final))
        except Exception as e:  # noqa: BLE001
            errors.append(f"optimize_model(model_type={model_type}) failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80] if str(e) else ''}")
            continue
        t2 = time.perf_counter()
        fused = collections.Counter(n.op_type for n in opt.model.graph.node if n.domain == "com.microsoft")
        note = f"model_type={model_type}; " + ", ".join(f"{k}:{v}" for k, v in sorted(fused.items()))
        if errors:
            note = "; ".join(errors) + "; then " + note
        return Contender(name, final, export_s=t2 - t0, note=note, fused_file=count_attention(opt.model),
                         is_anchor=True)
    # no optimizer run worked: time the plain export so the row still means something
    plain = onnx.load(str(raw), load_external_data=False)
    return Contender(f"torch-{kind}", raw, export_s=t1 - t0, note="; ".join(errors) + "; timing the raw export",
                     fused_file=count_attention(plain), is_anchor=True)


# ------------------------------------------------------------------------------ running
def make_session(path: Path, threads: int, dump: Optional[Path] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL   # ORT's default, for everyone
    so.log_severity_level = 3
    if dump is not None:
        so.optimized_model_filepath = str(dump)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dump.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def session_attention_count(path: Path, threads: int, tmp: Path) -> Optional[int]:
    """Fused attention ops left after onnxruntime's own (ORT_ENABLE_ALL) graph optimizations."""
    import onnx

    dump = tmp / (path.stem + ".ortopt.onnx")
    try:
        make_session(path, threads, dump)
        return count_attention(onnx.load(str(dump), load_external_data=False))
    except Exception:  # noqa: BLE001 - diagnostic only
        return None
    finally:
        for p in (dump, dump.with_name(dump.name + ".data")):
            p.unlink(missing_ok=True)


def feeds_for(session, seq: int, rng) -> Dict[str, np.ndarray]:
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 1000, (1, seq), dtype=np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, seq), np.int64)
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros((1, seq), np.int64)
        else:
            raise SystemExit(f"unexpected model input {i.name}")
    return feeds


def numpy_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best-of fp32 GEMM GFLOP/s of NumPy's BLAS (threads capped like the sessions)."""
    try:
        from threadpoolctl import threadpool_limits
        ctx = threadpool_limits(threads)
    except ImportError:
        ctx = contextlib.nullcontext()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    with ctx:
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default="gpt2,bert,llama")
    p.add_argument("--seqs", default="1,128,512")
    p.add_argument("--repeats", type=int, default=9, help="timed runs per contender and point (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--levels", default="0,1,2,3", help="tgraph levels to export")
    p.add_argument("--extra", action="append", default=[],
                   help="LABEL=PASSES: an extra tgraph contender, -O2's pipeline followed by PASSES and cleanup")
    p.add_argument("--anchors", default="legacy,dynamo", help="torch exporters to use, or 'none'")
    p.add_argument("--anchor-opset", type=int, default=18)
    p.add_argument("--anchor-opt-level", type=int, default=0,
                   help="optimize_model opt_level (0 = its Python fusions only; sessions run ORT_ENABLE_ALL anyway)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", type=Path, help="keep the exported models in this directory")
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    from tgraph.passes import level_pipeline
    from tgraph.passes.levels import CLEANUP

    torch.set_num_threads(args.threads)
    specs = _hf_models()
    seqs = [int(s) for s in args.seqs.split(",")]
    anchors = [] if args.anchors == "none" else args.anchors.split(",")
    levels = [int(x) for x in args.levels.split(",") if x != ""]
    peak = numpy_peak(args.threads)
    print(f"onnxruntime {ort.__version__} CPU, intra_op_num_threads={args.threads}, ORT_ENABLE_ALL; torch {torch.__version__}")
    print(f"NumPy fp32 matmul peak: {peak:.1f} GFLOP/s ({args.threads} threads, 2048^3 GEMM, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')})")
    if "dynamo" in anchors:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            print("dynamo exporter skipped: onnxscript is not installed (installing it must not pull a CPU "
                  "onnxruntime beside onnxruntime-gpu; check with `pip install --dry-run onnxscript`)")
            anchors.remove("dynamo")
    results = []
    keep_dir = args.keep
    with tempfile.TemporaryDirectory(prefix="tgraph_anchor_") as tmpd:
        tmp = Path(tmpd)
        out_dir = keep_dir or tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        for mname in args.models.split(","):
            spec = specs[mname]
            torch.manual_seed(0)
            with quiet():
                model = spec.make().eval()
                model.config.use_cache = False
                ckpt = tmp / f"hf_{mname}"
                model.save_pretrained(ckpt)
            print(f"\n=== {mname}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                  f"{spec.layers} attention blocks ===", flush=True)
            contenders: List[Contender] = []
            for level in levels:
                contenders.append(export_tgraph(ckpt, out_dir / f"{mname}_tgraph_O{level}.onnx", f"tgraph -O{level}",
                                                level, None))
            cleanup = list(CLEANUP)
            for extra in args.extra:
                label, _, passes = extra.partition("=")
                pipeline = ",".join(level_pipeline(2) + passes.split(",") + cleanup)
                contenders.append(export_tgraph(ckpt, out_dir / f"{mname}_tgraph_{label}.onnx", f"tgraph {label}",
                                                None, pipeline))
            for kind in anchors:
                contenders.append(export_anchor(spec, model, kind, out_dir, args.anchor_opset, args.anchor_opt_level))
            for c in contenders:
                if c.path is None:
                    continue
                if not c.is_anchor:
                    import onnx
                    c.fused_file = count_attention(onnx.load(str(c.path), load_external_data=False))
                c.fused_session = session_attention_count(c.path, args.threads, tmp)
                try:
                    c.session = make_session(c.path, args.threads)
                except Exception as e:  # noqa: BLE001
                    c.note += f"; session failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            live = [c for c in contenders if c.session is not None]
            rng = np.random.default_rng(0)
            for seq in seqs:
                feeds = {id(c): feeds_for(c.session, seq, rng) for c in live}
                for c in live:
                    for _ in range(args.warmup):
                        c.session.run(None, feeds[id(c)])
                for _ in range(args.repeats):
                    for c in live:                      # alternate: one run of each, round after round
                        t = time.perf_counter()
                        c.session.run(None, feeds[id(c)])
                        c.times[seq].append(time.perf_counter() - t)
            report(mname, spec, model, contenders, seqs, peak, results)
            for c in contenders:
                c.session = None
            del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(mname, spec, model, contenders, seqs, peak, results) -> None:
    print(f"\n{'contender':<24} {'export+opt s':>12} {'attn fused (file/session)':>26}  notes")
    for c in contenders:
        sess = "?" if c.fused_session is None else str(c.fused_session)
        load = f" (+{c.load_s:.2f}s checkpoint read)" if not c.is_anchor else ""
        print(f"{c.name:<24} {c.export_s:>12.2f} {f'{c.fused_file}/{sess} of {spec.layers}':>26}  {c.note}{load}")
    anchors = [c for c in contenders if c.is_anchor and c.times]
    tg = [c for c in contenders if not c.is_anchor and c.times]
    best_anchor_export = min((c.export_s for c in anchors), default=float("nan"))
    if anchors and tg:
        print(f"export speed-up (best anchor / slowest tgraph level): "
              f"{best_anchor_export / max(c.export_s for c in tg):.1f}x")
    print(f"\n{'seq':>4} {'contender':<24} {'median ms':>10} {'min ms':>8} {'vs best anchor':>15} {'GFLOP/s':>8} "
          f"{'% peak':>7}")
    for seq in seqs:
        flops = model_flops(model, seq)
        meds = {c.name: statistics.median(c.times[seq]) for c in contenders if c.times.get(seq)}
        best_a = min((meds[c.name] for c in anchors if c.name in meds), default=None)
        for c in contenders:
            if c.name not in meds:
                continue
            m = meds[c.name]
            ratio = f"{m / best_a:.2f}" if best_a else "-"
            gf = flops / m / 1e9
            best = min(c.times[seq])
            print(f"{seq:>4} {c.name:<24} {m * 1e3:>10.2f} {best * 1e3:>8.2f} {ratio:>15} {gf:>8.1f} "
                  f"{100 * gf / peak:>6.0f}%")
            results.append({"model": mname, "seq": seq, "contender": c.name, "median_s": m, "min_s": best,
                            "ratio_vs_best_anchor": (m / best_a) if best_a else None, "gflops": gf,
                            "export_s": c.export_s, "fused_attention_file": c.fused_file,
                            "fused_attention_session": c.fused_session, "blocks": spec.layers, "note": c.note})
        tg_meds = [meds[c.name] for c in tg if c.name in meds]
        if best_a and tg_meds:
            print(f"{seq:>4} {'=> best tgraph / best anchor':<40} {min(tg_meds) / best_a:>.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
