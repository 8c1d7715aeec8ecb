"""Autoregressive decoding: tgraph's `Generator` vs Hugging Face `generate` (PyTorch eager).

GPT-2 124M (the default `GPT2Config`, random weights, seed 0) saved with `save_pretrained`,
on the CPU with 2 threads on both sides (torch.set_num_threads, onnxruntime intra-op
threads); batch 1, a prompt of 32 random ids, greedy, 64 new tokens, EOS disabled on both
sides so both emit exactly 64 tokens (checked). Runs alternate after one warm-up each; the
table holds medians over the runs of

* end-to-end tokens/s (64 / wall time of one `generate` call),
* prefill latency (start of the call -> first token chosen),
* per-token decode latency (median interval between consecutive tokens: tgraph's streaming
  callback; a LogitsProcessor on the HF side, which HF calls once per new token).

Weight-streaming limit: a decode step must read every weight it uses once, so its latency is
at least (bytes of weights read per token) / (memory bandwidth). The bytes are counted from
the initializers of the exported decoder and the nodes that consume them: a table read only
by Gather (token and position embeddings) costs one row per token; every other initializer
(layer weights, the LM head = the tied wte through a Transpose) is read whole. The KV cache
(a few MB) is not counted. The bandwidth is the best read rate measured over a 1 GiB array
before the runs and after every round (NumPy sum, NumPy copy counting read + write, an
OpenBLAS gemv, torch sum with the benchmark's threads): the strictest limit.
Targets: tgraph >= 3x HF tokens/s; decode latency <= 1.5x the streaming limit.

Note: this machine sets OPENBLAS_CORETYPE=Haswell, which picks NumPy's BLAS kernels (it
affects the gemv kernel, not the sums and copies); neither contender runs NumPy matmuls.
Other processes on the machine disturb the timings: the load average is printed.

    python bench/generate.py [--repeats 5] [--prompt 32] [--new 64] [--threads 2] [--levels 3,2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Dict, List

import numpy as np


# ------------------------------------------------------------------ memory bandwidth
class Bandwidth:
    """Read bandwidth in GB/s (1e9 bytes/s) of a few streaming kernels over a 1 GiB array.

    `measure()` keeps the best rate per kernel seen so far; the benchmark calls it before the
    runs and after every round, since this machine's bandwidth drifts with its neighbours' load.
    The limit uses the best of all: the strictest (lowest) streaming limit.
    """

    def __init__(self, threads: int, gib: float = 1.0):
        import torch

        self.a = np.arange(int(gib * 2**30) // 4, dtype=np.float32)    # distinct pages (no page sharing)
        self.b = np.empty_like(self.a)
        t = torch.from_numpy(self.a)
        matrix, vector = self.a.reshape(-1, 4096), np.ones(4096, np.float32)
        nbytes = self.a.nbytes
        self.kernels = {    # name -> (function, bytes moved)
            "numpy sum (1 thread)": (self.a.sum, nbytes),
            "numpy copy (read+write)": (lambda: np.copyto(self.b, self.a), 2 * nbytes),
            "numpy gemv (OpenBLAS)": (lambda: matrix @ vector, nbytes),
            f"torch sum ({threads} threads)": (t.sum, nbytes),
        }
        self.best: Dict[str, float] = {}

    def measure(self, repeats: int = 3) -> None:
        for name, (fn, nbytes) in self.kernels.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                rate = nbytes / (time.perf_counter() - start) / 1e9
                self.best[name] = max(self.best.get(name, 0.0), rate)

    @property
    def gbps(self) -> float:
        return max(self.best.values())


# ------------------------------------------------------------------ bytes per decode token
def weight_bytes_per_token(model) -> Dict[str, int]:
    """Bytes of initializers one decode token (batch 1) reads, from the ONNX model's consumers.

    An initializer used only as a Gather's data costs one row per token (the token and position
    embeddings); any other use (MatMul, a Transpose feeding the LM head, norms, biases) reads it
    whole. Returns {"read": bytes, "gather_rows": bytes, "total": bytes of all initializers}.
    """
    import onnx

    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    row = {t.name: (sizes[t.name] // t.dims[0] if t.dims else sizes[t.name]) for t in model.graph.initializer}
    uses: Dict[str, List[str]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in sizes:
                uses.setdefault(name, []).append("gather" if node.op_type == "Gather" and slot == 0 else "full")
    read = sum(sizes[n] for n, u in uses.items() if "full" in u)
    rows = sum(row[n] for n, u in uses.items() if "full" not in u)
    return {"read": read, "gather_rows": rows, "total": sum(sizes.values())}


# ------------------------------------------------------------------ contenders
class Timed:
    """Times of one generate call: start, one stamp per new token, end."""

    def __init__(self):
        self.stamps: List[float] = []
        self.start = self.end = 0.0

    def stamp(self, *_):
        self.stamps.append(time.perf_counter())

    @property
    def prefill(self) -> float:
        return self.stamps[0] - self.start

    @property
    def decode_steps(self) -> List[float]:
        return list(np.diff(self.stamps))

    @property
    def seconds(self) -> float:
        return self.end - self.start


def run_tgraph(gen, prompt: List[int], new: int):
    timed = Timed()
    timed.start = time.perf_counter()
    result = gen.generate([prompt], max_new_tokens=new, callback=timed.stamp)
    timed.end = time.perf_counter()
    return result.ids[0], timed


def run_hf(model, prompt: List[int], new: int):
    import torch
    import transformers

    timed = Timed()

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            timed.stamp()
            return scores

    ids = torch.tensor([prompt], dtype=torch.long)
    timed.start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0,
                             logits_processor=transformers.LogitsProcessorList([Stamp()]))
    timed.end = time.perf_counter()
    return out[0, len(prompt):].tolist(), timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length (random ids)")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="3,2", help="tgraph -O levels to run (the first is the headline)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import onnxruntime as ort
    import torch
    import transformers

    from tgraph.api import build
    from tgraph.codegen.onnx import to_onnx
    from tgraph.generate import Generator

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, onnxruntime {ort.__version__}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}")
    bandwidth = Bandwidth(args.threads)
    bandwidth.measure(repeats=5)

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.generation_config.eos_token_id = None          # EOS disabled: exactly `new` tokens
    prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, args.prompt).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        gens = {f"tgraph -O{lv}": Generator(tmp, level=lv, provider="cpu", threads=args.threads,
                                            eos_token_id=None, pad_token_id=0) for lv in levels}
        decoder = to_onnx(build(tmp, {"use_cache": "true"}, level=levels[0]).graph)
    counted = weight_bytes_per_token(decoder)
    print(f"model: GPT-2 124M ({sum(p.numel() for p in hf.parameters()):,} parameters), batch 1, prompt "
          f"{args.prompt}, {args.new} new tokens, greedy, {args.threads} threads; provider "
          f"{next(iter(gens.values())).provider}")
    print(f"weights read per decode token: {counted['read'] / 1e6:.1f} MB (of {counted['total'] / 1e6:.1f} MB of "
          f"initializers; embedding tables read only by Gather count one row: {counted['gather_rows']} B)")

    contenders = {**{name: (lambda g=g: run_tgraph(g, prompt, args.new)) for name, g in gens.items()},
                  "HF eager": lambda: run_hf(hf, prompt, args.new)}
    outputs = {name: run() for name, run in contenders.items()}            # warm-up
    runs: Dict[str, List[Timed]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            ids, timed = run()
            assert ids == outputs[name][0], f"{name}: greedy output changed between runs"
            runs[name].append(timed)
        bandwidth.measure()
    bw = bandwidth.gbps
    limit = counted["read"] / (bw * 1e9)
    print("memory bandwidth, best over the run (1 GiB array):  " +
          "; ".join(f"{k} {v:.1f}" for k, v in bandwidth.best.items()) + f" GB/s -> using {bw:.1f} GB/s: "
          f"streaming limit {counted['read'] / 1e6:.1f} MB / {bw:.1f} GB/s = {limit * 1e3:.2f} ms/token")

    lengths = {name: len(ids) for name, (ids, _) in outputs.items()}
    assert all(n == args.new for n in lengths.values()), f"not {args.new} tokens each: {lengths}"
    same = all(ids == outputs["HF eager"][0] for ids, _ in outputs.values())
    print(f"every contender generated exactly {args.new} tokens; tgraph ids identical to HF's: "
          f"{'yes' if same else 'no'}")
    if not same:
        for name, (ids, _) in outputs.items():
            print(f"  {name}: {ids[:16]} ...")

    med = {}
    for name, timed in runs.items():
        med[name] = {
            "tok/s": statistics.median(args.new / t.seconds for t in timed),
            "prefill": statistics.median(t.prefill for t in timed),
            "decode": statistics.median(statistics.median(t.decode_steps) for t in timed),
        }
    hf_rate = med["HF eager"]["tok/s"]
    print(f"\nmedians over {args.repeats} alternating runs (after one warm-up each):")
    print(f"  {'':<12} {'tokens/s':>9} {'vs HF':>7} {'prefill ms':>11} {'decode ms/tok':>14} {'vs limit':>9}")
    for name, m in med.items():
        print(f"  {name:<12} {m['tok/s']:9.2f} {m['tok/s'] / hf_rate:6.2f}x {m['prefill'] * 1e3:11.1f} "
              f"{m['decode'] * 1e3:14.2f} {m['decode'] / limit:8.2f}x")
    print(f"  {'stream limit':<12} {'':>9} {'':>7} {'':>11} {limit * 1e3:14.2f} {1:8.2f}x")
    for name, timed in runs.items():
        print(f"  {name} tokens/s per run: {', '.join(f'{args.new / t.seconds:.1f}' for t in timed)}")
    head = next(iter(gens))
    speed, ratio = med[head]["tok/s"] / hf_rate, med[head]["decode"] / limit
    print(f"\n{head}: {speed:.2f}x HF eager tokens/s (target >= 3x: {'met' if speed >= 3 else 'NOT met'}); "
          f"decode {ratio:.2f}x the weight-streaming limit (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
