"""`tgraph serve` (Ray Serve): the request checks and the models without Ray, then the real
thing: `tgraph serve` started as a command on a local, loopback-only Ray (2 CPUs, no
dashboard, a 200 MB object store; bounded by --duration and stopped by SIGTERM here), 200
concurrent embedding and 200 concurrent completion requests whose answers must equal direct
`Session` / `Generator` runs, none lost; the throughput of 1 and 2 replicas; and a replica
killed (SIGKILL) under load: every request still gets its answer (retried) or a clear 5xx,
counted and printed. The Ray test takes about 45 s on a busy 2-core machine (two local Rays,
started at once)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tgraph.cli import main
from tgraph.errors import ConfigError
from tgraph.generate import Generator
from tgraph.runtime import Session
from tgraph.serve.models import DecoderModel, EncoderModel, named_models
from tgraph.serve.requests import RequestError, parse_completion_request, parse_embedding_request, parse_json

BERT = ["--set", "hidden_size=32", "--set", "num_layers=1", "--set", "num_heads=2", "--set", "intermediate_size=48",
        "--set", "vocab_size=97"]
GPT2 = ["--set", "n_embd=32", "--set", "n_layer=2", "--set", "n_head=2", "--set", "vocab_size=97"]
N = 200


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    assert main(["export", "bert", "-o", str(root / "enc.onnx"), *BERT]) == 0
    assert main(["export", "gpt2", "--task", "generate", "-o", str(root / "dec"), "--max-length", "64", *GPT2]) == 0
    return root / "enc.onnx", root / "dec"


def embed_reference(session: Session, ids) -> list:
    """Mean of last_hidden_state over the tokens, unit length: from one unpadded session run."""
    ids = np.array([ids], np.int64)
    hidden = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids),
                          "token_type_ids": np.zeros_like(ids)})["last_hidden_state"][0].astype(np.float64)
    mean = hidden.mean(axis=0)
    return (mean / np.sqrt((mean ** 2).sum())).tolist()


def workload(seed: int = 0):
    """N embedding and N completion bodies, of varied lengths (and max_tokens)."""
    rng = np.random.default_rng(seed)
    emb = [{"input": rng.integers(0, 97, int(rng.integers(1, 12))).tolist()} for _ in range(N)]
    comp = [{"prompt": rng.integers(0, 97, int(rng.integers(1, 9))).tolist(), "max_tokens": int(rng.integers(2, 7)),
             "temperature": 0} for _ in range(N)]
    return emb, comp


# ---------------------------------------------------------------- without Ray
BAD = [
    ("embeddings", b"not json", 400, "not JSON"),
    ("embeddings", b"[1, 2]", 400, "must be a JSON object"),
    ("embeddings", b'{"inputs": [1]}', 400, "unknown field 'inputs'"),
    ("embeddings", b'{"input": []}', 400, "input must be a string"),
    ("embeddings", b'{"input": [[1, -2]]}', 400, "input[0] must be"),
    ("embeddings", b'{"input": "hi", "encoding_format": "base64"}', 400, "encoding_format 'base64'"),
    ("completions", b'{"max_tokens": 3}', 400, "missing field 'prompt'"),
    ("completions", b'{"prompt": [1], "max_tokens": 0}', 400, "max_tokens must be a positive integer"),
    ("completions", b'{"prompt": [1], "temperature": -1}', 400, "temperature must be a number in [0.0, 2.0]"),
    ("completions", b'{"prompt": [1], "top_p": 0}', 400, "top_p must be a number in (0.0, 1.0]"),
    ("completions", b'{"prompt": [1], "n": 2}', 400, "n=2 is not supported"),
    ("completions", b'{"prompt": [[1], [2]], "stream": true}', 400, "stream=true takes one prompt"),
    ("completions", b'{"prompt": [1], "stream": "yes"}', 400, "stream must be true or false"),
]


@pytest.mark.parametrize("route,body,status,message", BAD)
def test_bad_requests_are_refused_in_one_line(route, body, status, message):
    parse = parse_embedding_request if route == "embeddings" else parse_completion_request
    with pytest.raises(RequestError) as info:
        parse(parse_json(body))
    assert info.value.status == status and message in info.value.message and "\n" not in info.value.message


def test_encoder_batch_equals_direct_session_runs(models):
    enc, _ = models
    model = EncoderModel(str(enc))
    session = Session(str(enc), providers="cpu")
    emb, _ = workload(1)
    reqs = [parse_embedding_request(b) for b in emb[:12]]
    reqs.append(parse_embedding_request({"input": [[1, 2], [3, 96, 5]]}))
    reqs.append(parse_embedding_request({"input": [5, 97]}))            # beyond the vocabulary: fails alone
    reqs.append(parse_embedding_request({"input": "text"}))             # no tokenizer.json
    results = model.run_batch(reqs)
    for req, got in zip(reqs[:13], results[:13]):
        for row, item in zip(req.rows, got["data"]):
            np.testing.assert_allclose(item["embedding"], embed_reference(session, row), atol=2e-5)
    assert results[13].status == 400 and "97 >= the vocabulary size 97" in results[13].message
    assert results[14].status == 400 and "no tokenizer.json" in results[14].message


def test_decoder_batch_equals_single_generator_runs(models):
    _, dec = models
    model = DecoderModel(str(dec))
    gen = Generator(str(dec), provider="cpu")
    _, comp = workload(2)
    reqs = [parse_completion_request(b) for b in comp[:10]]
    reqs.append(parse_completion_request({"prompt": [1, 2, 120], "max_tokens": 3, "temperature": 0}))
    reqs.append(parse_completion_request({"prompt": [1, 2], "max_tokens": 200, "temperature": 0}))
    reqs.append(parse_completion_request({"prompt": [1, 2], "max_tokens": 5, "seed": 3}))
    results = model.run_batch(reqs)
    for req, got in zip(reqs[:10], results[:10]):
        want = gen.generate(req.rows, max_new_tokens=req.max_tokens).ids[0]
        assert got["choices"][0]["token_ids"] == want
        assert got["usage"]["completion_tokens"] == len(want)
    assert results[10].status == 400 and "outside the vocabulary" in results[10].message
    assert results[11].status == 400 and "the cache holds 64" in results[11].message
    again = model.run_batch([reqs[12]])[0]        # a seeded sample is the same whatever ran with it
    assert again["choices"][0]["token_ids"] == results[12]["choices"][0]["token_ids"]
    chunks = list(model.stream(reqs[0]))
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == results[0]["choices"][0]["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_serve_refuses_what_it_cannot_serve(models, tmp_path, capsys):
    enc, _ = models
    with pytest.raises(ConfigError, match="not an encoder .onnx file"):
        named_models([str(tmp_path)])
    with pytest.raises(ConfigError, match="two models are both called 'enc'"):
        named_models([str(enc), str(enc)])
    assert main(["serve", str(enc), "--replicas", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tgraph: error: --replicas must be >= 1, got 0"
    assert main(["export", "t5", "-o", str(tmp_path / "t5.onnx"), "--set", "d_model=16", "--set", "d_kv=8",
                 "--set", "num_heads=2", "--set", "num_layers=1", "--set", "d_ff=16", "--set", "vocab_size=11"]) == 0
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "t5.onnx")]) == 2                  # refused before Ray starts
    err = capsys.readouterr().err.strip()
    assert err.startswith("tgraph: error: ") and "an encoder takes input_ids" in err and "decoder_input_ids" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(enc), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # pydantic deprecations inside Ray
def test_application_builder_for_rays_own_cli(models):
    from ray.serve.deployment import Application

    from tgraph.serve import app

    enc, dec = models
    assert isinstance(app({"models": f"{enc},{dec}", "replicas": "2"}), Application)   # `serve run tgraph.serve:app`


# ---------------------------------------------------------------- on Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, path: str, body=None, timeout: float = 30.0):
    """(status, parsed JSON); status 0 when no HTTP answer came (connection refused or reset)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return 0, {"error": str(e)}


