"""The Ray Serve deployment: tgraph models behind an OpenAI-style HTTP API.

    POST /v1/embeddings    encoders        POST /v1/completions   decoders (stream: server-sent events)
    GET  /v1/models        what is served  GET  /health           {"status": "ok", "pid", "replica", "models"}

Each replica loads its models once (`tgraph.serve.models`); requests are batched with
`@serve.batch` (one batch at a time per replica, run in a worker thread so /health and
new requests are still taken). Every failure is a JSON body {"error": "one line"} with a
4xx status for the client's mistakes and 500 for tgraph's; nothing a request carries can
take a replica down.

Compose it in your own Ray application:

    from tgraph.serve import TgraphServer
    app = TgraphServer.options(num_replicas=2).bind({"minilm": "/models/minilm.onnx"})
    serve.run(app, route_prefix="/")
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Dict, List, Mapping, Optional

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..errors import TgraphError
from .models import load_model
from .requests import MAX_BODY_BYTES, RequestError, parse_completion_request, parse_embedding_request, parse_json

ROUTES = {("POST", "/v1/embeddings"), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/health")}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


@serve.deployment(name="tgraph", max_ongoing_requests=128, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=2, health_check_timeout_s=10)
class TgraphServer:
    def __init__(self, models: Mapping[str, str], max_batch_size: int = 8, batch_wait_s: float = 0.005,
                 threads: Optional[int] = None):
        self.models = {name: load_model(path, threads=threads, name=name) for name, path in models.items()}
        for method in (self._embed_batch, self._complete_batch):
            method.set_max_batch_size(int(max_batch_size))
            method.set_batch_wait_timeout_s(float(batch_wait_s))
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a running Serve replica (tests that call the class directly)
            self.replica = None

    # ---------------------------------------------------------------- routing
    def _model(self, name: Optional[str], kind: str):
        of_kind = {n: m for n, m in self.models.items() if m.kind == kind}
        if name is None:
            if len(of_kind) == 1:
                return next(iter(of_kind.values()))
            if not of_kind:
                raise RequestError(404, f"no {kind} is served here (models: {', '.join(self.models)})")
            raise RequestError(400, f"several {kind}s are served; give \"model\": one of {', '.join(of_kind)}")
        if name not in of_kind:
            raise RequestError(404, f"model {name!r} is not a served {kind} ({', '.join(of_kind) or 'none'})")
        return of_kind[name]

    async def __call__(self, request: Request):
        try:
            return await self._route(request)
        except RequestError as e:
            return error_response(e.status, e.message)
        except TgraphError as e:
            return error_response(400, str(e))
        except Exception as e:  # a tgraph bug: answered, logged by Ray, the replica lives on
            return error_response(500, f"internal error: {type(e).__name__}: {e}")

    async def _route(self, request: Request):
        method, path = request.method, request.url.path.rstrip("/") or "/"
        if (method, path) not in ROUTES:
            if any(p == path for _, p in ROUTES):
                raise RequestError(405, f"{method} is not allowed on {path}")
            raise RequestError(404, f"no route {path} (routes: /v1/embeddings, /v1/completions, /v1/models, /health)")
        if path == "/health":
            return JSONResponse({"status": "ok", "pid": os.getpid(), "replica": self.replica,
                                 "models": {n: m.kind for n, m in self.models.items()}})
        if path == "/v1/models":
            return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tgraph",
                                                              "kind": m.kind} for n, m in self.models.items()]})
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {size} bytes exceeds {MAX_BODY_BYTES}")
        data = parse_json(await request.body())
        if path == "/v1/embeddings":
            req = parse_embedding_request(data)
            model = self._model(req.model, "encoder")
            return self._answer(await self._embed_batch((model.name, req)))
        req = parse_completion_request(data)
        model = self._model(req.model, "decoder")
        req.model = model.name
        if req.stream:
            return StreamingResponse(self._sse(model, req), media_type="text/event-stream")
        return self._answer(await self._complete_batch((model.name, req)))

    @staticmethod
    def _answer(result: Any):
        if isinstance(result, RequestError):
            return error_response(result.status, result.message)
        if isinstance(result, Exception):
            return error_response(500, f"internal error: {type(result).__name__}: {result}")
        return JSONResponse(result)

    # ---------------------------------------------------------------- batching
    def _run_batches(self, items: List[Any]) -> List[Any]:
        """Per model, one `run_batch`; a failure of tgraph's answers that model's requests with 500."""
        results: List[Any] = [None] * len(items)
        by_model: Dict[str, List[int]] = {}
        for i, (name, _) in enumerate(items):
            by_model.setdefault(name, []).append(i)
        for name, members in by_model.items():
            try:
                answers = self.models[name].run_batch([items[i][1] for i in members])
            except Exception as e:  # noqa: BLE001 - reported per request, never raised into Serve
                answers = [e] * len(members)
            for i, answer in zip(members, answers):
                results[i] = answer
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, items: List[Any]) -> List[Any]:
        return await asyncio.to_thread(self._run_batches, items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _complete_batch(self, items: List[Any]) -> List[Any]:
        return await asyncio.to_thread(self._run_batches, items)

    async def _sse(self, model, req):
        """Server-sent events: `data: {chunk}` per token, then `data: [DONE]`; an error mid-stream
        is one last `data: {"error": ...}` event."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()

        def produce():
            try:
                for chunk in model.stream(req):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as e:  # noqa: BLE001 - sent to the client as the last event
                status = e.status if isinstance(e, RequestError) else (400 if isinstance(e, TgraphError) else 500)
                loop.call_soon_threadsafe(queue.put_nowait, {"error": " ".join(str(e).split()), "status": status})
            loop.call_soon_threadsafe(queue.put_nowait, done)

        task = loop.run_in_executor(None, produce)
        while True:
            item = await queue.get()
            if item is done:
                break
            yield f"data: {json.dumps(item)}\n\n"
        await task
        yield "data: [DONE]\n\n"


def build_app(models: Mapping[str, str], *, replicas: int = 1, max_batch_size: int = 8, batch_wait_s: float = 0.005,
              replica_cpus: float = 1.0, threads: Optional[int] = None):
    """The bound application `tgraph serve` runs ({name: path} of the models)."""
    return TgraphServer.options(num_replicas=int(replicas), ray_actor_options={"num_cpus": float(replica_cpus)}
                                ).bind(dict(models), max_batch_size=max_batch_size, batch_wait_s=batch_wait_s,
                                       threads=threads)


def app(args: Dict[str, str]):
    """An application builder for Ray's own CLI (`serve run tgraph.serve:app models=a.onnx,gen_dir
    replicas=2`), e.g. on a cluster whose nodes all see the model paths."""
    from .models import named_models

    paths = [p for p in str(args.get("models", "")).split(",") if p]
    return build_app(named_models(paths), replicas=int(args.get("replicas", 1)),
                     max_batch_size=int(args.get("max_batch_size", 8)),
                     replica_cpus=float(args.get("replica_cpus", 1.0)),
                     threads=int(args["threads"]) if args.get("threads") else None)
