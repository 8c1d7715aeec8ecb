"""Generation side by side: tgraph vs onnxruntime-genai vs optimum vs HF eager, one run, alternating.

The model: a random-initialised LLaMA-shaped checkpoint (transformers LlamaForCausalLM from a
config: hidden 768, 12 layers, 12 heads / 4 KV heads, intermediate 3072, vocab 32000, 2048
positions, untied LM head; ~153M parameters, fp32, seed 0) saved with `save_pretrained`
(safetensors) and a word-level tokenizer.json (onnxruntime-genai's builder insists on one; the
prompts are random ids with a fixed seed, so no contender tokenizes anything).

Points (greedy, EOS disabled so every row emits all its tokens, 2 intra-op threads for all):
    p32    prompt 32   -> 128 new, batch 1
    p1024  prompt 1024 -> 128 new, batch 1
    p32b8  prompt 32   -> 128 new, batch 8 (same-length prompts)

Contenders (each in its own process, so peak RSS is its own; JSON lines, bench/peers/):
    tgraph        tgraph.generate.Generator in --tgraph-python (default: this python). When
                  that tgraph's CLI has `export --task generate`, it runs the generation directory
                  `tgraph export CKPT --task generate -o DIR` writes; otherwise the checkpoint
                  (today's engine traces and exports it in the process: its build time).
    tgraph-O<n>   the same at -O<n>
    tgraph-int4   `--task generate --quantize int4 --block-size 32` (tgraph's default: asymmetric,
                  with zero points); tgraph-int4-sym adds `--symmetric`. "not available" until the
                  CLI has those options
    genai         onnxruntime-genai's model builder `-p fp32 -e cpu` + its Generator loop
    genai-int4    the builder's `-p int4 -e cpu` (block_size=32, its defaults: symmetric, accuracy_level 4);
                  genai-int4-asym adds is_symmetric=false. Each tgraph int4 is compared with the genai
                  int4 of its own format (zero points cost MatMulNBits ~7% per step on this CPU).
    optimum       `optimum-cli export onnx --task text-generation-with-past` + ORTModelForCausalLM
    hf            transformers eager (torch), the reference for greedy ids

Timing: every contender stamps the clock once per new token (tgraph's callback, genai's
generate_next_token, a LogitsProcessor for HF/optimum). prefill = start of the call -> first
token; decode ms/step = median interval between consecutive tokens; per point, each figure is
the median over the repeats (after one short warm-up run each: 8 tokens at the same shape);
contenders alternate round-robin and the order rotates every repeat. tokens/s = batch x 1000 /
decode ms/step (the decode rate the issue targets compare); e2e tokens/s = batch x new / wall time of the whole call.

Weight-streaming floor: a decode step reads every weight it uses once (an embedding table read
by Gather: one row per token) plus the valid part of the KV cache (fp32, the mean context of the
decode steps). Bytes are counted from each contender's own ONNX file (its initializers and their
consumers) or, for the checkpoint-run contenders, from the safetensors header. Divided by the
best memory bandwidth measured in this run (NumPy sum, NumPy copy counting read + write, torch
sum with the benchmark's threads, over a 512 MiB array; measured before the points and after every
round), it is the floor each contender's decode ms/step is compared with.

Exports are cached in --workdir (keyed by checkpoint, tool version and options; tgraph's by a hash
of its source files), so a rerun only measures. Build/export times are reported separately.

    .venv/bin/python bench/generate.py [--points p32,p1024,p32b8] [--repeats 5]
        [--contenders tgraph,tgraph-int4,tgraph-int4-sym,genai,genai-int4,genai-int4-asym,optimum,hf]
        [--quick]
        [--tgraph-python /work/wt/h6-gen/.venv/bin/python] [--workdir DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
GENAI_PYTHON = "/work/benchvenvs/genai/bin/python"
OPTIMUM_PYTHON = "/work/benchvenvs/optimum/bin/python"

LLAMA_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                    intermediate_size=3072, vocab_size=32000, max_position_embeddings=2048,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
DEFAULT_CONTENDERS = "tgraph,tgraph-int4,tgraph-int4-sym,genai,genai-int4,genai-int4-asym,optimum,hf"
REFERENCE = "hf"
WARMUP_TOKENS = 8           # the warm-up run per contender and point: same prompts, this many tokens
FP32_BASELINE = "genai"


# ------------------------------------------------------------------ points and order
@dataclass(frozen=True)
class Point:
    name: str
    prompt: int
    batch: int
    new: int

    def describe(self) -> str:
        return f"prompt {self.prompt} -> {self.new} new, batch {self.batch}"


POINT_RE = re.compile(r"^p(\d+)(?:b(\d+))?$")


def parse_points(text: str, new: int) -> List[Point]:
    """`p32,p1024,p32b8` -> Points (pPROMPT[bBATCH], batch 1 when omitted)."""
    points = []
    for item in (t.strip() for t in text.split(",")):
        match = POINT_RE.match(item)
        if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
            raise SystemExit(f"--points: {item!r} is not pPROMPT or pPROMPTbBATCH (e.g. p32, p1024, p32b8)")
        points.append(Point(item, int(match.group(1)), int(match.group(2) or 1), new))
    return points


def round_order(names: Sequence[str], round_index: int) -> List[str]:
    """Round-robin order of round `round_index`: rotated by one each round, so no contender
    always runs first (right after the bandwidth measurement) or right after the same neighbour."""
    if not names:
        return []
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def prompts_for(point: Point, vocab: int, seed: int) -> List[List[int]]:
    """Random prompt ids, fixed per (seed, prompt length): row 0 is the same at every batch size."""
    rng = np.random.default_rng([seed, point.prompt])
    return rng.integers(3, vocab, (point.batch, point.prompt)).tolist()    # 0-2 are unk/bos/eos


# ------------------------------------------------------------------ results of runs
@dataclass
class Run:
    ids: List[List[int]]
    prefill_s: float
    steps_s: List[float]
    total_s: float
    peak_rss: int


def parse_run(reply: dict, point: Point) -> Run:
    """A runner's "run" reply -> Run; refuses replies that did not produce every token."""
    stamps = reply["stamps"]
    ids = reply["ids"]
    if len(stamps) != point.new:
        raise ValueError(f"{len(stamps)} token stamps for {point.new} new tokens")
    if len(ids) != point.batch or any(len(row) != point.new for row in ids):
        raise ValueError(f"ids of shape {[len(r) for r in ids]}, expected {point.batch} rows of {point.new}")
    return Run(ids=ids, prefill_s=stamps[0] - reply["start"], steps_s=list(np.diff(stamps)),
               total_s=reply["end"] - reply["start"], peak_rss=int(reply.get("peak_rss_bytes", 0)))


