"""Generation on a CUDA machine, in one command: fp16 and bf16 LLaMA-shaped ~1B exports.

    .venv/bin/python bench/gpu_generate.py                      # on a CUDA machine
    .venv/bin/python bench/gpu_generate.py --provider cpu --tiny --dtypes float16   # plumbing on a CPU

For each dtype: `tgraph export llama --task generate --target cuda --dtype D` into a temporary
directory, `Generator(DIR)` on the provider, then

* node placement: nodes per provider from onnxruntime's recorded graph assignment
  (session.record_ep_graph_assignment_info), and whether CUDA graphs are on (and why not);
* the attention kernel onnxruntime chose: its verbose log lines mentioning attention
  ("ONNX Attention: using ...", GroupQueryAttention / flash / memory-efficient);
* prefill ms, decode ms/step and tokens/s at prompt 32 / 1024, batch 1 / 8 (medians);
* bandwidth: bytes read per decode step (weights + the valid KV cache) / step time, beside
  the device's measured copy bandwidth (an Add over a 1 GiB tensor), as a utilisation ratio.

A dtype the provider has no kernels for (bf16 on the CPU) is reported in one line and skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONE_B = {"d_model": "2048", "num_layers": "22", "num_heads": "32", "num_kv_heads": "4", "d_ff": "5632",
         "vocab_size": "32000"}                      # TinyLlama-1.1B's shape
TINY = {"d_model": "64", "num_layers": "2", "num_heads": "4", "num_kv_heads": "2", "d_ff": "96", "vocab_size": "101"}
KERNEL_LINE = re.compile(r"(ONNX Attention: using[^\n]*|[^\n]*(GroupQueryAttention|[Ff]lash|[Mm]emory[ _-]?[Ee]fficient)"
                         r"[^\n]*)")
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@contextlib.contextmanager
def captured_stderr(path: Path):
    """onnxruntime logs from C++ to fd 2: point fd 2 at a file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def kernel_lines(log: str, limit: int = 5) -> List[str]:
    """The distinct log lines that say which attention kernel ran (first `limit`); the graph
    optimizer's own mentions of attention fusions are not kernel choices."""
    seen: List[str] = []
    for m in KERNEL_LINE.finditer(log):
        line = m.group(0).strip()
        if "transformer" in line.lower() and "GraphTransformer" in line or "Applying graph transformer" in line:
            continue
        line = line[-200:]
        if line not in seen:
            seen.append(line)
    return seen[:limit]


