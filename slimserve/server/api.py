"""OpenAI-compatible HTTP API over the AsyncEngine: a thin layer that validates, maps and streams.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, mapped in one place
(`_error`). A client that disconnects aborts its requests; the engine keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from slimserve.engine.async_engine import AsyncEngine
from slimserve.errors import CapacityError, ContextLengthExceeded, SlimserveError
from slimserve.server.metrics import Metrics
from slimserve.server.protocol import ChatCompletionRequest, CompletionRequest


def _error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code


class Server:
    """Per-app state: the engine, its tokenizer, the served model name, metrics."""

    def __init__(self, async_engine: AsyncEngine, served_name: str, api_key: str | None):
        self.engine = async_engine
        self.tokenizer = async_engine.engine.tokenizer
        self.max_model_len = async_engine.engine.max_model_len
        self.served_name = served_name
        self.api_key = api_key
        self.metrics = Metrics(async_engine)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_name:
            raise ApiError(
                404,
                f"model '{name}' does not exist; this server serves '{self.served_name}'",
                "invalid_request_error",
                "model_not_found",
            )

    def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthExceeded(
                f"the prompt has {prompt_len} tokens; the model's context length is "
                f"{self.max_model_len}",
                param="messages",
            )
        return room if requested is None else requested

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def create_app(async_engine: AsyncEngine, served_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="slimserve", docs_url=None, redoc_url=None)
    srv = Server(async_engine, served_name, api_key)
    app.state.server = srv

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return _error(
            400, f"{param}: {message}" if param else message, "invalid_request_error", param
        )

    @app.exception_handler(SlimserveError)
    async def _slimserve(request: Request, exc: SlimserveError):
        headers = {"Retry-After": "1"} if isinstance(exc, CapacityError) else None
        return _error(
            exc.http_status, str(exc), exc.error_type, getattr(exc, "param", None), headers=headers
        )

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return _error(exc.status, str(exc), exc.type, code=exc.code)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    def authorize(request: Request) -> None:
        if srv.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {srv.api_key}":
            raise ApiError(
                401, "invalid or missing API key", "authentication_error", "invalid_api_key"
            )

    @app.get("/health")
    async def health():
        if srv.engine.errored is not None:
            return _error(503, "the engine has stopped", "internal_error")
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": srv.served_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "slimserve",
                    "max_model_len": srv.max_model_len,
                }
            ],
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = srv.tokenizer.encode(srv.tokenizer.apply_chat_template(messages))
        max_tokens = srv.max_tokens(body.requested_max_tokens(), len(ids))
        params = [body.sampling_params(max_tokens, i, body.num_logprobs()) for i in range(body.n)]
        return await _run(srv, request, body, [ids] * body.n, params, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        prompts = [srv.tokenizer.encode(p) if isinstance(p, str) else p for p in body.prompts()]
        ids, params = [], []
        for p in prompts:
            max_tokens = srv.max_tokens(body.max_tokens or 16, len(p))
            for i in range(body.n):
                ids.append(p)
                params.append(body.sampling_params(max_tokens, i, body.logprobs))
        return await _run(srv, request, body, ids, params, chat=False)

    return app


async def _run(srv: Server, request: Request, body, prompts, params, chat: bool):
    """Submit every choice's request, then stream or collect. Submission errors (bad prompt,
    too long, queue full) raise before any byte of the response is sent."""
    base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    queue: asyncio.Queue = asyncio.Queue()
    streams = []
    try:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            streams.append(srv.engine.submit(p, sp, f"{base}-{i}", queue))
    except BaseException:
        for s in streams:
            s.close()
        raise
    job = _Job(srv, base, body, prompts, streams, queue, chat)
    if body.stream:
        return StreamingResponse(job.sse(), media_type="text/event-stream")
    task = asyncio.ensure_future(job.collect())
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # its finally aborts every choice
            return Response(status_code=499)
    return JSONResponse(task.result())


class _Job:
    """One HTTP request's choices, merged from one queue, shaped as OpenAI responses."""

    def __init__(self, srv, base, body, prompts, streams, queue, chat):
        self.srv, self.id, self.body, self.chat = srv, base, body, chat
        self.prompts, self.streams, self.queue = prompts, streams, queue
        self.index = {s.request_id: i for i, s in enumerate(streams)}
        self.created = int(time.time())
        self.start = time.monotonic()
        self.first: dict[int, float] = {}
        self.sent_text = [""] * len(streams)
        self.sent_tokens = [0] * len(streams)
        self.finals: dict[int, object] = {}

    async def outputs(self):
        """(choice index, RequestOutput) as the engine produces them; aborts leftovers on exit."""
        try:
            while len(self.finals) < len(self.streams):
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failed: {item}")
                i = self.index[item.request_id]
                if item.outputs[0].token_ids and i not in self.first:
                    self.first[i] = time.monotonic()
                if item.finished:
                    self.finals[i] = item
                    self.streams[i].finished = True
                    self._observe(i, item)
                yield i, item
        finally:
            for i, s in enumerate(self.streams):
                if i not in self.finals:
                    s.close()
                    self.srv.metrics.requests.labels("abort").inc()

    def _observe(self, i, out):
        c = out.outputs[0]
        self.srv.metrics.observe(
            c.finish_reason or "abort",
            len(out.prompt_token_ids),
            len(c.token_ids),
            self.start,
            self.first.get(i),
            time.monotonic(),
        )

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts[:: self.body.n])
        completion = sum(len(o.outputs[0].token_ids) for o in self.finals.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _logprobs(self, completion, start: int, end: int):
        if completion.logprobs is None:
            return None
        n = self.body.top_logprobs if self.chat else self.body.logprobs
        text = self.srv.token_text
        toks = completion.token_ids[start:end]
        entries = completion.logprobs[start:end]
        ranked = [sorted(e.items(), key=lambda kv: -kv[1])[: n or 0] for e in entries]
        if self.chat:
            return {
                "content": [
                    {
                        "token": text(t),
                        "logprob": e[t],
                        "bytes": list(text(t).encode()),
                        "top_logprobs": [
                            {"token": text(a), "logprob": lp, "bytes": list(text(a).encode())}
                            for a, lp in r
                        ],
                    }
                    for t, e, r in zip(toks, entries, ranked)
                ]
            }
        return {
            "tokens": [text(t) for t in toks],
            "token_logprobs": [e[t] for t, e in zip(toks, entries)],
            "top_logprobs": [{text(a): lp for a, lp in r} for r in ranked],
        }

    async def collect(self) -> dict:
        async for _ in self.outputs():
            pass
        choices = []
        for i in range(len(self.streams)):
            c = self.finals[i].outputs[0]
            lp = self._logprobs(c, 0, len(c.token_ids))
            if self.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                choices.append(
                    {"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.srv.served_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list, usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.srv.served_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self):
        if self.chat:
            yield self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(self.streams))
                ]
            )
        try:
            async for i, out in self.outputs():
                c = out.outputs[0]
                delta = c.text[len(self.sent_text[i]) :]
                lp = self._logprobs(c, self.sent_tokens[i], len(c.token_ids))
                self.sent_text[i], self.sent_tokens[i] = c.text, len(c.token_ids)
                if not delta and not out.finished and lp is None:
                    continue
                if self.chat:
                    choice = {
                        "index": i,
                        "delta": {"content": delta} if delta else {},
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                else:
                    choice = {
                        "index": i,
                        "text": delta,
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                yield self._chunk([choice])
        except RuntimeError as e:
            err = {
                "error": {"message": str(e), "type": "internal_error", "param": None, "code": None}
            }
            yield f"data: {json.dumps(err)}\n\n"
            return
        if self.body.include_usage:
            yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"