@dataclass
class Summary:
    prefill_ms: float
    decode_ms: float          # per step
    tokens_per_s: float       # decode rate: batch / step time
    e2e_tokens_per_s: float
    peak_rss_mb: float
    decode_spread: Tuple[float, float]


def summarise(runs: Sequence[Run], point: Point) -> Summary:
    """Medians over runs: prefill, per-run median decode step, e2e rate; peak RSS is the max."""
    decode = [statistics.median(r.steps_s) for r in runs] if point.new > 1 else [float("nan")]
    decode_ms = statistics.median(decode) * 1e3
    return Summary(prefill_ms=statistics.median(r.prefill_s for r in runs) * 1e3, decode_ms=decode_ms,
                   tokens_per_s=point.batch * 1e3 / decode_ms,
                   e2e_tokens_per_s=statistics.median(point.batch * point.new / r.total_s for r in runs),
                   peak_rss_mb=max(r.peak_rss for r in runs) / 2**20,
                   decode_spread=(min(decode) * 1e3, max(decode) * 1e3))


def first_divergence(reference: List[List[int]], ids: List[List[int]]) -> Optional[Tuple[int, int, int, int]]:
    """(row, step, reference id, id) of the first differing token (row-major), None if identical."""
    for row, (a, b) in enumerate(zip(reference, ids)):
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return row, step, x, y
        if len(a) != len(b):
            n = min(len(a), len(b))
            return row, n, a[n] if n < len(a) else -1, b[n] if n < len(b) else -1
    if len(reference) != len(ids):
        return min(len(reference), len(ids)), 0, -1, -1
    return None


def describe_ids(reference_name: str, reference: Optional[List[List[int]]], ids: List[List[int]]) -> str:
    if reference is None:
        return "(no reference)"
    where = first_divergence(reference, ids)
    if where is None:
        return f"= {reference_name}"
    row, step, want, got = where
    return f"differs: row {row} step {step} ({reference_name} {want}, here {got})"


# ------------------------------------------------------------------ bytes and bandwidth
ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2,
                 21: 1, 22: 1}          # float, uint8, int8, uint16, int16, int32, int64, bool, f16, f64, ...
GATHER_OPS = {"Gather", "GatherBlockQuantized"}
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                        "U8": 1, "BOOL": 1}


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def weight_bytes_onnx(model) -> Dict[str, int]:
    """Bytes of initializers one decode token reads, from an ONNX ModelProto (external data not needed).

    An initializer used only as a Gather's data (slot 0) costs one row per token; any other use
    reads it whole. int4 tensors (MatMulNBits stores uint8 blobs) count their stored bytes.
    Returns {"read": bytes read whole, "row": bytes per gathered row, "total": all initializers}.
    """
    sizes, rows = {}, {}
    graphs = [model.graph]
    for graph in graphs:
        for t in graph.initializer:
            itemsize = ONNX_ITEMSIZE.get(t.data_type, 4)
            sizes[t.name] = _numel(t.dims) * itemsize
            rows[t.name] = sizes[t.name] // int(t.dims[0]) if len(t.dims) > 0 and t.dims[0] else sizes[t.name]
    uses: Dict[str, set] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in sizes:
                uses.setdefault(name, set()).add("gather" if node.op_type in GATHER_OPS and slot == 0 else "full")
    read = sum(sizes[n] for n, u in uses.items() if "full" in u)
    row = sum(rows[n] for n, u in uses.items() if "full" not in u)
    return {"read": read, "row": row, "total": sum(sizes.values())}


