"""Where a static-cache decode step's time goes: two decoders, one process, one feeding loop.

    python bench/decode_profile.py --model tgraph=DIR_A/model.onnx --model genai=DIR_B/model.onnx
        [--prompt 32] [--batch 1] [--steps 64] [--threads 2] [--rounds 3]

Both graphs have the static-cache interface (input_ids, attention_mask [batch, width],
past_key_values.* bound as their own present.*, logits), so one loop feeds both the same way:
every buffer bound once to an OrtValue, a step only rewrites ids and mask in place (the way
tgraph's StaticDecoder and onnxruntime-genai run them). Per model and step it reports:

    wall      the Python-side time of one run_with_iobinding call (median; p10 too, which a
              loaded machine disturbs less)
    run       onnxruntime's own `model_run` event (enable_profiling)
    kernels   the sum of its node events, per op type (the top ones printed)
    overhead  run - kernels: the executor between kernels; wall - run: binding and the call
    CPU time  the process's CPU seconds per step (all threads; with --no-spinning, work done)

Models alternate step by step, the first of each round rotating (a fixed order measurably
favours the later ones), so machine load hits all alike. Standard library
+ NumPy + onnxruntime only, so it runs in any venv (onnxruntime-genai's venv has a different
onnxruntime version than tgraph's: run it under both to separate graph from runtime version).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np


def _elem(onnx_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}[onnx_type]


class Bound:
    """One decoder on fixed buffers, profiled."""

    def __init__(self, name: str, path: str, batch: int, max_length: int, threads: int, profile_dir: str,
                 config=(), spinning: bool = True, profile: bool = True):
        import onnxruntime as ort

        self.name, self.ort = name, ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling = profile                 # it slows every step: --wall-only for timing
        so.profile_file_prefix = os.path.join(profile_dir, name)
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in config:
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        self.batch, self.max_length = batch, max_length
        self.arrays, self.values = {}, {}
        for n, spec in ins.items():
            if n.startswith("past_key_values."):
                heads, dim = spec.shape[1], spec.shape[3]
                if not isinstance(dim, int):          # genai's builder leaves it symbolic
                    dim = json.load(open(os.path.join(os.path.dirname(path), "genai_config.json"))
                                    )["model"]["decoder"]["head_size"]
                self._value(n, np.zeros((batch, heads, max_length, dim), _elem(spec.type)))
        vocab = outs["logits"].shape[-1]
        self.ids_dtype = _elem(ins["input_ids"].type)
        self.mask_dtype = _elem(ins["attention_mask"].type)
        self._value("logits", np.zeros((batch, 1, vocab), _elem(outs["logits"].type)))
        self._value("input_ids", np.zeros((batch, 1), self.ids_dtype))
        self._value("attention_mask", np.zeros((batch, max_length), self.mask_dtype))
        self.pairs = [(n, "present." + n[len("past_key_values."):]) for n in ins if n.startswith("past_key_values.")]
        self.decode_binding = self._binding(self.values["input_ids"], self.values["attention_mask"],
                                            self.values["logits"])
        self.walls, self.cpus = [], []

    def _value(self, key, array):
        self.arrays[key] = array
        self.values[key] = self.ort.OrtValue.ortvalue_from_numpy(array)

    def _binding(self, ids, mask, logits):
        b = self.session.io_binding()
        b.bind_ortvalue_input("input_ids", ids)
        b.bind_ortvalue_input("attention_mask", mask)
        for past, present in self.pairs:
            b.bind_ortvalue_input(past, self.values[past])
            b.bind_ortvalue_output(present, self.values[past])
        if logits is None:
            b.bind_output("logits")
        else:
            b.bind_ortvalue_output("logits", logits)
        return b

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        for past, _ in self.pairs:
            self.arrays[past][:] = 0
        ids = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(prompt, self.ids_dtype))
        mask = self.ort.OrtValue.ortvalue_from_numpy(np.ones(prompt.shape, self.mask_dtype))
        b = self._binding(ids, mask, None)                     # prefill logits may be [B, S, V]
        self.session.run_with_iobinding(b)
        self.length = prompt.shape[1]
        self.arrays["attention_mask"][:] = 0
        self.arrays["attention_mask"][:, :self.length] = 1
        return b.get_outputs()[-1].numpy()[:, -1, :]            # logits is bound last

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.arrays["input_ids"][:, 0] = tokens
        self.arrays["attention_mask"][:, self.length] = 1
        self.length += 1
        start, cpu = time.perf_counter(), time.process_time()
        self.session.run_with_iobinding(self.decode_binding)
        self.walls.append(time.perf_counter() - start)
        self.cpus.append(time.process_time() - cpu)
        return self.arrays["logits"][:, 0, :]

    def end_profile(self) -> str:
        return self.session.end_profiling()


def summarise(path: str, steps: int):
    """Per decode step: median model_run, mean kernel time per op type, node count per run."""
    events = json.load(open(path))
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    decode_runs = [r for r in runs if r["dur"] > 0][-steps:]
    lo = decode_runs[0]["ts"]
    per_op, count = collections.defaultdict(float), collections.Counter()
    for e in nodes:
        if e["ts"] >= lo:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
    n = len(decode_runs)
    return (statistics.median(r["dur"] for r in decode_runs) / 1000.0,
            {op: t / n / 1000.0 for op, t in per_op.items()}, {op: c // n for op, c in count.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="a session config entry for model NAME (e.g. base:session.disable_prepacking=1)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=1280)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-spinning", action="store_true",
                   help="threads sleep instead of spinning, so CPU time is work done (a loaded machine "
                        "inflates wall time by its time slicing, CPU time much less)")
    p.add_argument("--wall-only", action="store_true",
                   help="no onnxruntime profiling (its events cost time every step): wall and CPU time only")
    args = p.parse_args(argv)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"prompt {args.prompt}, batch {args.batch}, {args.steps} decode steps, {args.threads} threads")
    tmp = tempfile.mkdtemp(prefix="decode-profile-")
    models = []
    for item in args.model:
        name, _, path = item.partition("=")
        config = [tuple(c.split(":", 1)[1].split("=", 1)) for c in args.config if c.split(":", 1)[0] == name]
        models.append(Bound(name, path, args.batch, args.max_length, args.threads, tmp, config,
                            spinning=not args.no_spinning, profile=not args.wall_only))
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(3, 32000, size=(args.batch, args.prompt))
    tokens = {}
    for m in models:
        tokens[m.name] = m.prefill(prompt).argmax(-1)
    ids = {m.name: [] for m in models}
    for step in range(args.steps):
        k = step % len(models)                          # rotate who goes first: the order itself biases
        for m in models[k:] + models[:k]:
            t = m.step(tokens[m.name]).argmax(-1)
            tokens[m.name] = t
            ids[m.name].append(int(t[0]))
    first = models[0].name
    for m in models:
        same = ids[m.name] == ids[first]
        wall = statistics.median(m.walls) * 1000.0
        low = sorted(m.walls)[len(m.walls) // 10] * 1000.0       # p10: nearer the uncontended time under load
        least = min(m.walls) * 1000.0
        cpu = statistics.median(m.cpus) * 1000.0
        if args.wall_only:
            print(f"\n{m.name}: ids {'==' if same else '!='} {first}'s\n  wall {wall:7.2f} ms/step "
                  f"(p10 {low:7.2f}, min {least:7.2f}; CPU time {cpu:7.2f})")
            continue
        run_ms, per_op, count = summarise(m.end_profile(), args.steps)
        kernels = sum(per_op.values())
        print(f"\n{m.name}: {sum(count.values())} kernel launches per step; ids {'==' if same else '!='} {first}'s")
        print(f"  wall {wall:7.2f} ms/step (p10 {low:7.2f}, min {least:7.2f}; CPU time {cpu:7.2f})   model_run {run_ms:7.2f}   kernels {kernels:7.2f}   "
              f"executor {run_ms - kernels:6.2f}   call+binding {wall - run_ms:6.2f}")
        for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    {op:32s} {t:7.3f} ms  x{count[op]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
