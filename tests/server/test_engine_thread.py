"""The engine thread and the event loop: commands instead of a lock, and the app factory."""

import asyncio
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from slimserve.config import engine_config
from slimserve.engine.async_engine import AsyncEngine
from slimserve.engine.engine import Engine
from slimserve.server.api import build_app, create_app

STEP_S = 1.0


@pytest.fixture(scope="module")
def slow_engine(gguf_path):
    """An engine whose every step takes at least STEP_S (as a long prefill would)."""

    def make():
        engine = Engine(engine_config(gguf_path, kv_cache_memory="32MiB"))
        real = engine.step

        def slow_step():
            time.sleep(STEP_S)
            return real()

        engine.step = slow_step
        return engine

    async_engine = AsyncEngine(make)
    yield async_engine
    async_engine.shutdown()


def test_a_step_in_progress_does_not_stall_the_event_loop(slow_engine):
    app = create_app(slow_engine, "m")
    body = {"prompt": "Hello", "max_tokens": 2}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            first = asyncio.create_task(c.post("/v1/completions", json=body))
            await asyncio.sleep(0.3)  # the engine thread is now inside a slow step
            second = asyncio.create_task(c.post("/v1/completions", json=body))  # submits now
            metrics = asyncio.create_task(c.get("/metrics"))
            t0 = time.monotonic()
            health = await c.get("/health")
            waited = time.monotonic() - t0
            results = [await first, await second, await metrics]
        return health, waited, results

    health, waited, results = asyncio.run(main())
    assert health.status_code == 200
    # A submit or scrape used to take the engine's lock on the loop, waiting out the step.
    assert waited < STEP_S / 2
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 2 for r in results[:2])
    assert slow_engine.stats().running == 0


def test_the_app_factory_builds_the_engine_in_its_lifespan(gguf_path):
    made = []

    def make():
        made.append(threading.current_thread().name)
        return Engine(engine_config(gguf_path, kv_cache_memory="32MiB"))

    app = build_app(make, api_key="k")
    assert not made  # nothing is built until the app starts
    with TestClient(app) as client:
        assert made == ["slimserve-engine"]
        headers = {"Authorization": "Bearer k"}
        models = client.get("/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
        r = client.post(
            "/v1/completions",
            headers=headers,
            json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        engine = app.state.server.engine
    assert not engine._thread.is_alive()  # shut down with the app


def test_templates_tokenizing_and_grammars_run_off_the_event_loop(slow_engine):
    """A long prompt's template and tokens, and a schema's grammar, are built on worker
    threads: the loop that serves every other stream never runs them."""
    engine = slow_engine.engine
    seen = []
    calls = {"make_request": engine.make_request, "apply_chat_template": None, "encode": None}
    tok = engine.tokenizer
    calls["apply_chat_template"], calls["encode"] = tok.apply_chat_template, tok.encode

    def spy(name):
        def call(*a, **k):
            seen.append((name, threading.current_thread()))
            return calls[name](*a, **k)

        return call

    app = create_app(slow_engine, "m")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    chat = {"messages": [{"role": "user", "content": "hi " * 500}], "max_tokens": 2,
            "response_format": fmt}  # fmt: skip

    async def main():
        loop_thread = threading.current_thread()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            r1 = await c.post("/v1/chat/completions", json=chat)
            r2 = await c.post("/v1/completions", json={"prompt": "hi " * 500, "max_tokens": 2})
        return loop_thread, r1, r2

    engine.make_request = spy("make_request")
    tok.apply_chat_template, tok.encode = spy("apply_chat_template"), spy("encode")
    try:
        loop_thread, r1, r2 = asyncio.run(main())
    finally:
        del engine.make_request, tok.apply_chat_template, tok.encode
    assert r1.status_code == 200 and r2.status_code == 200
    names = {name for name, _ in seen}
    assert names == {"make_request", "apply_chat_template", "encode"}
    assert all(thread is not loop_thread for _, thread in seen)