class Server:
    """`tgraph serve` as a child process; stopped with SIGTERM (it also stops by --duration)."""

    def __init__(self, enc, dec, replicas: int):
        started = time.perf_counter()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tgraph.cli", "serve", str(enc), str(dec), "--replicas", str(replicas),
               "--port", str(self.port), "--num-cpus", "2", "--replica-cpus", "0.5", "--threads", "1",
               "--max-batch-size", "8", "--duration", "90"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started = started

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tgraph serve exited: {self.proc.stdout.read()[-2000:]}")
            status, body = _call(self.url, "/health", timeout=2)
            if status == 200:
                self.start_seconds = time.perf_counter() - self.started
                return self
            time.sleep(0.3)
        self.stop()
        raise AssertionError("tgraph serve did not answer /health within 60 s")

    def pids(self, want: int, seconds: float = 15.0) -> set:
        pids, deadline = set(), time.monotonic() + seconds
        while len(pids) < want and time.monotonic() < deadline:
            status, body = _call(self.url, "/health", timeout=2)
            if status == 200:
                pids.add(body["pid"])
        return pids

    def stop(self) -> str:
        started = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stop_seconds = time.perf_counter() - started
        return self.proc.stdout.read()


def _load(url, emb, comp, workers: int = N, retries: int = 0, on_progress=None):
    """Send every body at once (`workers` in flight); returns the answers and the counts."""
    counts = {"ok": 0, "ok_after_retry": 0, "5xx": 0, "lost": 0}
    lock = threading.Lock()

    def one(job):
        path, body = job
        for attempt in range(retries + 1):
            status, answer = _call(url, path, body)
            if status == 200 or 400 <= status < 500:
                break
            if attempt < retries:
                time.sleep(0.3 * (attempt + 1))
        with lock:
            key = ("ok" if attempt == 0 else "ok_after_retry") if status == 200 else ("5xx" if status >= 500 else
                                                                                      "lost")
            counts[key] += 1
            if on_progress is not None:
                on_progress(sum(counts.values()))
        return status, answer

    jobs = [("/v1/embeddings", b) for b in emb] + [("/v1/completions", b) for b in comp]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = list(pool.map(one, jobs))
    return answers, counts, time.perf_counter() - start


