"""OpenAI-compatible HTTP API over the AsyncEngine: a thin layer that validates, maps and streams.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, mapped in one place
(`_error`). A client that disconnects aborts its requests; the engine keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from slimserve.engine.async_engine import AsyncEngine
from slimserve.errors import CapacityError, ContextLengthExceeded, InvalidRequest, SlimserveError
from slimserve.server.extras import router as extras
from slimserve.server.metrics import Metrics
from slimserve.server.protocol import ChatCompletionRequest, CompletionRequest
from slimserve.server.responses import respond
from slimserve.server.tools import ToolPlan

logger = logging.getLogger("slimserve")


def _error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": _printable(message), "type": type_, "param": param, "code": code}}
    if param is not None:
        body["error"]["param"] = _printable(param)
    return JSONResponse(body, status_code=status, headers=headers)


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: an error about a lone surrogate must not fail on it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_type_name(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int") or "[" in part or "function-" in part)


MAX_BODY_BYTES = 32 << 20
# Paths the API key guards: the OpenAI API and the conveniences beside it. The chat page and its
# files are public (the page asks for the key), as are /health and /metrics.
GUARDED = ("/v1/", "/tokenize", "/detokenize", "/props")

MAX_CHOICES = 256  # engine requests one HTTP request may start


class _Guard:
    """ASGI middleware run before routing and body parsing: the API key (an unauthenticated caller
    learns nothing about validation) and a bound on the declared body size."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and getattr(self.state, "draining", False):
            if scope["path"].startswith("/v1/") or scope["path"] == "/health":
                response = _error(
                    503, "the server is shutting down; retry elsewhere", "capacity_error",
                    headers={"Retry-After": "5"},
                )  # fmt: skip
                return await response(scope, receive, send)
        if scope["type"] == "http" and scope["path"].startswith(GUARDED):
            headers = dict(scope["headers"])
            key = self.state.server.api_key
            if key is not None and headers.get(b"authorization", b"") != f"Bearer {key}".encode():
                response = _error(
                    401, "invalid or missing API key", "authentication_error",
                    code="invalid_api_key",
                )  # fmt: skip
                return await response(scope, receive, send)
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                response = _error(
                    413, f"the request body must be at most {MAX_BODY_BYTES} bytes",
                    "invalid_request_error",
                )  # fmt: skip
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


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


def build_app(
    make_engine: Callable,
    served_name: str | None = None,
    api_key: str | None = None,
    max_queue: int | None = None,
) -> FastAPI:
    """The app factory: an app whose lifespan builds the engine (`make_engine` returns an
    Engine; it runs on the engine's own thread) at startup and stops it at shutdown, so any
    ASGI host can run or mount it (uvicorn here, Ray Serve's ingress later)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine = AsyncEngine(make_engine, max_queue=max_queue)
        await _warm(async_engine)
        name = served_name or os.path.splitext(async_engine.engine.model_name)[0]
        app.state.server = Server(async_engine, name, api_key)
        try:
            yield
        finally:
            async_engine.shutdown()

    return _app(lifespan)


def _chat_ids(tokenizer, plan: ToolPlan | None, messages: list[dict]) -> list[int]:
    prompt = plan.render(tokenizer, messages) if plan else tokenizer.apply_chat_template(messages)
    return tokenizer.encode(prompt)


def tool_plan(body) -> ToolPlan | None:
    """The request's tools resolved (None when it has none and asks for none)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    named = choice.model_dump() if hasattr(choice, "model_dump") else choice
    tools = [t.model_dump() for t in body.tools]
    return ToolPlan(tools, named, body.parallel_tool_calls)


