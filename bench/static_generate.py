"""tgraph's static KV cache (a generation directory) vs its dynamic Concat cache, and the
directory's start-up vs its export time.

The LLaMA-shaped random model of issue 9 (hidden 768, 12 layers, 12 heads / 4 KV heads,
intermediate 3072, vocab 32000; fp32), onnxruntime CPU with 2 threads, greedy. Contenders
alternate within each repetition; medians. Decode ms/step is the median time between
consecutive tokens; prefill is the time to the first token.

    .venv/bin/python bench/static_generate.py [--reps 2] [--new 64] [--points p32b1,p1024b1,p32b8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA = {"d_model": "768", "num_layers": "12", "num_heads": "12", "num_kv_heads": "4", "d_ff": "3072",
         "vocab_size": "32000"}


def sets(d):
    return [x for k, v in d.items() for x in ("--set", f"{k}={v}")]


def timed_stream(gen, prompts, new):
    from tgraph.sampling import SamplingConfig

    marks = [time.perf_counter()]
    for _ in gen.stream(prompts, new, SamplingConfig()):
        marks.append(time.perf_counter())
    steps = np.diff(marks)
    return steps[0], float(np.median(steps[1:])) if len(steps) > 1 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--points", default="p32b1,p1024b1,p32b8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tgraph = [str(ROOT / ".venv" / "bin" / "tgraph")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "llama-gen"
        t = time.perf_counter()
        subprocess.run(tgraph + ["export", "llama", *sets(LLAMA), "--task", "generate", "-o", str(out),
                                 "--max-length", "2048"], check=True, stdout=subprocess.DEVNULL)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from tgraph.generate import Generator; "
                        f"Generator(sys.argv[1], provider='cpu', threads={args.threads})", str(out)],
                       check=True, cwd=str(ROOT))
        startup_s = time.perf_counter() - t
        print(f"export --task generate: {export_s:.2f}s; Generator(DIR) start-up in a fresh process: "
              f"{startup_s:.2f}s ({startup_s / export_s:.2f}x the export; target <= 0.75x); loadavg {os.getloadavg()}")

        from tgraph.generate import Generator

        contenders = {
            "static (DIR)": Generator(str(out), provider="cpu", threads=args.threads),
            "dynamic -O3": Generator("llama", overrides=LLAMA, provider="cpu", threads=args.threads,
                                     kv_cache="dynamic"),
        }
        rng = np.random.default_rng(0)
        print(f"{'point':>8} {'contender':>14} {'prefill ms':>11} {'decode ms/step':>15} {'tokens/s (decode)':>18}")
        for point in args.points.split(","):
            prompt, batch = (int(x) for x in point[1:].split("b"))
            prompts = [rng.integers(3, 32000, prompt).tolist() for _ in range(batch)]
            results = {name: [] for name in contenders}
            ids = {}
            for _ in range(args.reps):
                for name, gen in contenders.items():                     # alternate
                    results[name].append(timed_stream(gen, prompts, args.new))
                    ids[name] = gen.generate(prompts[:1], 8).ids[0] if name not in ids else ids[name]
            for name, rows in results.items():
                pre = statistics.median(r[0] for r in rows) * 1e3
                dec = statistics.median(r[1] for r in rows) * 1e3
                print(f"{point:>8} {name:>14} {pre:>11.1f} {dec:>15.2f} {batch * 1e3 / dec:>18.1f}")
            same = len({tuple(v) for v in ids.values()}) == 1
            print(f"{point:>8} static/dynamic decode speed: "
                  f"{statistics.median(r[1] for r in results['dynamic -O3']) / statistics.median(r[1] for r in results['static (DIR)']):.2f}x; "
                  f"same greedy ids: {same}; loadavg {os.getloadavg()}")


if __name__ == "__main__":
    main()