def _check_answers(answers, emb_ref, comp_ref, allow_5xx: bool = False) -> int:
    """Every 200 answer equals its direct run; returns how many were 200."""
    good = 0
    for i, (status, answer) in enumerate(answers):
        if status != 200:
            assert allow_5xx and status >= 500 and "error" in answer, (i, status, answer)
            continue
        good += 1
        if i < N:
            np.testing.assert_allclose(answer["data"][0]["embedding"], emb_ref[i], atol=2e-5)
        else:
            assert answer["choices"][0]["token_ids"] == comp_ref[i - N], i
    return good


def test_tgraph_serve_on_ray(models, capsys):
    enc, dec = models
    emb, comp = workload(0)
    session, gen = Session(str(enc), providers="cpu"), Generator(str(dec), provider="cpu")

    ref_start = time.perf_counter()
    emb_ref = [embed_reference(session, b["input"]) for b in emb]
    comp_ref = [gen.generate([b["prompt"]], max_new_tokens=b["max_tokens"]).ids[0] for b in comp]
    report = [f"direct references: {time.perf_counter() - ref_start:.1f}s"]

    # both start at once (a Ray each): the second's start overlaps the first's, not its measurements
    server, second = Server(enc, dec, replicas=1), Server(enc, dec, replicas=2)
    try:
        server.wait_ready()
        second.wait_ready()
        answers, counts, took1 = _load(server.url, emb, comp)
        assert counts == {"ok": 2 * N, "ok_after_retry": 0, "5xx": 0, "lost": 0}, counts
        assert _check_answers(answers, emb_ref, comp_ref) == 2 * N
        pid = server.pids(1).pop()
        for path, body, status, message in [
                ("/v1/embeddings", {"input": [1, 500]}, 400, "vocabulary size 97"),
                ("/v1/completions", {"prompt": [1], "max_tokens": 500, "temperature": 0}, 400, "the cache holds 64"),
                ("/v1/completions", {"prompt": "x"}, 400, "no tokenizer.json"),
                ("/v1/completions", {"prompt": [1], "model": "nope"}, 404, "not a served decoder"),
                ("/nowhere", None, 404, "no route /nowhere")]:
            got, answer = _call(server.url, path, body)
            assert got == status and message in answer["error"] and "\n" not in answer["error"], answer
        assert server.pids(1) == {pid}                   # the same replica: bad requests crashed nothing
    except BaseException:
        second.stop()
        raise
    finally:
        out = server.stop()
    report.append(f"1 replica: ready {server.start_seconds:.1f}s, stopped {server.stop_seconds:.1f}s")
    assert "serving enc (embeddings), dec (completions)" in out and "tgraph serve: stopped" in out, out[-3000:]

    server = second
    try:
        answers, counts, took2 = _load(server.url, emb, comp)
        assert counts["ok"] == 2 * N and _check_answers(answers, emb_ref, comp_ref) == 2 * N
        report.append(f"throughput, {2 * N} requests: 1 replica {2 * N / took1:.0f} req/s, "
                      f"2 replicas {2 * N / took2:.0f} req/s (x{took1 / took2:.2f}; 2 shared cores)")
        pids = server.pids(2)
        assert len(pids) == 2, f"two replicas answer /health, saw pids {pids}"
        victim = min(pids)
        killed = threading.Event()

        def kill_once(done: int):
            if done >= N // 4 and not killed.is_set():
                killed.set()
                os.kill(victim, signal.SIGKILL)          # a replica process this test's server started

        answers, counts, took = _load(server.url, emb, comp, retries=4, on_progress=kill_once)
        assert killed.is_set()
        good = _check_answers(answers, emb_ref, comp_ref, allow_5xx=True)
        report.append(f"replica {victim} killed after {N // 4} of {2 * N} answers: {counts['ok']} answered, "
                      f"{counts['ok_after_retry']} answered after a retry, {counts['5xx']} clear 5xx, "
                      f"{counts['lost']} lost ({took:.1f}s)")
        assert counts["lost"] == 0 and good == counts["ok"] + counts["ok_after_retry"]
        assert good + counts["5xx"] == 2 * N
    finally:
        server.stop()
    report.append(f"2 replicas: ready {server.start_seconds:.1f}s, stopped {server.stop_seconds:.1f}s")
    with capsys.disabled():
        print("\n" + "\n".join(f"tgraph serve: {line}" for line in report))


