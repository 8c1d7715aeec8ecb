"""Which static-KV-cache attention should tgraph emit for onnxruntime's CPU provider?

One decode step of the attention alone (12 layers, the LLaMA-shaped config of issue 9:
12 query heads, 4 KV heads, head_dim 64), three contenders in one process, alternating,
medians of the per-step time:

* concat    today's dynamic cache: Concat(past, new) outside Attention-23 with a bool
            [B, 1, 1, P+1] padding mask; onnxruntime allocates a new present every step.
* gqa       com.microsoft.GroupQueryAttention: past and present share one preallocated
            [B, kv, max_len, D] buffer (bound to the same OrtValue), per-row seqlens_k.
* gqa_rope  the same with do_rotary=1 (rotary inside the op: what the LLaMA graph needs).
* std24     standard opset 24: TensorScatter(past, new, write_indices) into the static
            buffer (present bound to past's OrtValue) + Attention-24(nonpad_kv_seqlen).

Usage: .venv/bin/python bench/static_cache.py [--reps 30] [--max-length 2048]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

LAYERS, HEADS, KV, D = 12, 12, 4, 64
F = np.float32


def _vi(name, elem=T.FLOAT):
    return h.make_tensor_value_info(name, elem, None)


def build(kind: str) -> bytes:
    nodes, ins, outs, inits = [], [_vi("q"), _vi("k"), _vi("v")], [], []
    if kind == "concat":
        ins.append(_vi("mask", T.BOOL))
    elif kind.startswith("gqa"):
        ins += [_vi("seqlens_k", T.INT32), _vi("total_seq", T.INT32)]
        if kind == "gqa_rope":
            ins += [_vi("cos"), _vi("sin")]
    else:
        ins += [_vi("write_idx", T.INT64), _vi("nonpad", T.INT64)]
    for i in range(LAYERS):
        pk, pv, ok, ov, y = f"past_k{i}", f"past_v{i}", f"present_k{i}", f"present_v{i}", f"y{i}"
        ins += [_vi(pk), _vi(pv)]
        outs += [_vi(y), _vi(ok), _vi(ov)]
        if kind == "concat":
            nodes += [h.make_node("Reshape", ["k", "shape4"], [f"k4_{i}"]),
                      h.make_node("Transpose", [f"k4_{i}"], [f"kt{i}"], perm=[0, 2, 1, 3]),
                      h.make_node("Reshape", ["v", "shape4"], [f"v4_{i}"]),
                      h.make_node("Transpose", [f"v4_{i}"], [f"vt{i}"], perm=[0, 2, 1, 3]),
                      h.make_node("Concat", [pk, f"kt{i}"], [ok], axis=2),
                      h.make_node("Concat", [pv, f"vt{i}"], [ov], axis=2),
                      h.make_node("Attention", ["q4", ok, ov, "mask"], [y], q_num_heads=HEADS, kv_num_heads=KV)]
        elif kind.startswith("gqa"):
            extra = ["cos", "sin"] if kind == "gqa_rope" else []
            nodes.append(h.make_node("GroupQueryAttention", ["q", "k", "v", pk, pv, "seqlens_k", "total_seq", *extra],
                                     [y, ok, ov], domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV,
                                     do_rotary=int(kind == "gqa_rope")))
        else:
            nodes += [h.make_node("Reshape", ["k", "shape4"], [f"k4_{i}"]),
                      h.make_node("Transpose", [f"k4_{i}"], [f"kt{i}"], perm=[0, 2, 1, 3]),
                      h.make_node("Reshape", ["v", "shape4"], [f"v4_{i}"]),
                      h.make_node("Transpose", [f"v4_{i}"], [f"vt{i}"], perm=[0, 2, 1, 3]),
                      h.make_node("TensorScatter", [pk, f"kt{i}", "write_idx"], [ok], axis=2),
                      h.make_node("TensorScatter", [pv, f"vt{i}", "write_idx"], [ov], axis=2),
                      h.make_node("Attention", ["q4", ok, ov, "", "", "", "nonpad"], [y],
                                  q_num_heads=HEADS, kv_num_heads=KV, is_causal=0)]
    if kind in ("concat", "std24"):                       # 4-D attention: [B, H, T, D] everywhere
        inits += [h.make_tensor("shape4", T.INT64, [4], [0, 0, KV, D]),
                  h.make_tensor("qshape4", T.INT64, [4], [0, 0, HEADS, D])]
        nodes[:0] = [h.make_node("Reshape", ["q", "qshape4"], ["q4r"]),
                     h.make_node("Transpose", ["q4r"], ["q4"], perm=[0, 2, 1, 3])]
    opsets = [h.make_opsetid("", 24)] + ([h.make_opsetid("com.microsoft", 1)] if kind.startswith("gqa") else [])
    model = h.make_model(h.make_graph(nodes, kind, ins, outs, inits), opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


class Contender:
    def __init__(self, kind, batch, past, max_len, threads):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.kind, self.sess = kind, ort.InferenceSession(build(kind), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        q = rng.standard_normal((batch, 1, HEADS * D), dtype=F)
        kv = rng.standard_normal((batch, 1, KV * D), dtype=F)
        feeds = {"q": q, "k": kv, "v": kv}
        if kind == "concat":
            feeds["mask"] = np.ones((batch, 1, 1, past + 1), bool)
            cache_len = past
        elif kind.startswith("gqa"):
            feeds["seqlens_k"] = np.full(batch, past, np.int32)
            feeds["total_seq"] = np.array(past + 1, np.int32)
            if kind == "gqa_rope":
                feeds["cos"] = rng.standard_normal((max_len, D // 2), dtype=F)
                feeds["sin"] = rng.standard_normal((max_len, D // 2), dtype=F)
            cache_len = max_len
        else:
            feeds["write_idx"] = np.full(batch, past, np.int64)
            feeds["nonpad"] = np.full(batch, past + 1, np.int64)
            cache_len = max_len
        self.binding = self.sess.io_binding()
        for name, arr in feeds.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        self.keep = []
        for i in range(LAYERS):
            for kv_kind in ("k", "v"):
                buf = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((batch, KV, cache_len, D), dtype=F))
                self.keep.append(buf)
                self.binding.bind_ortvalue_input(f"past_{kv_kind}{i}", buf)
                if kind == "concat":
                    self.binding.bind_output(f"present_{kv_kind}{i}")          # a fresh [B, kv, P+1, D]
                else:
                    self.binding.bind_ortvalue_output(f"present_{kv_kind}{i}", buf)   # in place
            self.binding.bind_output(f"y{i}")

    def step(self) -> float:
        t = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    kinds = ["concat", "gqa", "gqa_rope", "std24"]
    print(f"attention only, {LAYERS} layers, {HEADS}/{KV} heads, head_dim {D}, static buffers of "
          f"{args.max_length}, {args.threads} threads, onnxruntime {ort.__version__}; loadavg {os.getloadavg()}")
    print(f"{'batch':>5} {'past':>5} " + " ".join(f"{k + ' ms':>12}" for k in kinds) + "   vs concat")
    for batch, past in ((1, 32), (1, 1024), (8, 32)):
        cs = [Contender(k, batch, past, args.max_length, args.threads) for k in kinds]
        times = {k: [] for k in kinds}
        for c in cs:
            c.step()
        for _ in range(args.reps):
            for c in cs:                                   # contenders alternate
                times[c.kind].append(c.step())
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratios = " ".join(f"{k}={med['concat'] / med[k]:.2f}x" for k in kinds[1:])
        print(f"{batch:>5} {past:>5} " + " ".join(f"{med[k]:>12.3f}" for k in kinds) + f"   {ratios}")
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
