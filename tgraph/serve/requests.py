"""OpenAI-style request bodies, checked: every mistake is a `RequestError` (an HTTP 4xx
with a one-line message) before any model runs.

    POST /v1/embeddings   {"input": str | [str] | [int] | [[int]], "model"?, "encoding_format"?: "float"}
    POST /v1/completions  {"prompt": str | [str] | [int] | [[int]], "model"?, "max_tokens"?: 16,
                           "temperature"?: 1.0, "top_p"?: 1.0, "seed"?: int, "stream"?: false}

Fields OpenAI defines that tgraph does not implement (n > 1, echo, logprobs, stop ...) are
refused by name, as are fields nobody defines: a request is never half-understood.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Union

MAX_BODY_BYTES = 4 << 20
MAX_ROWS = 256
Prompt = Union[str, List[int]]


class RequestError(Exception):
    """A request the server refuses: `status` (4xx) and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())     # one line, whatever the cause said


def parse_json(body: bytes) -> dict:
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_rows(value: Any, field: str) -> List[Prompt]:
    """str | [str] | [int] | [[int]] -> a list of rows (text or token ids)."""
    if isinstance(value, str):
        rows: List[Any] = [value]
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        rows = [value]
    elif isinstance(value, list) and value:
        rows = value
    else:
        raise RequestError(400, f"{field} must be a string, a list of strings, a list of token ids or a list of "
                                f"such lists (non-empty), got {json.dumps(value)[:80]}")
    if len(rows) > MAX_ROWS:
        raise RequestError(400, f"{field} has {len(rows)} rows, at most {MAX_ROWS}")
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if not row:
                raise RequestError(400, f"{field}[{i}] is an empty string")
        elif not (isinstance(row, list) and row and all(_is_int(t) and t >= 0 for t in row)):
            raise RequestError(400, f"{field}[{i}] must be a non-empty string or a non-empty list of "
                                    "non-negative token ids")
    return rows


def _refuse_unknown(data: dict, known: set, unsupported: dict) -> None:
    for key, value in data.items():
        if key in unsupported and value not in unsupported[key]:
            raise RequestError(400, f"{key}={json.dumps(value)} is not supported by tgraph serve")
        if key not in known and key not in unsupported:
            raise RequestError(400, f"unknown field {key!r} (known: {', '.join(sorted(known))})")


@dataclass
class EmbeddingRequest:
    rows: List[Prompt]
    model: Optional[str]


def parse_embedding_request(data: dict) -> EmbeddingRequest:
    _refuse_unknown(data, {"input", "model", "encoding_format", "user"},
                    {"dimensions": (None,)})
    if "input" not in data:
        raise RequestError(400, "missing field 'input'")
    if data.get("encoding_format", "float") != "float":
        raise RequestError(400, f"encoding_format {data['encoding_format']!r} is not supported (only \"float\")")
    return EmbeddingRequest(parse_rows(data["input"], "input"), _model_field(data))


@dataclass
class CompletionRequest:
    rows: List[Prompt]
    model: Optional[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stream: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self):
        """Requests with equal keys may share one `generate` call. A seeded sampled request
        runs alone, so the same seed gives the same tokens whatever else is in flight."""
        if not self.greedy and self.seed is not None:
            return ("alone", id(self))
        return (self.model, self.max_tokens, self.temperature, self.top_p)


def _model_field(data: dict) -> Optional[str]:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "model must be a string")
    return model


def _number(data: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(400, f"{key} must be a number in {bound}, got {json.dumps(value)}")
    return float(value)


def parse_completion_request(data: dict) -> CompletionRequest:
    _refuse_unknown(data, {"prompt", "model", "max_tokens", "temperature", "top_p", "seed", "stream", "user"},
                    {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,),
                     "stop": (None, [], ""), "suffix": (None, ""), "logit_bias": (None, {}),
                     "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)})
    if "prompt" not in data:
        raise RequestError(400, "missing field 'prompt'")
    rows = parse_rows(data["prompt"], "prompt")
    max_tokens = data.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(400, f"max_tokens must be a positive integer, got {json.dumps(max_tokens)}")
    seed = data.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(400, f"seed must be a non-negative integer, got {json.dumps(seed)}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"stream must be true or false, got {json.dumps(stream)}")
    if stream and len(rows) != 1:
        raise RequestError(400, "stream=true takes one prompt")
    return CompletionRequest(rows, _model_field(data), max_tokens, _number(data, "temperature", 1.0, 0.0, 2.0),
                             _number(data, "top_p", 1.0, 0.0, 1.0, low_open=True), seed, stream)