def create_app(async_engine: AsyncEngine, served_name: str, api_key: str | None = None) -> FastAPI:
    """An app over an engine that is already running (its owner shuts it down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _warm(async_engine)
        yield

    app = _app(lifespan)
    app.state.server = Server(async_engine, served_name, api_key)
    return app


async def _warm(async_engine: AsyncEngine) -> None:
    """What the first chat would otherwise pay for, done at startup (the engine warms its own
    steps, AsyncEngine): anyio's asyncio backend, imported by the first streamed response
    (~15 ms), and the chat template's compilation (~90 ms with jinja's import)."""
    await anyio.sleep(0)
    try:
        async_engine.engine.tokenizer.compile_template()
    except Exception as e:  # a template jinja cannot read fails each chat, as before
        logger.warning("the chat template does not compile: %r", e)


def _app(lifespan) -> FastAPI:
    app = FastAPI(title="slimserve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.draining = False  # set by server/run.py on SIGTERM
    app.add_middleware(_Guard, state=app.state)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # Of a union's failed branches, the one that got furthest: a check that failed on a value
        # of the right type, else the deepest mismatch (not "should be a string" for a list).
        errors = sorted(
            exc.errors(),
            key=lambda e: (e.get("type", "").endswith("_type"), -len(e.get("loc", ()))),
        )
        err = errors[0] if errors else {}
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):  # raised by a validator of ours, with its param
            return _error(400, str(cause), cause.error_type, cause.param)
        # A union's member names (str, list[...]) in the location say nothing to a client.
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_name(p)]
        param = ".".join(loc) or None
        message = err.get("msg", "invalid request").removeprefix("Value error, ")
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

    @app.get("/health")
    async def health():
        srv: Server = app.state.server  # set when the app was built
        if srv.engine.errored is not None:
            return _error(503, "the engine has stopped", "internal_error")
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics():
        srv: Server = app.state.server  # set when the app was built
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(extras)  # the chat page, /tokenize, /detokenize, /props

    @app.get("/v1/models")
    async def models():
        srv: Server = app.state.server  # set when the app was built
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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv: Server = app.state.server  # set when the app was built
        srv.check_model(body.model)
        messages = [m.as_dict() for m in body.messages]
        plan = tool_plan(body)
        # The template and the tokenizer on a worker thread: the loop serves other streams.
        ids = await asyncio.to_thread(_chat_ids, srv.tokenizer, plan, messages)
        max_tokens = srv.max_tokens(body.requested_max_tokens(), len(ids))
        params = [body.sampling_params(max_tokens, i, body.num_logprobs()) for i in range(body.n)]
        if plan is not None and (calls := plan.constraint()) is not None:
            if params[0].structured is not None:
                raise InvalidRequest(
                    "a required tool call and response_format or structured_outputs cannot be"
                    " combined", param="tool_choice",
                )  # fmt: skip
            params = [dataclasses.replace(p, structured=calls) for p in params]
        return await respond(srv, request, body, [ids] * body.n, params, chat=True, tools=plan)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        srv: Server = app.state.server  # set when the app was built
        srv.check_model(body.model)
        if len(body.prompts()) * body.n > MAX_CHOICES:
            raise InvalidRequest(f"at most {MAX_CHOICES} prompts times n per request", "n")
        given = body.prompts()
        prompts = await asyncio.to_thread(
            lambda: [srv.tokenizer.encode(p) if isinstance(p, str) else p for p in given]
        )
        # With echo and logprobs, every prompt token is scored as well.
        scored = body.logprobs if body.echo else None
        ids, params, echoed = [], [], []
        for text, p in zip(given, prompts):
            # max_tokens 0 (echo only) draws one token that the response leaves out.
            max_tokens = max(1, srv.max_tokens(16 if body.max_tokens is None else body.max_tokens,
                                               len(p)))  # fmt: skip
            if body.echo:  # decoded once for all n choices of a prompt given as ids
                echoed += [text if isinstance(text, str) else srv.tokenizer.decode(p)] * body.n
            for i in range(body.n):
                ids.append(p)
                params.append(body.sampling_params(max_tokens, i, body.logprobs, scored))
        return await respond(srv, request, body, ids, params, chat=False, echo=echoed or None)

    return app
