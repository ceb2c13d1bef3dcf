"""Engine replicas on Ray Serve behind one OpenAI-compatible router.

- `EngineReplica`: one deployment per replica (`slimserve-engine-{i}`, one actor each), so the
  router can send a request to the replica it chose; Ray Serve restarts a replica whose actor
  dies. A replica runs the same app as `slimserve serve` (server/api.py `create_app`) over its
  own engine and answers `forward(...)` by running that ASGI app in process, streaming its
  messages back, so every endpoint, error and stream is the single-server one.
- `Ingress`: the HTTP entry (a FastAPI app under `serve.ingress`). It tokenizes the prompt,
  picks a replica (`routing.Router`: prefix-aware by default), forwards, and streams the answer
  back. A replica that fails before answering is marked down and the request tries another
  once; one that fails mid-answer ends that answer with an OpenAI-style error.
- `/metrics` at the router merges every replica's, each series labelled `replica` (metrics.py).
- Replicas on one machine split its cores: replica i pins itself to its share
  (`os.sched_setaffinity`) and runs that many threads, so their OpenMP teams do not contend.

Why a plain Serve deployment and not `ray.serve.llm` (`LLMConfig(server_cls=...)`): see
docs/architecture.md. In short, our app already serves the OpenAI API, so the router only has
to forward bytes, and per-replica deployments let our own prefix index choose.
"""


import asyncio
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle

from slimserve.distributed.metrics import merge_metrics
from slimserve.distributed.routing import Router

logger = logging.getLogger("slimserve")


def _cores(index: int, count: int) -> list[int]:
    """Replica `index`'s share of this machine's cores (all of them if fewer than replicas)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return cores
    per = len(cores) // count
    return cores[index * per : (index + 1) * per]


async def _asgi(app, method, path, query, headers, body, gone: asyncio.Event):
    """Run one HTTP request through an ASGI app in process; yields its send() messages."""
    out: asyncio.Queue = asyncio.Queue()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "client": ("router", 0), "server": ("replica", 80),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }  # fmt: skip
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: out.put_nowait(None))
    try:
        while (message := await out.get()) is not None:
            # Body chunks already queued go out as one: each item through Ray costs a few
            # hundred microseconds of the cores the engine needs, so a busy replica sends
            # fewer, larger items instead of falling behind token by token.
            while message["type"] == "http.response.body" and not out.empty():
                nxt = out.get_nowait()
                if nxt is None or nxt["type"] != "http.response.body":
                    yield message
                    message = nxt
                    break
                message = dict(nxt, body=message.get("body", b"") + nxt.get("body", b""))
            if message is None:
                break
            yield message
    finally:
        gone.set()  # the router went away (or we are done): the app sees a disconnect
        await task


# Serve caps a replica's concurrent calls (5 by default); the engine batches and queues its own
# (`--max-queue`), and the router forwards every request at once.
MAX_ONGOING = 4096


@serve.deployment(
    ray_actor_options={"num_cpus": 1}, health_check_period_s=2, max_ongoing_requests=MAX_ONGOING
)
class EngineReplica:
    def __init__(self, index: int, count: int, model: str | None, settings: dict, name: str,
                 api_key: str | None = None, max_queue: int | None = None):  # fmt: skip
        t0 = time.perf_counter()
        from slimserve.config import engine_config
        from slimserve.engine.async_engine import AsyncEngine
        from slimserve.server.api import create_app
        from slimserve.spec_decode import build_engine

        self.index, self.cores = index, _cores(index, count)
        os.sched_setaffinity(0, self.cores)
        settings = dict(settings)
        settings.setdefault("num_threads", len(self.cores))
        config = engine_config(model, **settings)
        self.engine = AsyncEngine(lambda: build_engine(config), max_queue=max_queue)
        self.app = create_app(self.engine, name, api_key)
        logger.warning("replica %d ready in %.1f s on cores %s", index, time.perf_counter() - t0,
                       self.cores)  # fmt: skip

    async def forward(self, method: str, path: str, query: str, headers: list, body: bytes):
        """The app's answer: first {"status", "headers"}, then body chunks (bytes)."""
        gone = asyncio.Event()
        async for m in _asgi(self.app, method, path, query, headers, body, gone):
            if m["type"] == "http.response.start":
                hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in m["headers"]]
                yield {"status": m["status"], "headers": hdrs}
            elif m["type"] == "http.response.body" and m.get("body"):
                yield m["body"]

    async def metrics(self) -> str:
        """This replica's /metrics text (the router merges every replica's: metrics.py)."""
        body = b""
        async for m in _asgi(self.app, "GET", "/metrics", "", [], b"", asyncio.Event()):
            if m["type"] == "http.response.body":
                body += m.get("body", b"")
        return body.decode()

    def stats(self) -> dict:
        s = self.engine.stats()
        return {
            "index": self.index, "pid": os.getpid(), "cores": self.cores,
            "threads": self.engine.engine.config.num_threads,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits, "running": s.running,
            "waiting": s.waiting, "steps": s.steps,
        }  # fmt: skip

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")


