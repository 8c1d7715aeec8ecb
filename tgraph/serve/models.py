"""The models a server holds, without Ray: an encoder (embeddings) or a decoder (completions).

    EncoderModel(path)   an .onnx encoder (or DIR/model.onnx), tokenizer.json beside it for text:
                         embedding = mean of last_hidden_state over the attention mask, L2-normalised
                         (as sentence-transformers' mean-pooling models do)
    DecoderModel(dir)    a generation directory (`tgraph export MODEL --task generate`), run by
                         `tgraph.generate.Generator`

`run_batch(requests)` answers a list of parsed requests in one model call where it can and
returns, per request, its payload or the `RequestError` that request earned: one bad
request in a batch fails alone (the batch is retried one request at a time).
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from ..errors import ConfigError, TgraphError
from .requests import CompletionRequest, EmbeddingRequest, RequestError

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_name(path: str) -> str:
    p = Path(str(path).rstrip("/"))
    return p.stem if p.suffix == ".onnx" else p.name


def model_kind(path: str) -> str:
    """"encoder" or "decoder" for a path `tgraph serve` takes; a clear error for anything else."""
    from ..export_dir import is_generation_dir

    if is_generation_dir(path):
        return "decoder"
    p = Path(path)
    if (p.suffix == ".onnx" and p.is_file()) or (p.is_dir() and (p / "model.onnx").is_file()):
        return "encoder"
    raise ConfigError(f"{path}: not an encoder .onnx file (or a directory with model.onnx) nor a generation "
                      "directory; export one first (tgraph export MODEL -o model.onnx, or --task generate -o DIR)")


def check_servable(path: str) -> str:
    """The model's kind, after the checks a replica would make that need no session: so a
    model that cannot be served is refused before Ray starts, in one line."""
    from ..export_dir import read_manifest

    kind = model_kind(path)
    if kind == "decoder":
        read_manifest(path)
        return kind
    onnx_path = Path(path) / "model.onnx" if Path(path).is_dir() else Path(path)
    from ..onnx_import import read_onnx_proto

    graph = read_onnx_proto(str(onnx_path), ConfigError).graph
    inits = {i.name for i in graph.initializer}
    names = [v.name for v in graph.input if v.name not in inits]
    if "input_ids" not in names or any(n not in ENCODER_INPUTS for n in names):
        raise ConfigError(f"{onnx_path}: an encoder takes input_ids (and attention_mask, token_type_ids); "
                          f"this graph takes {', '.join(names)}")
    if not any(o.name == "last_hidden_state" or len(o.type.tensor_type.shape.dim) == 3 for o in graph.output):
        raise ConfigError(f"{onnx_path}: no last_hidden_state (or other [batch, seq, hidden]) output to pool")
    return kind


def _vocab_size(onnx_path: Path) -> Optional[int]:
    """Rows of the embedding table input_ids indexes (a Gather of an initializer), if found."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids" \
                and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


