"""OpenAI-compatible HTTP API over the AsyncEngine: a thin layer that validates, maps and streams.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, mapped in one place
(`_error`). A client that disconnects aborts its requests; the engine keeps serving the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from slimserve.engine.async_engine import AsyncEngine
from slimserve.errors import CapacityError, ContextLengthExceeded, SlimserveError
from slimserve.server.metrics import Metrics
from slimserve.server.protocol import ChatCompletionRequest, CompletionRequest
from slimserve.server.responses import respond


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
        name = served_name or os.path.splitext(async_engine.engine.model_name)[0]
        app.state.server = Server(async_engine, name, api_key)
        try:
            yield
        finally:
            async_engine.shutdown()

    return _app(lifespan)


def create_app(async_engine: AsyncEngine, served_name: str, api_key: str | None = None) -> FastAPI:
    """An app over an engine that is already running (its owner shuts it down)."""
    app = _app(None)
    app.state.server = Server(async_engine, served_name, api_key)
    return app


def _app(lifespan) -> FastAPI:
    app = FastAPI(title="slimserve", docs_url=None, redoc_url=None, lifespan=lifespan)

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
        srv: Server = app.state.server  # set when the app was built
        if srv.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {srv.api_key}":
            raise ApiError(
                401, "invalid or missing API key", "authentication_error", "invalid_api_key"
            )

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

    @app.get("/v1/models", dependencies=[Depends(authorize)])
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

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv: Server = app.state.server  # set when the app was built
        srv.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = srv.tokenizer.encode(srv.tokenizer.apply_chat_template(messages))
        max_tokens = srv.max_tokens(body.requested_max_tokens(), len(ids))
        params = [body.sampling_params(max_tokens, i, body.num_logprobs()) for i in range(body.n)]
        return await respond(srv, request, body, [ids] * body.n, params, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        srv: Server = app.state.server  # set when the app was built
        srv.check_model(body.model)
        prompts = [srv.tokenizer.encode(p) if isinstance(p, str) else p for p in body.prompts()]
        ids, params = [], []
        for p in prompts:
            max_tokens = srv.max_tokens(body.max_tokens or 16, len(p))
            for i in range(body.n):
                ids.append(p)
                params.append(body.sampling_params(max_tokens, i, body.logprobs))
        return await respond(srv, request, body, ids, params, chat=False)

    return app
