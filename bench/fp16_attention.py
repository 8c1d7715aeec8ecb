"""What running -O2's fused Attention in float32 costs a float16 model, on onnxruntime CPU.

`to-fp16` used to keep the fused Attention in float16 with softmax_precision=1; on
onnxruntime 1.31's CPU provider that kernel computes q.k in float16 anyway, so large
activations gave inf scores and NaN logits where -O0 stayed finite. It now runs the
op in float32 (q, k, v cast up, the output cast down). This benchmark times a small
LLaMA (hidden 512, 8 heads over 2 KV heads, 8 layers, vocab 8192) at -O2 in

* ``fp16 (fp32 attention)``: the new default,
* ``fp16 (half attention)``: ``to-fp16{half-attention=true}``, the old graph,
* ``fp32``: no conversion, for scale,

for prefill at sequence 128 and 512 and for one decode step after a 512-token KV cache.
All contenders share one process and alternate run by run (2 intra-op threads); it
prints medians, the ratio new / old, and `os.getloadavg()` (the machine is shared).

    python bench/fp16_attention.py [--repeats 15] [--seqs 128,512] [--past 512]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

MODEL = "llama"
SETS = {"d_model": "512", "num_layers": "8", "num_heads": "8", "num_kv_heads": "2", "d_ff": "1536",
        "vocab_size": "8192"}
CONTENDERS = {"fp16 (fp32 attention)": "to-fp16", "fp16 (half attention)": "to-fp16{half-attention=true}",
              "fp32": ""}


def session_for(cache: bool, conversion: str, threads: int):
    from tgraph.codegen.onnx import to_onnx
    from tgraph.dsl import trace
    from tgraph.passes import level_pipeline, optimize, parse_pipeline
    from tgraph.runtime import Session
    from tgraph.sources import load_model

    loaded = load_model(MODEL, {**SETS, "use_cache": "true" if cache else "false"})
    graph = trace(loaded.module, loaded.module.input_specs(), seed=0)
    optimize(graph, pipeline=parse_pipeline(level_pipeline(2)) + parse_pipeline(conversion))
    assert graph.op_histogram().get("Attention") == int(SETS["num_layers"]), graph.op_histogram()
    return Session(to_onnx(graph), providers="cpu", threads=threads)


def inputs_for(session, seq: int, past: int):
    from tgraph.runtime import make_random_inputs

    feeds = make_random_inputs(session, {"batch": 1, "seq": seq, "past_seq": past}, seed=0,
                               vocab_size=int(SETS["vocab_size"]))
    if past:
        feeds["position_ids"] = np.full((1, seq), past, np.int64)
    return feeds


def bench(cases, repeats: int):
    times = {name: [] for name in cases}
    for name, (sess, feeds) in cases.items():          # warm up
        sess.run(feeds)
    for _ in range(repeats):
        for name, (sess, feeds) in cases.items():      # alternate contenders run by run
            start = time.perf_counter()
            sess.run(feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seqs", default="128,512")
    ap.add_argument("--past", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"loadavg before: {os.getloadavg()}")
    rows = []
    prefill = {name: session_for(False, conv, args.threads) for name, conv in CONTENDERS.items()}
    for seq in (int(s) for s in args.seqs.split(",")):
        cases = {name: (s, inputs_for(s, seq, 0)) for name, s in prefill.items()}
        rows.append((f"prefill seq {seq}", bench(cases, args.repeats)))
    if args.past:
        decode = {name: session_for(True, conv, args.threads) for name, conv in CONTENDERS.items()}
        cases = {name: (s, inputs_for(s, 1, args.past)) for name, s in decode.items()}
        rows.append((f"decode 1 after {args.past}", bench(cases, args.repeats)))
    names = list(CONTENDERS)
    print(f"\nonnxruntime CPU, {args.threads} threads, batch 1, medians of {args.repeats} alternating runs (ms)")
    print(f"{'shape':<20}" + "".join(f"{n:>24}" for n in names) + f"{'new / old':>12}")
    for label, med in rows:
        ratio = med[names[0]] / med[names[1]]
        print(f"{label:<20}" + "".join(f"{med[n]:>24.2f}" for n in names) + f"{ratio:>12.2f}")
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