class EncoderModel:
    kind = "encoder"

    def __init__(self, path: str, threads: Optional[int] = None, name: Optional[str] = None):
        from ..runtime import Session
        from ..tokens import TextTokenizer

        p = Path(path)
        onnx_path = p / "model.onnx" if p.is_dir() else p
        self.name = name or model_name(path)
        self.session = Session(str(onnx_path), providers="auto", threads=threads)
        names = self.session.input_names
        extra = [n for n in names if n not in ENCODER_INPUTS]
        if "input_ids" not in names or extra:
            raise ConfigError(f"{onnx_path}: an encoder takes input_ids (and attention_mask, token_type_ids); "
                              f"this graph takes {', '.join(names)}")
        outputs = self.session.outputs
        hidden = next((o for o in outputs if o.name == "last_hidden_state"), None) or next(
            (o for o in outputs if o.shape is not None and len(o.shape) == 3), None)
        if hidden is None:
            raise ConfigError(f"{onnx_path}: no last_hidden_state (or other [batch, seq, hidden]) output to pool")
        self.output = hidden.name
        tok = onnx_path.parent / "tokenizer.json"
        self.tokenizer = TextTokenizer(tok) if tok.is_file() else None
        self.vocab_size = _vocab_size(onnx_path)
        self.lock = threading.Lock()

    def _ids(self, row, index: int) -> List[int]:
        if isinstance(row, str):
            if self.tokenizer is None:
                raise RequestError(400, f"model {self.name!r} has no tokenizer.json; send token ids")
            ids = self.tokenizer.encode(row)
            if not ids:
                raise RequestError(400, f"input[{index}] encodes to no tokens")
            return ids
        if self.vocab_size is not None and max(row) >= self.vocab_size:
            raise RequestError(400, f"input[{index}] has token id {max(row)} >= the vocabulary size {self.vocab_size}")
        return list(row)

    def embed(self, rows: List[List[int]]) -> np.ndarray:
        """[rows, hidden] embeddings of id rows, right-padded into one session run."""
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        with self.lock:
            hidden = self.session.run({k: v for k, v in feeds.items() if k in self.session.input_names},
                                      outputs=[self.output])[self.output]
        return pool(hidden, mask)

    def _payload(self, req: EmbeddingRequest, id_rows, vectors) -> Dict[str, Any]:
        tokens = sum(len(r) for r in id_rows)
        return {"object": "list", "model": self.name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def run_batch(self, requests: List[EmbeddingRequest]) -> List[Any]:
        results: List[Any] = [None] * len(requests)
        parsed = []
        for i, req in enumerate(requests):
            try:
                parsed.append((i, [self._ids(r, k) for k, r in enumerate(req.rows)]))
            except RequestError as e:
                results[i] = e
        if parsed:
            try:
                vectors = self.embed([row for _, rows in parsed for row in rows])
                at = 0
                for i, rows in parsed:
                    results[i] = self._payload(requests[i], rows, vectors[at:at + len(rows)])
                    at += len(rows)
            except TgraphError:
                for i, rows in parsed:              # find the request the model refused
                    try:
                        results[i] = self._payload(requests[i], rows, self.embed(rows))
                    except TgraphError as e:
                        results[i] = RequestError(400, f"model {self.name!r} refused the input: {e}")
        return results


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the unmasked positions, then unit length (float32)."""
    m = mask[..., None].astype(np.float64)
    mean = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.maximum(norm, 1e-12)).astype(np.float32)


class DecoderModel:
    kind = "decoder"

    def __init__(self, path: str, threads: Optional[int] = None, name: Optional[str] = None):
        from ..generate import Generator

        self.name = name or model_name(path)
        self.gen = Generator(str(path), provider="auto", threads=threads)
        self.tokenizer = self.gen.tokenizer
        self.lock = threading.Lock()                 # one Generator: its static buffers are shared

    def _rows(self, req: CompletionRequest) -> list:
        if self.tokenizer is None and any(isinstance(r, str) for r in req.rows):
            raise RequestError(400, f"model {self.name!r} has no tokenizer.json; send the prompt as token ids")
        return req.rows

    def _choices(self, result, offset: int = 0) -> list:
        eos = set(self.gen.special.eos or ())
        return [{"index": offset + i, "text": result.text[i] if result.text is not None else "",
                 "token_ids": ids, "logprobs": None,
                 "finish_reason": "stop" if ids and ids[-1] in eos else "length"}
                for i, ids in enumerate(result.ids)]

    def _generate(self, rows, req: CompletionRequest):
        with self.lock:
            return self.gen.generate(rows, req.max_tokens, do_sample=not req.greedy, temperature=req.temperature or 1.0,
                                     top_p=req.top_p, seed=req.seed)

    def _payload(self, req: CompletionRequest, choices: list, prompt_tokens: int) -> Dict[str, Any]:
        completion = sum(len(c["token_ids"]) for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    def _prompt_tokens(self, rows) -> int:
        return sum(len(r) for r in self.gen.prompt_rows(rows))

    def run_batch(self, requests: List[CompletionRequest]) -> List[Any]:
        """Requests with the same `batch_key` share one `generate` call (rows padded together)."""
        results: List[Any] = [None] * len(requests)
        groups: Dict[Any, List[int]] = {}
        for i, req in enumerate(requests):
            try:
                self._rows(req)
                self.gen.prompt_rows(req.rows)       # ids in the vocabulary, not empty
                groups.setdefault(req.batch_key(), []).append(i)
            except RequestError as e:
                results[i] = e
            except TgraphError as e:
                results[i] = RequestError(400, str(e))
        for members in groups.values():
            self._run_group(requests, members, results)
        return results

    def _run_group(self, requests, members: List[int], results: List[Any]) -> None:
        rows = [row for i in members for row in requests[i].rows]
        try:
            result = self._generate(rows, requests[members[0]])
        except TgraphError as e:
            if len(members) == 1:
                results[members[0]] = RequestError(400, str(e))
            else:
                for i in members:                    # find the request the model refused
                    self._run_group(requests, [i], results)
            return
        choices = self._choices(result)
        at = 0
        for i in members:
            n = len(requests[i].rows)
            mine = [dict(c, index=k) for k, c in enumerate(choices[at:at + n])]
            results[i] = self._payload(requests[i], mine, self._prompt_tokens(requests[i].rows))
            at += n

    def stream(self, req: CompletionRequest) -> Iterator[Dict[str, Any]]:
        """Chunks of one prompt's completion as they are generated (the last has finish_reason)."""
        from ..sampling import SamplingConfig

        rows = self._rows(req)
        sampling = SamplingConfig(do_sample=not req.greedy, temperature=req.temperature or 1.0, top_p=req.top_p,
                                  seed=req.seed)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
        eos = set(self.gen.special.eos or ())
        last = None
        with self.lock:
            for step in self.gen.stream(rows, req.max_tokens, sampling):
                if not step.active[0]:
                    break
                token = int(step.tokens[0])
                last = token
                piece = decoder.step(token) if decoder is not None else ""
                yield dict(head, choices=[{"index": 0, "text": piece, "token_ids": [token], "logprobs": None,
                                           "finish_reason": None}])
        tail = decoder.finish() if decoder is not None else ""
        yield dict(head, choices=[{"index": 0, "text": tail, "token_ids": [], "logprobs": None,
                                   "finish_reason": "stop" if last in eos else "length"}])


def load_model(path: str, threads: Optional[int] = None, name: Optional[str] = None):
    kind = model_kind(path)
    cls = DecoderModel if kind == "decoder" else EncoderModel
    return cls(path, threads=threads, name=name)


def named_models(paths: List[str]) -> Dict[str, str]:
    """{name: path} for the models given to `tgraph serve`, names unique, kinds checked."""
    out: Dict[str, str] = {}
    for path in paths:
        check_servable(path)
        name = model_name(path)
        if name in out:
            raise ConfigError(f"two models are both called {name!r} ({out[name]}, {path}); rename one directory")
        out[name] = os.path.abspath(path)
    return out