def _word_tokenizer(path):
    """A tokenizer.json of words w0..w95 (ids 0..95) and [UNK] = 96, inside the test vocabulary."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(96)}
    vocab["[UNK]"] = 96
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_text_inputs_go_through_the_tokenizer(models, tmp_path):
    import shutil

    enc, dec = models
    (tmp_path / "enc").mkdir()
    shutil.copyfile(enc, tmp_path / "enc" / "model.onnx")                 # the directory form
    _word_tokenizer(tmp_path / "enc" / "tokenizer.json")
    shutil.copytree(dec, tmp_path / "dec")
    _word_tokenizer(tmp_path / "dec" / "tokenizer.json")
    encoder, decoder = EncoderModel(str(tmp_path / "enc")), DecoderModel(str(tmp_path / "dec"))
    text, ids = encoder.run_batch([parse_embedding_request({"input": ["w5 w17 w3", "w9"]}),
                                   parse_embedding_request({"input": [[5, 17, 3], [9]]})])
    assert [d["embedding"] for d in text["data"]] == [d["embedding"] for d in ids["data"]]
    got = decoder.run_batch([parse_completion_request({"prompt": "w5 w17 w3", "max_tokens": 4, "temperature": 0})])[0]
    want = Generator(str(dec), provider="cpu").generate([[5, 17, 3]], max_new_tokens=4).ids[0]
    assert got["choices"][0]["token_ids"] == want
    assert got["choices"][0]["text"] == " ".join(f"w{t}" if t < 96 else "[UNK]" for t in want)
