"""Peak memory of exporting a big checkpoint: tgraph vs torch.onnx.export vs optimum-cli.

The checkpoint is TinyLlama-1.1B-shaped (hidden 2048, intermediate 5632, 22 layers, 32 heads /
4 KV heads, vocab 32000, untied head), fp32, random-initialised by transformers'
`LlamaForCausalLM` from a config and saved with `save_pretrained` (safetensors, ~4.4 GB). It
is made once under --checkpoint (default /tmp/tgraph-bench/tinyllama-1.1b) if missing.

Each contender runs in its own child process; its peak resident set (VmHWM, the kernel's
`ru_maxrss` of that child, from `os.wait4`) and wall time are recorded. Contenders alternate
round by round; the table shows medians. Target (issue 8, item 15): tgraph's peak RSS
<= 1 GiB + 2 x the largest tensor of the checkpoint, whatever the model's size.

* tgraph:      `tgraph export CKPT -o model.onnx` (-O2, fp32; > 1.8 GiB -> external data)
* torch.onnx:  `LlamaForCausalLM.from_pretrained(CKPT)` then `torch.onnx.export` (its default,
               dynamo=True, external data), input_ids [1, 16] with dynamic batch/sequence
* optimum:     `optimum-cli export onnx --model CKPT --task text-generation` from
               /work/benchvenvs/optimum (skipped when that venv is not ready)

The machine is shared: other processes change the timings (not the peaks much); the load
average is printed before and after.

    python bench/export_memory.py [--repeats 1] [--skip torch,optimum] [--checkpoint DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
OPTIMUM = Path("/work/benchvenvs/optimum")
CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)

MAKE = """
import sys, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(**{config})
with torch.no_grad():
    model = transformers.LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1], safe_serialization=True)
"""

TORCH_EXPORT = """
import sys, torch, transformers
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
model.config.use_cache = False
ids = torch.ones(1, 16, dtype=torch.long)
batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
with torch.no_grad():
    torch.onnx.export(model, (ids,), sys.argv[2], input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}}, external_data=True)
"""


def make_checkpoint(directory: Path) -> None:
    if (directory / "model.safetensors").is_file():
        return
    print(f"making {directory} (~4.4 GB, once)", flush=True)
    subprocess.run([sys.executable, "-c", MAKE.format(config=repr(CONFIG)), str(directory)], check=True)


def largest_tensor(directory: Path) -> Tuple[str, int, int]:
    """(name, bytes) of the biggest tensor and the total, read from the safetensors header."""
    with open(directory / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    name = max(sizes, key=sizes.get)
    return name, sizes[name], sum(sizes.values())


def run_child(argv: List[str], timeout: float) -> Tuple[Optional[float], Optional[int], str]:
    """(seconds, peak RSS bytes, status) of one child process: ru_maxrss from wait4 is that child's VmHWM."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            return None, usage.ru_maxrss * 1024, "timed out"
        time.sleep(0.2)
    took = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
    if proc.returncode != 0:
        return took, usage.ru_maxrss * 1024, f"failed ({proc.returncode}): {err[-1] if err else ''}"[:160]
    return took, usage.ru_maxrss * 1024, "ok"


def contenders(ckpt: Path, out: Path, skip: List[str]) -> Dict[str, Tuple[Path, List[str]]]:
    """label -> (its output directory, its command line)."""
    found = {"tgraph": (out / "tgraph", [sys.executable, "-m", "tgraph.cli", "export", str(ckpt), "-o",
                                         str(out / "tgraph" / "model.onnx")])}
    if "torch" not in skip:
        found["torch.onnx.export"] = (out / "torch", [sys.executable, "-c", TORCH_EXPORT, str(ckpt),
                                                      str(out / "torch" / "model.onnx")])
    optimum_ready = (OPTIMUM / "bin" / "optimum-cli").is_file() and any(
        "done" in p.read_text(errors="replace") for p in OPTIMUM.parent.glob("optimum*.log"))
    if "optimum" not in skip and optimum_ready:
        found["optimum-cli"] = (out / "optimum", [str(OPTIMUM / "bin" / "optimum-cli"), "export", "onnx", "--model",
                                                  str(ckpt), "--task", "text-generation", str(out / "optimum")])
    elif "optimum" not in skip:
        print(f"optimum-cli: skipped ({OPTIMUM} is not ready)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/tgraph-bench/tinyllama-1.1b")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip", default="", help="comma-separated: torch, optimum")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per contender run")
    args = parser.parse_args()
    ckpt = Path(args.checkpoint)
    make_checkpoint(ckpt)
    name, biggest, total = largest_tensor(ckpt)
    target = 2**30 + 2 * biggest
    print(f"checkpoint {ckpt}: {total / 2**30:.2f} GiB of weights, largest tensor {name} {biggest / 2**20:.0f} MiB")
    print(f"target: tgraph peak RSS <= 1 GiB + 2 x largest = {target / 2**30:.2f} GiB")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: Dict[str, List[Tuple[Optional[float], Optional[int], str]]] = {}
    with tempfile.TemporaryDirectory(prefix="tgraph-export-memory-", dir=ckpt.parent) as tmp:
        out = Path(tmp)
        runs = contenders(ckpt, out, [s.strip() for s in args.skip.split(",") if s.strip()])
        for r in range(args.repeats):
            for label, (where, argv) in runs.items():
                where.mkdir(parents=True, exist_ok=True)
                took, peak, status = run_child(argv, args.timeout)
                results.setdefault(label, []).append((took, peak, status))
                shown = f"{took:.1f} s" if took is not None else "-"
                print(f"  round {r + 1} {label}: peak {peak / 2**30:.2f} GiB, {shown}, {status}", flush=True)
                shutil.rmtree(where, ignore_errors=True)       # (4.4 GB each)
    base = statistics.median(p for _, p, s in results["tgraph"] if s == "ok") if any(
        s == "ok" for _, _, s in results["tgraph"]) else None
    print()
    print(f"| exporter | peak RSS (GiB) | peak / weights | peak / tgraph | wall (s) | status |")
    print(f"|---|---|---|---|---|---|")
    for label, rows in results.items():
        ok = [r for r in rows if r[2] == "ok"]
        use = ok or rows
        peak = statistics.median(p for _, p, _ in use)
        took = [t for t, _, _ in ok if t is not None]
        ratio = f"{peak / base:.1f}x" if base else "-"
        print(f"| {label} | {peak / 2**30:.2f} | {peak / total:.2f}x | {ratio} | "
              f"{statistics.median(took):.1f} | {use[-1][2] if not ok else f'ok ({len(ok)}/{len(rows)})'} |"
              if took else f"| {label} | {peak / 2**30:.2f} | {peak / total:.2f}x | {ratio} | - | {use[-1][2]} |")
    if base is not None:
        verdict = "met" if base <= target else "NOT met"
        print(f"\ntgraph peak {base / 2**30:.2f} GiB vs target {target / 2**30:.2f} GiB: {verdict}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