def _ingress_app():
    app = FastAPI(title="slimserve router", docs_url=None, redoc_url=None)

    def error(status: int, message: str, type_: str = "server_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                       "code": None}}, status_code=status)  # fmt: skip

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
    @serve.ingress(app)
    class Ingress:
        def __init__(self, engines: list[DeploymentHandle], model: str | None, policy: str,
                     block_size: int, decode_cost: int):  # fmt: skip
            from slimserve.loader.resolve import open_model

            self.engines = engines
            self.router = Router(len(engines), policy, block_size, decode_cost)
            self.tokenizer = open_model(model).tokenizer()

        def _prompt_ids(self, path: str, body: bytes) -> list[int] | None:
            """The prompt's tokens as the replica will see them (None: not a generation)."""
            if not path.endswith(("chat/completions", "v1/completions")):
                return None
            try:
                req = json.loads(body)
                if "messages" in req:
                    return self.tokenizer.encode(self.tokenizer.apply_chat_template(
                        [dict(m) for m in req["messages"]]))  # fmt: skip
                prompt = req.get("prompt")
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                    prompt = prompt[0]
                if isinstance(prompt, str):
                    return self.tokenizer.encode(prompt)
                return [int(t) for t in prompt] if isinstance(prompt, list) else None
            except Exception:  # malformed: the replica answers with the precise error
                return None

        @app.get("/router/stats")
        async def stats(self):
            async def one(h):
                try:
                    return await asyncio.wait_for(h.stats.remote(), timeout=5)
                except Exception as e:
                    return {"error": repr(e)}

            replicas = await asyncio.gather(*(one(h) for h in self.engines))
            return {"router": self.router.summary(), "replicas": replicas}

        @app.get("/metrics")
        async def metrics(self):
            """Every replica's metrics, labelled `replica`: one scrape sees the whole service."""

            async def one(h):
                try:
                    return await asyncio.wait_for(h.metrics.remote(), timeout=5)
                except Exception as e:  # down or restarting: slimserve_replica_up says so
                    logger.warning("a replica's metrics did not come: %r", e)
                    return None

            texts = await asyncio.gather(*(one(h) for h in self.engines))
            body = merge_metrics(dict(enumerate(texts)))
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def proxy(self, path: str, request: Request):
            body = await request.body()
            ids = self._prompt_ids(path, body)
            headers = [(k, v) for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length")]  # fmt: skip
            args = (request.method, "/" + path, request.url.query, headers, body)
            tried = set()
            while True:
                replica, matched = self.router.choose(ids)
                if replica in tried:  # every replica failed before answering
                    return error(503, "no engine replica could take the request; retry later")
                tried.add(replica)
                ticket = self.router.started(replica, ids, matched)
                stream = self.engines[replica].options(stream=True).forward.remote(*args)
                try:
                    start = await stream.__anext__()
                    break
                except Exception as e:  # the replica died or is restarting
                    logger.warning("replica %d failed before answering: %r", replica, e)
                    self.router.finished(replica, ticket, failed=True)

            async def chunks():
                failed = True
                try:
                    async for chunk in stream:
                        yield chunk
                    failed = False
                except Exception as e:  # the replica died mid-answer: end it with an error
                    logger.warning("replica %d failed mid-answer: %r", replica, e)
                    msg = {"error": {"message": f"engine replica {replica} failed mid-answer",
                                     "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(msg)}\n\n".encode()
                finally:
                    self.router.finished(replica, ticket, failed=failed)

            hdrs = {k: v for k, v in start["headers"] if k.lower() != "content-length"}
            return StreamingResponse(chunks(), status_code=start["status"], headers=hdrs)

    return Ingress


def deploy(
    model: str | None = None,
    replicas: int = 2,
    policy: str = "prefix",
    settings: dict | None = None,
    served_name: str | None = None,
    decode_cost: int = 128,
    cpus_per_replica: float = 1,
    api_key: str | None = None,
    max_queue: int | None = None,
):
    """Deploy the replicas and the router on the connected Ray cluster (ray.init first, and
    serve.start for the HTTP host and port). Returns the router's handle."""
    from slimserve.config import CacheConfig
    from slimserve.loader.resolve import open_model

    settings = dict(settings or {})
    name = served_name or os.path.splitext(os.path.basename(open_model(model).path))[0]
    block = settings.get("block_size") or CacheConfig().block_size
    engines = [
        EngineReplica.options(
            name=f"slimserve-engine-{i}", ray_actor_options={"num_cpus": cpus_per_replica}
        ).bind(i, replicas, model, settings, name, api_key, max_queue)
        for i in range(replicas)
    ]
    ingress = _ingress_app().options(name="slimserve-router")
    return serve.run(
        ingress.bind(engines, model, policy, block, decode_cost), name="slimserve", route_prefix="/"
    )


def wait_ready(url: str, timeout: float = 120) -> None:
    """Until the router answers /health through a replica."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router at {url} did not become ready in {timeout} s")
        time.sleep(0.5)


def serve_forever(args, settings: dict) -> int:
    """`slimserve serve --replicas N`: start (or join) Ray, deploy, serve until SIGINT/SIGTERM."""
    import signal
    import sys
    import threading

    import ray

    from slimserve.errors import SlimserveError

    if args.replicas < 1:
        print("error: --replicas must be at least 1", file=sys.stderr)
        return 2
    ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        deploy(args.model, args.replicas, args.routing, settings, args.served_model_name,
               api_key=args.api_key, max_queue=args.max_queue)  # fmt: skip
        url = f"http://{args.host}:{args.port}"
        wait_ready(url)
        print(f"[slimserve] {args.replicas} replicas on Ray Serve behind {args.routing} routing "
              f"at {url}/v1 (per-replica stats: {url}/router/stats)", file=sys.stderr,
              flush=True)  # fmt: skip
        stop.wait()
        return 0
    except (SlimserveError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        serve.shutdown()
        ray.shutdown()