def placement_counts(placement: Dict[str, str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for ep in placement.values():
        counts[ep] = counts.get(ep, 0) + 1
    return counts


def decode_bytes(weight_bytes: int, layers: int, kv_heads: int, head: int, dtype_bytes: int, batch: int,
                 valid: int) -> int:
    """What one decode step must read: every weight once plus each row's valid K and V."""
    return int(weight_bytes + 2 * layers * kv_heads * head * dtype_bytes * batch * valid)


def copy_bandwidth(provider: str, gib: float = 1.0) -> float:
    """Bytes/s of Y = X + 1 over `gib` GiB of fp16 (read + write) on the provider."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = int(gib * (1 << 30) // 2)
    g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "bw",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [n])],
                          [helper.make_tensor("one", TensorProto.FLOAT16, [1], np.ones(1, np.float16).view(np.uint16))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    device = "cuda" if provider == "cuda" else "cpu"
    providers = ["CUDAExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(m.SerializeToString(), providers=providers)
    x = ort.OrtValue.ortvalue_from_shape_and_type([n], onnx.TensorProto.FLOAT16, device, 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([n], onnx.TensorProto.FLOAT16, device, 0)
    b = sess.io_binding()
    b.bind_ortvalue_input("x", x)
    b.bind_ortvalue_output("y", y)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        sess.run_with_iobinding(b)
        b.synchronize_outputs()
        times.append(time.perf_counter() - t)
    return 2 * n * 2 / min(times[1:])


def measure(gen, prompt: int, batch: int, new: int, reps: int):
    from tgraph.sampling import SamplingConfig

    rng = np.random.default_rng(prompt * 31 + batch)
    prompts = [rng.integers(3, gen.vocab_size, prompt).tolist() for _ in range(batch)]
    pre, dec = [], []
    for _ in range(reps):
        marks = [time.perf_counter()]
        for _ in gen.stream(prompts, new, SamplingConfig()):
            marks.append(time.perf_counter())
        steps = np.diff(marks)
        pre.append(steps[0])
        dec.append(float(np.median(steps[1:])))
    return statistics.median(pre), statistics.median(dec)


def run_dtype(args, dtype: str, out: Path, model_sets, peak: float) -> dict:
    import onnxruntime as ort

    from tgraph.errors import TgraphError
    from tgraph.export_dir import export_generation_dir

    row: dict = {"dtype": dtype}
    t = time.perf_counter()
    try:
        manifest = export_generation_dir("llama", out, overrides=model_sets, dtype=dtype, target="cuda",
                                         max_length=args.max_length)
    except TgraphError as e:
        return {**row, "error": f"export: {e}"}
    row["export_s"] = round(time.perf_counter() - t, 2)
    log = out.parent / f"{dtype}.log"
    ort.set_default_logger_severity(0)                     # verbose: the kernel choice is logged
    with captured_stderr(log):                             # everything the verbose session logs
        try:
            return _measure_dir(args, row, out, manifest, log, peak)
        except TgraphError as e:
            return {**row, "error": f"{args.provider}: {e}"}
        finally:
            ort.set_default_logger_severity(2)


def _measure_dir(args, row, out, manifest, log, peak):
    from tgraph.generate import Generator
    from tgraph.runtime import Session
    from tgraph.runtime.static_cache import RECORD_PLACEMENT, node_providers

    dtype = row["dtype"]
    gen = Generator(str(out), provider=args.provider)
    gen.generate([[1, 2, 3]], max_new_tokens=2)                   # warm-up (and CUDA graph capture)
    recorded = Session(str(out / "model.onnx"), providers=args.provider, session_config=RECORD_PLACEMENT)
    row["placement"] = placement_counts(node_providers(recorded.ort_session) or {})
    row["cuda_graph"] = {"enable": gen.cuda_graph_plan.enable, "reason": gen.cuda_graph_plan.reason}
    row["attention_kernel_log"] = kernel_lines(log.read_text(errors="replace"))
    row["provider"] = gen.provider
    weight_bytes = (out / "model.onnx.data").stat().st_size
    cfg = manifest["config"]
    head = cfg["d_model"] // cfg["num_heads"]
    points = []
    for prompt, batch in ((32, 1), (1024, 1), (32, 8)):
        if prompt + args.new > manifest["max_length"]:
            continue
        pre, dec = measure(gen, prompt, batch, args.new, args.reps)
        read = decode_bytes(weight_bytes, cfg["num_layers"], cfg["num_kv_heads"], head, BYTES[dtype], batch,
                            prompt + args.new // 2)
        points.append({"prompt": prompt, "batch": batch, "prefill_ms": round(pre * 1e3, 2),
                       "decode_ms_per_step": round(dec * 1e3, 3), "tokens_per_s": round(batch / dec, 1),
                       "bytes_per_step": read, "achieved_GBps": round(read / dec / 1e9, 1),
                       "bandwidth_utilisation": round(read / dec / peak, 3)})
    row["points"] = points
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (plumbing checks on a CPU)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sets = TINY if args.tiny else ONE_B
    peak = copy_bandwidth(args.provider, gib=0.01 if args.tiny else 1.0)
    report = {"provider": args.provider, "model": sets, "copy_bandwidth_GBps": round(peak / 1e9, 1),
              "loadavg": os.getloadavg(), "results": []}
    print(f"device copy bandwidth {peak / 1e9:.1f} GB/s; model {sets}; loadavg {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            row = run_dtype(args, dtype, Path(tmp) / f"llama-{dtype}", sets, peak)
            report["results"].append(row)
            if "error" in row:
                print(f"{dtype}: not run: {row['error']}")
                continue
            print(f"{dtype}: export {row['export_s']}s on {row['provider']}; nodes per provider {row['placement']}; "
                  f"CUDA graph {'on' if row['cuda_graph']['enable'] else 'off'} ({row['cuda_graph']['reason']})")
            for line in row["attention_kernel_log"] or ["(no attention kernel line in the log)"]:
                print(f"  log: {line}")
            print(f"  {'prompt':>6} {'batch':>5} {'prefill ms':>10} {'decode ms':>10} {'tok/s':>8} {'GB/s':>7} {'util':>6}")
            for p in row["points"]:
                print(f"  {p['prompt']:>6} {p['batch']:>5} {p['prefill_ms']:>10} {p['decode_ms_per_step']:>10} "
                      f"{p['tokens_per_s']:>8} {p['achieved_GBps']:>7} {p['bandwidth_utilisation']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
