"""Generated NumPy module vs onnx.reference.ReferenceEvaluator on the same exported model.

The paper's base Transformer (d_model 512, 8 heads, 6+6 layers) by default, or any MODEL
(`--model gpt2` for GPT-2 124M), batch 1, sequence 32, in one process, alternating runs;
prints medians and the ratio. Target: the generated module at least 2x faster than the
reference evaluator.

Note: this machine sets OPENBLAS_CORETYPE=Haswell, which slows NumPy matmuls (both
contenders use NumPy, so the ratio is fair; absolute times are pessimistic).

    python bench/numpy_vs_reference.py [--model transformer] [--repeats 5] [--seq 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--model", default="transformer",
                        help="any MODEL (default: the paper's base Transformer; e.g. gpt2 for GPT-2 124M)")
    args = parser.parse_args()

    from onnx.reference import ReferenceEvaluator

    from tgraph.api import build
    from tgraph.codegen.numpy import load_numpy_module, write_numpy_module
    from tgraph.codegen.onnx import to_onnx
    from tgraph.runtime import make_random_inputs

    built = build(args.model, level=args.level)
    graph = built.graph
    model_proto = to_onnx(graph)
    dims = {"batch": 1, "seq": args.seq, "decoder_seq": args.seq}
    inputs = make_random_inputs(model_proto, dims, seed=0, vocab_size=built.model.vocab_size)
    print(f"model: {args.model} ({graph.parameter_count():,} parameters, {len(graph.nodes)} nodes, "
          f"-O{args.level}), batch 1, seq {args.seq}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}")

    ref = ReferenceEvaluator(model_proto)
    with tempfile.TemporaryDirectory() as tmp:
        module = load_numpy_module(write_numpy_module(graph, Path(tmp) / "model.py"))
        module.run(inputs)                                  # load weights once (as any user would)
        times = {"numpy module": [], "ReferenceEvaluator": []}
        outs = {}
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs["numpy module"] = next(iter(module.run(inputs).values()))
            times["numpy module"].append(time.perf_counter() - t)
            t = time.perf_counter()
            outs["ReferenceEvaluator"] = ref.run(None, inputs)[0]
            times["ReferenceEvaluator"].append(time.perf_counter() - t)
    err = float(np.max(np.abs(outs["numpy module"] - outs["ReferenceEvaluator"])))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        print(f"  {name:<20} median {m * 1e3:8.1f} ms  (min {min(times[name]) * 1e3:.1f}, n={args.repeats})")
    ratio = med["ReferenceEvaluator"] / med["numpy module"]
    print(f"  speed-up of the generated module: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'}); "
          f"max abs diff {err:.2e}")


if __name__ == "__main__":
    main()