def weight_bytes_safetensors(path: Path, gathered: Sequence[str] = ("embed_tokens",)) -> Dict[str, int]:
    """The same count from a safetensors file's header: tensors whose name contains one of
    `gathered` are embedding tables (one row per token), every other tensor is read whole."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    read = row = total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        size = _numel(meta["shape"]) * SAFETENSORS_ITEMSIZE[meta["dtype"]]
        total += size
        if any(g in name for g in gathered):
            row += size // meta["shape"][0]
        else:
            read += size
    return {"read": read, "row": row, "total": total}


def kv_bytes_per_step(config: dict, point: Point, itemsize: int = 4) -> int:
    """KV-cache bytes one decode step must read: K and V of every layer over the valid context,
    at the mean context length of the decode steps (prompt + new / 2)."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_position = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * itemsize
    return int(per_position * (point.prompt + point.new / 2) * point.batch)


def step_bytes(weights: Dict[str, int], config: dict, point: Point) -> int:
    """Bytes one decode step reads: the weights once, a gathered row per row of the batch, the KV cache."""
    return weights["read"] + weights["row"] * point.batch + kv_bytes_per_step(config, point)


def floor_ms(nbytes: int, gbps: float) -> float:
    return nbytes / (gbps * 1e9) * 1e3


class Bandwidth:
    """Best read bandwidth (GB/s, 1e9 bytes/s) of a few streaming kernels over a large array.

    `measure()` keeps the best rate per kernel; called before the points and after every round,
    since this shared machine's bandwidth drifts with its neighbours' load. The floor uses the
    best of all: the strictest (lowest) floor.
    """

    def __init__(self, threads: int, gib: float = 0.5):
        self.a = np.arange(int(gib * 2**30) // 4, dtype=np.float32)     # distinct pages
        self.b = np.empty_like(self.a)
        nbytes = self.a.nbytes
        self.kernels = {"numpy sum": (self.a.sum, nbytes),
                        "numpy copy (r+w)": (lambda: np.copyto(self.b, self.a), 2 * nbytes)}
        try:
            import torch

            torch.set_num_threads(threads)
            t = torch.from_numpy(self.a)
            self.kernels[f"torch sum ({threads} threads)"] = (t.sum, nbytes)
        except ImportError:
            pass
        self.best: Dict[str, float] = {}

    def measure(self, repeats: int = 3) -> None:
        for name, (fn, nbytes) in self.kernels.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                self.best[name] = max(self.best.get(name, 0.0), nbytes / (time.perf_counter() - start) / 1e9)

    @property
    def gbps(self) -> float:
        return max(self.best.values())


# ------------------------------------------------------------------ cached builds
def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tree_hash(root: Path) -> str:
    """Hash of the .py files under `root`: a tgraph export is only reused by the same tgraph code."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Built:
    path: Path
    seconds: float
    cached: bool
    command: str


MARKER = "bench-build.json"


def cached_build(workdir: Path, name: str, key: str, build, describe: str) -> Built:
    """`build(out_dir)` once per key: into a temporary dir renamed at the end (no partial caches);
    the marker file records the key and how long the build took."""
    final = workdir / name
    marker = final / MARKER
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("key") == key:
            return Built(final, record["seconds"], True, record.get("command", describe))
    partial = workdir / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    build(partial)
    seconds = time.perf_counter() - start
    if not partial.is_dir():
        raise RuntimeError(f"{name}: the build wrote no directory {partial}")
    (partial / MARKER).write_text(json.dumps({"key": key, "seconds": seconds, "command": describe}))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return Built(final, seconds, False, describe)


def run_logged(cmd: List[str], log: Path, env: dict, cwd: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if code != 0:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        raise RuntimeError(f"exit {code}: {tail[0][:300] if tail else ''} (log: {log})")


def ensure_checkpoint(workdir: Path, seed: int) -> Built:
    import transformers

    def build(out: Path) -> None:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers

        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG)).eval()
        model.save_pretrained(out, safe_serialization=True)
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, LLAMA_CONFIG["vocab_size"])}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                             eos_token="</s>").save_pretrained(out)

    key = _hash(LLAMA_CONFIG, seed, transformers.__version__)
    return cached_build(workdir, f"llama150m-seed{seed}", key, build, "LlamaForCausalLM.save_pretrained")


# ------------------------------------------------------------------ runner processes
class Runner:
    """One contender's process: JSON request per line in, JSON reply per line out."""

    def __init__(self, name: str, python: str, script: str, env: dict, log: Path, cwd: Path):
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([python, str(PEERS / script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=cwd, text=True, bufsize=1)
        self.replies: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def request(self, timeout: float, **message) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            raise RuntimeError(f"no reply within {timeout:.0f} s (log: {self.log_path})")
        if line is None:
            raise RuntimeError(f"the runner exited with {self.proc.wait()} (log: {self.log_path})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{reply.get('error')} (log: {self.log_path})")
        return reply

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if not kill:
                try:
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------ contenders
@dataclass
class Contender:
    key: str
    label: str = ""
    python: str = ""
    script: str = ""
    load: dict = field(default_factory=dict)
    builds: List[Tuple[str, Built]] = field(default_factory=list)
    weights: Optional[Dict[str, int]] = None
    weights_from: str = ""
    unavailable: str = ""           # the reason, when it cannot run
    runner: Optional[Runner] = None
    load_s: float = 0.0
    load_rss_mb: float = 0.0
    info: dict = field(default_factory=dict)
    quantized: bool = False


def tgraph_capabilities(python: str, env: dict, cwd: Path) -> Dict[str, object]:
    """What this tgraph offers: its package dir and which `export` options its CLI has. `cwd`
    must be where the runners run (the workdir): `python -c` imports from its cwd first."""
    where = subprocess.run([python, "-c", "import os, tgraph; print(os.path.dirname(tgraph.__file__))"],
                           capture_output=True, text=True, env=env, cwd=cwd)
    if where.returncode != 0:
        raise SystemExit(f"--tgraph-python {python}: cannot import tgraph ({where.stderr.strip().splitlines()[-1:]})")
    helptext = subprocess.run([python, "-m", "tgraph.cli", "export", "--help"], capture_output=True, text=True,
                              env=env, cwd=cwd).stdout
    return {"python": python, "package": where.stdout.strip(), "help": helptext, **export_options(helptext)}


def export_options(helptext: str) -> Dict[str, bool]:
    """Which of the new export options an `export --help` text offers."""
    has = lambda flag: re.search(rf"(^|[\s\[,]){re.escape(flag)}(?=[\s\]=,]|$)", helptext) is not None   # noqa: E731
    return {"task": has("--task"), "quantize": has("--quantize"), "block_size": has("--block-size"),
            "max_length": has("--max-length")}


def parse_options(items: Optional[List[str]]) -> Dict[str, object]:
    """--tgraph-option KEY=VALUE -> Generator keyword arguments (VALUE read as JSON when it is JSON)."""
    out: Dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--tgraph-option expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


TGRAPH_KEY = re.compile(r"^tgraph(?:-O(?P<level>\d)|-(?P<int4>int4)(?P<sym>-sym)?)?(?:@(?P<tag>[A-Za-z0-9_.-]+))?$")


@dataclass(frozen=True)
class TgraphSpec:
    level: Optional[int]      # None: the engine's default
    int4: bool
    tag: str                  # which --tgraph-python ("" = the default one)
    symmetric: bool = False   # int4 without zero points (genai's default format)


def parse_tgraph_key(key: str) -> Optional[TgraphSpec]:
    """`tgraph`, `tgraph-O2`, `tgraph-int4`, `tgraph-int4-sym`, each optionally `@TAG` (a
    --tgraph-python TAG=PATH)."""
    match = TGRAPH_KEY.match(key)
    if not match:
        return None
    level = match.group("level")
    return TgraphSpec(int(level) if level else None, bool(match.group("int4")), match.group("tag") or "",
                      bool(match.group("sym")))


def genai_int4_peer(spec: TgraphSpec) -> str:
    """The genai contender with the same int4 format as `spec`."""
    return "genai-int4" if spec.symmetric else "genai-int4-asym"


def int4_label(symmetric: bool) -> str:
    return f"int4 (block 32, {'symmetric' if symmetric else 'zero points'})"


def parse_pythons(items: Optional[List[str]], default: str) -> Dict[str, str]:
    """--tgraph-python [TAG=]PATH ... -> {tag: path}; an untagged PATH replaces the default ("")."""
    out = {"": default}
    for item in items or []:
        tag, sep, path = item.rpartition("=")
        if sep and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
            raise SystemExit(f"--tgraph-python expects [TAG=]PATH, got {item!r}")
        out[tag if sep else ""] = path
    return out


def prepare_tgraph(c: Contender, spec: TgraphSpec, args, ckpt: Built, caps: dict, env: dict, workdir: Path,
                   max_length: int) -> Contender:
    threads = args.threads
    c.python, c.script, c.quantized = caps["python"], "tgraph_runner.py", spec.int4
    level = spec.level if spec.level is not None else args.tgraph_level
    lv = f"-O{level}" if level is not None else "default -O"
    where = f"[{spec.tag}] " if spec.tag else ""
    c.label = f"tgraph {where}{int4_label(spec.symmetric) if spec.int4 else 'fp32'}"
    use_dir = args.tgraph_mode == "gendir" or (args.tgraph_mode == "auto" and caps["task"])
    if spec.int4:
        missing = [f for f, ok in (("--task generate", caps["task"]), ("--quantize", caps["quantize"]),
                                   ("--block-size", caps["block_size"])) if not ok]
        if missing:
            c.unavailable = f"not available: `tgraph export` has no {', '.join(missing)} in {caps['package']}"
            return c
        use_dir = True
    if use_dir and not caps["task"]:
        c.unavailable = f"not available: `tgraph export` has no --task in {caps['package']}"
        return c
    options = parse_options(args.tgraph_option)
    if not use_dir:
        c.label += f" ({lv}, checkpoint)"
        c.load = {"source": str(ckpt.path), "threads": threads, "level": level, "options": options}
        c.weights, c.weights_from = weight_bytes_safetensors(ckpt.path / "model.safetensors"), "checkpoint"
        return c
    cmd = [caps["python"], "-m", "tgraph.cli", "export", str(ckpt.path), "--task", "generate"]
    if level is not None:
        cmd += ["-O", str(level)]
    if caps["max_length"]:
        cmd += ["--max-length", str(max_length)]
    if spec.int4:
        cmd += ["--quantize", "int4", "--block-size", "32"] + (["--symmetric"] if spec.symmetric else [])
    name = "tgraph-" + _hash(cmd[3:], caps["package"])[:8]

    def build(out: Path) -> None:
        run_logged(cmd + ["-o", str(out)], workdir / "logs" / f"build-{c.key}.log", env, workdir)

    built = cached_build(workdir, name, _hash(cmd[3:], tree_hash(Path(caps["package"]))), build,
                         " ".join(cmd[3:]) + " -o DIR")
    quant = (" --quantize int4" + (" --symmetric" if spec.symmetric else "")) if spec.int4 else ""
    c.builds.append((f"tgraph {where}export --task generate{quant}", built))
    c.label += f" ({lv}, generation dir)"
    c.load = {"source": str(built.path), "threads": threads, "options": options}
    onnx_path = built.path / "model.onnx"
    c.weights, c.weights_from = (_onnx_weights(onnx_path), "model.onnx") if onnx_path.exists() else \
        (weight_bytes_safetensors(ckpt.path / "model.safetensors"), "checkpoint")
    return c


def prepare(key: str, args, ckpt: Built, caps: Dict[str, dict], env: dict, workdir: Path,
            max_length: int) -> Contender:
    """Export (cached) what the contender needs and say how its runner is to load it.
    `caps`: tgraph_capabilities per --tgraph-python tag."""
    c = Contender(key)
    threads = args.threads
    try:
        spec = parse_tgraph_key(key)
        if spec is not None:
            if spec.tag not in caps:
                raise SystemExit(f"--contenders {key}: no --tgraph-python {spec.tag}=PATH")
            return prepare_tgraph(c, spec, args, ckpt, caps[spec.tag], env, workdir, max_length)
        if key in ("genai", "genai-int4", "genai-int4-asym"):
            int4, asym = key.startswith("genai-int4"), key == "genai-int4-asym"
            c.quantized = int4
            c.label = "onnxruntime-genai " + (int4_label(not asym) if int4 else "fp32")
            c.python, c.script = args.genai_python, "genai_runner.py"
            if not Path(args.genai_python).exists():
                c.unavailable = f"not available: no {args.genai_python} (bash bench/make_peer_venvs.sh makes it)"
                return c
            version = subprocess.run([args.genai_python, "-c", "import onnxruntime_genai as og; print(og.__version__)"],
                                     capture_output=True, text=True, env=env, cwd=workdir).stdout.strip()
            opts = ["-p", "int4" if int4 else "fp32", "-e", "cpu"]
            extra = ["hf_token=false"] + (["block_size=32"] if int4 else []) + (["is_symmetric=false"] if asym else [])

            def build(out: Path) -> None:
                cmd = [args.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt.path),
                       "-o", str(out), *opts, "-c", str(workdir / ".genai-cache"), "--extra_options", *extra]
                run_logged(cmd, workdir / "logs" / f"build-{key}.log", env, workdir)

            built = cached_build(workdir, key, _hash(ckpt.path.name, version, opts, extra), build,
                                 f"python -m onnxruntime_genai.models.builder {' '.join(opts)} "
                                 f"--extra_options {' '.join(extra)}")
            c.builds.append((f"onnxruntime-genai {version} builder {' '.join(opts)}{' is_symmetric=false' if asym else ''}",
                             built))
            c.load = {"model_dir": str(built.path), "threads": threads}
            c.weights, c.weights_from = _onnx_weights(built.path / "model.onnx"), "model.onnx"
            return c
        if key == "optimum":
            c.label = "optimum ORTModelForCausalLM"
            c.python, c.script = args.optimum_python, "optimum_runner.py"
            cli = Path(args.optimum_python).parent / "optimum-cli"
            if not cli.exists():
                c.unavailable = f"not available: no {cli} (bash bench/make_peer_venvs.sh makes it)"
                return c

            def build(out: Path) -> None:
                run_logged([str(cli), "export", "onnx", "-m", str(ckpt.path), "--task", "text-generation-with-past",
                            str(out)], workdir / "logs" / "build-optimum.log", env, workdir)

            built = cached_build(workdir, "optimum", _hash(ckpt.path.name, str(cli)), build,
                                 "optimum-cli export onnx --task text-generation-with-past")
            c.builds.append(("optimum-cli export onnx", built))
            c.load = {"model_dir": str(built.path), "threads": threads}
            c.weights, c.weights_from = _onnx_weights(built.path / "model.onnx"), "model.onnx"
            return c
        if key == "hf":
            c.label = "HF eager (torch)"
            c.python, c.script = sys.executable, "hf_runner.py"
            c.load = {"checkpoint": str(ckpt.path), "threads": threads}
            c.weights, c.weights_from = weight_bytes_safetensors(ckpt.path / "model.safetensors"), "checkpoint"
            return c
        raise SystemExit(f"--contenders: unknown contender {key!r} (known: {DEFAULT_CONTENDERS}, tgraph-O<n>)")
    except RuntimeError as exc:
        c.label = c.label or key
        c.unavailable = f"build failed: {exc}"
        return c


def _onnx_weights(path: Path) -> Dict[str, int]:
    import onnx

    return weight_bytes_onnx(onnx.load(str(path), load_external_data=False))


# ------------------------------------------------------------------ the run
def runner_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env                                  # OPENBLAS_CORETYPE passes through untouched


def load_runner(c: Contender, env: dict, workdir: Path, timeout: float) -> None:
    if c.unavailable:
        return
    c.runner = Runner(c.key, c.python, c.script, env, workdir / "logs" / f"run-{c.key}.log", workdir)
    try:
        reply = c.runner.request(timeout, cmd="load", **c.load)
    except RuntimeError as exc:
        c.unavailable = f"load failed: {exc}"
        c.runner.close(kill=True)
        c.runner = None
        return
    c.load_s, c.load_rss_mb, c.info = reply["load_s"], reply["rss_bytes"] / 2**20, reply.get("info", {})


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(x: Optional[float], digits: int = 1, width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None or x != x else f"{x:{width}.{digits}f}"


def measure_point(point: Point, contenders: List[Contender], repeats: int, seed: int, bandwidth: Bandwidth,
                  timeout: float) -> Dict[str, dict]:
    """Warm-up once each, then `repeats` rounds in rotating order; returns per-contender results."""
    live = [c for c in contenders if c.runner is not None]
    prompts = prompts_for(point, LLAMA_CONFIG["vocab_size"], seed)
    results: Dict[str, dict] = {c.key: {"runs": [], "first": None, "error": "", "unstable": False} for c in live}

    def once(c: Contender, at: Point) -> Optional[Run]:
        slot = results[c.key]
        if slot["error"]:
            return None
        try:
            return parse_run(c.runner.request(timeout, cmd="run", prompts=prompts, new=at.new), at)
        except (RuntimeError, ValueError, KeyError) as exc:
            slot["error"] = f"run failed: {exc}"
            return None

    warm_point = Point(point.name, point.prompt, point.batch, min(point.new, WARMUP_TOKENS))
    for c in live:                      # sessions, buffers and caches warmed at this shape
        once(c, warm_point)
    for r in range(repeats):
        for key in round_order([c.key for c in live], r):
            c = next(x for x in live if x.key == key)
            run = once(c, point)
            if run is not None:
                slot = results[key]
                slot["runs"].append(run)
                slot["first"] = slot["first"] or run          # the ids every later run must repeat
                if run.ids != slot["first"].ids:
                    slot["unstable"] = True
        bandwidth.measure(repeats=1)
    return results


def print_point(point: Point, contenders: List[Contender], results: Dict[str, dict], gbps: float,
                load_before: str, load_after: str) -> Dict[str, Optional[Summary]]:
    print(f"\n=== {point.name}: {point.describe()}, greedy, EOS disabled "
          f"(load average before {load_before}, after {load_after})")
    summaries: Dict[str, Optional[Summary]] = {}
    for c in contenders:
        slot = results.get(c.key)
        summaries[c.key] = summarise(slot["runs"], point) if slot and slot["runs"] else None
    reference_key = REFERENCE if summaries.get(REFERENCE) else next((k for k, s in summaries.items() if s), None)
    ref_ids = results[reference_key]["first"].ids if reference_key and results[reference_key]["first"] else None
    ref_label = next((c.label for c in contenders if c.key == reference_key), "?")
    base = summaries.get(FP32_BASELINE)
    head = (f"  {'contender':<42} {'prefill':>8} {'decode':>8} {'tok/s':>8} {'x genai':>7} {'e2e':>7} "
            f"{'peak RSS':>8} {'floor':>7} {'x floor':>7}  greedy ids")
    print(head)
    print(f"  {'':<42} {'ms':>8} {'ms/step':>8} {'decode':>8} {'fp32':>7} {'tok/s':>7} {'MB':>8} {'ms/step':>7} "
          f"{'':>7}  (vs {ref_label})")
    for c in contenders:
        s = summaries[c.key]
        slot = results.get(c.key) or {}
        if s is None:
            reason = c.unavailable or slot.get("error") or "no runs"
            print(f"  {c.label:<42} {reason}")
            continue
        fl = floor_ms(step_bytes(c.weights, LLAMA_CONFIG, point), gbps) if c.weights else None
        ratio = s.tokens_per_s / base.tokens_per_s if base else None
        ids = describe_ids("reference", ref_ids, slot["first"].ids) if c.key != reference_key else "reference"
        if c.quantized:
            spec = parse_tgraph_key(c.key)
            same = genai_int4_peer(spec) if spec else ("tgraph-int4-sym" if c.key == "genai-int4" else "tgraph-int4")
            others = [q for q in contenders if q.quantized and q.key != c.key and results.get(q.key)
                      and results[q.key]["first"] is not None]
            peer = next((q for q in others if q.key == same), others[0] if others else None)
            ids += " (quantized: fp32 ids not expected)"
            if peer is not None:
                ids += f"; vs {peer.key} " + describe_ids(peer.key, results[peer.key]["first"].ids, slot["first"].ids)
        if slot.get("unstable"):
            ids += "; CHANGED between runs"
        if slot.get("error"):
            ids += f"; {slot['error']}"
        print(f"  {c.label:<42} {fmt(s.prefill_ms)} {fmt(s.decode_ms, 2)} {fmt(s.tokens_per_s)} "
              f"{fmt(ratio, 2, 6)}x {fmt(s.e2e_tokens_per_s, 1, 7)} {fmt(s.peak_rss_mb, 0)} {fmt(fl, 2, 7)} "
              f"{fmt(s.decode_ms / fl if fl else None, 2, 6)}x  {ids}")
    spread = "; ".join(f"{c.key} {s.decode_spread[0]:.1f}-{s.decode_spread[1]:.1f}"
                       for c in contenders if (s := summaries[c.key]))
    print(f"  decode ms/step, range over the runs: {spread}")
    return summaries


def check_targets(points: List[Point], table: Dict[str, Dict[str, Optional[Summary]]]) -> List[str]:
    """The issue 9 / 10 targets that this run's contenders allow checking, as lines. Every tgraph
    contender at its default level is checked (`tgraph`, `tgraph@TAG`; int4 against the fp32 of the
    same tag)."""
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    keys = sorted({k for row in table.values() for k in row})
    specs = {k: spec for k in keys if (spec := parse_tgraph_key(k)) is not None and spec.level is None}
    for p in points:
        row = table[p.name]
        g = row.get("genai")
        for key, spec in specs.items():
            t = row.get(key)
            if t is None:
                continue
            if not spec.int4 and g:
                r = t.tokens_per_s / g.tokens_per_s
                lines.append(f"{p.name}: {key} decode tokens/s {r:.2f}x genai fp32 (issue 9, >= 1.2x: "
                             f"{verdict(r >= 1.2)}); prefill {t.prefill_ms:.0f} vs {g.prefill_ms:.0f} ms "
                             f"(no slower: {verdict(t.prefill_ms <= g.prefill_ms)})")
            if spec.int4:
                peer = genai_int4_peer(spec)
                if row.get(peer):
                    r = t.tokens_per_s / row[peer].tokens_per_s
                    lines.append(f"{p.name}: {key} {r:.2f}x {peer} (issue 10, >= 1x: {verdict(r >= 1)})")
                fp32 = row.get("tgraph" + (f"@{spec.tag}" if spec.tag else ""))
                if fp32:
                    r = t.tokens_per_s / fp32.tokens_per_s
                    lines.append(f"{p.name}: {key} {r:.2f}x its fp32 (issue 10, >= 3.5x: {verdict(r >= 3.5)})")
    names = {p.name for p in points}
    if {"p32", "p1024"} <= names:
        for key, spec in specs.items():
            short, long = table["p32"].get(key), table["p1024"].get(key)
            if short and long and not spec.int4:
                r = long.decode_ms / short.decode_ms
                lines.append(f"{key}: decode ms/step p1024 / p32 = {r:.2f} (issue 9, <= 1.3: {verdict(r <= 1.3)})")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="p32,p1024,p32b8", help="pPROMPT[bBATCH],... (default %(default)s)")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="(default %(default)s; also tgraph-O<n>)")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per contender and point")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every contender")
    parser.add_argument("--quick", action="store_true", help="plumbing check: 1 repeat, 16 new tokens")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed")
    parser.add_argument("--workdir", default="/tmp/tgraph-bench-generate", help="cache of checkpoint and exports")
    parser.add_argument("--tgraph-python", action="append", metavar="[TAG=]PATH",
                        help="python whose tgraph is measured (default: this one); TAG=PATH adds one that "
                             "contenders name as tgraph@TAG, e.g. tgraph@h6=/work/wt/h6-gen/.venv/bin/python")
    parser.add_argument("--tgraph-mode", choices=["auto", "checkpoint", "gendir"], default="auto",
                        help="auto: a generation dir when the CLI has --task, else the checkpoint")
    parser.add_argument("--tgraph-level", type=int, default=None, help="-O of the `tgraph` contender "
                        "(default: Generator's / export's own default)")
    parser.add_argument("--tgraph-option", action="append", metavar="KEY=VALUE",
                        help="extra tgraph.generate.Generator keyword argument (e.g. kv_cache=dynamic)")
    parser.add_argument("--genai-python", default=GENAI_PYTHON)
    parser.add_argument("--optimum-python", default=OPTIMUM_PYTHON)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a runner may take per request")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.new = 1, 16
    if args.repeats < 1 or args.new < 2:
        raise SystemExit("--repeats must be >= 1 and --new >= 2")
    points = parse_points(args.points, args.new)
    keys = [k.strip() for k in args.contenders.split(",") if k.strip()]
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = runner_env(args.threads)

    import transformers

    print(f"load average at the start {loadavg()} on {os.cpu_count()} CPUs; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; {args.threads} threads; "
          f"repeats {args.repeats}, {args.new} new tokens; workdir {workdir}")
    ckpt = ensure_checkpoint(workdir, args.seed)
    pythons = parse_pythons(args.tgraph_python, sys.executable)
    tags = {spec.tag for spec in map(parse_tgraph_key, keys) if spec is not None}
    caps = {tag: tgraph_capabilities(pythons[tag], env, workdir) for tag in sorted(tags) if tag in pythons}
    for tag, cap in caps.items():
        offered = [o for o in ("task", "quantize", "block_size", "max_length") if cap[o]]
        print(f"tgraph{' [' + tag + ']' if tag else ''} under test: {cap['package']} (new-engine export "
              f"options present: {', '.join(offered) or 'none'})")
    max_length = max(p.prompt + p.new for p in points)
    contenders = [prepare(k, args, ckpt, caps, env, workdir, max_length) for k in keys]
    bandwidth = Bandwidth(args.threads)
    bandwidth.measure(repeats=3)
    try:
        for c in contenders:
            load_runner(c, env, workdir, args.timeout)
        print(f"\nbuilds (cached in {workdir}; not in any decode figure):")
        print(f"  {'checkpoint (' + str(transformers.__version__) + ')':<58} "
              f"{ckpt.seconds:7.1f} s{' (cached)' if ckpt.cached else ''}")
        for c in contenders:
            for what, built in c.builds:
                print(f"  {what:<58} {built.seconds:7.1f} s{' (cached)' if built.cached else ''}  "
                      f"{_du(built.path) / 1e6:6.0f} MB on disk")
        print("runner start-up (process: import, read, create sessions; tgraph from a checkpoint also "
              "traces/optimises/exports here):")
        for c in contenders:
            state = c.unavailable or (f"{c.load_s:7.1f} s, RSS after load {c.load_rss_mb:6.0f} MB  "
                                      f"{json.dumps(c.info)}")
            print(f"  {c.label:<42} {state}")
        table: Dict[str, Dict[str, Optional[Summary]]] = {}
        raw: Dict[str, dict] = {}
        for p in points:
            before = loadavg()
            results = measure_point(p, contenders, args.repeats, args.seed, bandwidth, args.timeout)
            table[p.name] = print_point(p, contenders, results, bandwidth.gbps, before, loadavg())
            raw[p.name] = {k: {"runs": [r.__dict__ for r in v["runs"]], "error": v["error"]}
                           for k, v in results.items()}
        gbps = bandwidth.gbps
        print(f"\nmemory bandwidth, best over the run (512 MiB arrays): "
              + "; ".join(f"{k} {v:.1f}" for k, v in bandwidth.best.items()) + f" GB/s -> floor uses {gbps:.1f} GB/s")
        for c in contenders:
            if c.weights:
                print(f"  bytes per decode step, {c.label}: weights {c.weights['read'] / 1e6:.1f} MB read whole "
                      f"(from {c.weights_from}) + {c.weights['row']} B per gathered row; KV cache (fp32, mean "
                      f"context) " + ", ".join(f"{p.name} {kv_bytes_per_step(LLAMA_CONFIG, p) / 1e6:.1f} MB"
                                               for p in points))
        print("\ntargets:")
        for line in check_targets(points, table) or ["(no tgraph/genai pair measured)"]:
            print("  " + line)
        print(f"\nload average at the end {loadavg()}")
        if args.json:
            Path(args.json).write_text(json.dumps({"points": raw, "gbps": gbps, "bandwidth": bandwidth.best,
                                                   "contenders": {c.key: {"label": c.label, "unavailable": c.unavailable,
                                                                          "load_s": c.load_s, "info": c.info,
                                                                          "weights": c.weights} for c in contenders}},
                                                  default=str))
    finally:
        for c in contenders:
            if c.runner is not None:
                c.runner.close()
    return 0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


if __name__ == "__main__":
    sys.exit(main())
