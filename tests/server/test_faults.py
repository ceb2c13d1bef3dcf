"""Fault injection: a step that raises for one request, for every request, a tokenizer that
raises. The faulty request ends with a clean error, everyone else gets the answer they would have
got, no KV block leaks; when the engine itself is broken, every waiter hears so and the owner is
told to stop (never a live process that answers 500 forever)."""

import asyncio
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from slimserve import SamplingParams
from slimserve.config import engine_config
from slimserve.engine.async_engine import AsyncEngine
from slimserve.engine.engine import Engine
from slimserve.errors import EngineDead
from slimserve.server.api import create_app

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = ["The capital of France is", "1, 2, 3,", "Water boils at", "Once upon a time"]


@pytest.fixture(scope="module")
def engine(gguf_path):
    return Engine(engine_config(gguf_path, kv_cache_memory="64MiB"))


def run(engine, ids):
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def alone(engine, prompts):
    return [run(engine, [engine.add_request(p, GREEDY)])[0].outputs[0].token_ids for p in prompts]


def poison(engine, monkeypatch, where: str, bad: set):
    """Make `where` ("execute" or "detokenize") raise whenever a request of `bad` takes part."""
    if where == "execute":
        real = engine.runner.execute

        def execute(plan):
            if any(s.req.request_id in bad for s in plan.spans):
                raise RuntimeError("injected fault")
            return real(plan)

        monkeypatch.setattr(engine.runner, "execute", execute)
    else:
        real_make = engine.make_request

        def make_request(prompt, params, request_id, priority=0):
            req = real_make(prompt, params, request_id, priority)
            if request_id in bad:

                def add(token):
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected fault")

                req.detokenizer.add = add
            return req

        monkeypatch.setattr(engine, "make_request", make_request)


@pytest.mark.parametrize("where", ["execute", "detokenize"])
def test_a_fault_fails_only_its_request(engine, monkeypatch, where):
    expected = alone(engine, PROMPTS)
    free = engine.kv.num_free_blocks
    poison(engine, monkeypatch, where, {"bad"})
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:2]]
    ids.append(engine.add_request("Tell me a story", GREEDY, request_id="bad"))
    ids += [engine.add_request(p, GREEDY) for p in PROMPTS[2:]]
    outs = run(engine, ids)
    bad = outs.pop(2)
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert "injected fault" in bad.error
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in outs)
    assert engine.kv.num_free_blocks == free and not engine.requests
    monkeypatch.undo()
    assert alone(engine, PROMPTS[:1]) == expected[:1]  # and it keeps serving


def test_a_broken_engine_fails_every_waiter_and_asks_to_stop(gguf_path):
    fatal = threading.Event()

    def make():
        e = Engine(engine_config(gguf_path, kv_cache_memory="32MiB"))

        def broken(plan):
            raise RuntimeError("the model is gone")

        e.runner.execute = broken
        return e

    async_engine = AsyncEngine(make, on_fatal=lambda exc: fatal.set())
    app = create_app(async_engine, "m")
    try:

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                body = {"prompt": "Hello", "max_tokens": 4}
                plain = [c.post("/v1/completions", json=body) for _ in range(3)]
                stream = c.post("/v1/completions", json={**body, "stream": True})
                return await asyncio.gather(*plain, stream)

        *plain, stream = asyncio.run(main())
        for r in plain:
            assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        if stream.status_code == 200:  # it started before the engine stopped: an error event
            assert '"error"' in stream.text and "[DONE]" not in stream.text
        else:  # it arrived after
            assert stream.status_code == 500 and "stopped" in stream.json()["error"]["message"]
        assert fatal.wait(10) and isinstance(async_engine.errored, EngineDead)
        with TestClient(app) as c:
            assert c.get("/health").status_code == 503
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 500 and "stopped" in r.json()["error"]["message"]
    finally:
        async_engine.shutdown()
