"""The server under load and at shutdown: overload, a disconnect storm, SIGTERM mid-stream.

Each test asserts that nothing leaks (requests running or waiting, KV blocks) and that the
process ends cleanly (exit 0, no traceback)."""

import asyncio
import json
import subprocess
import time

import httpx

from .conftest import API_KEY, ServerProcess, metric

MODEL = "smollm2"


def _settled(http) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        metric(http, "slimserve_num_requests_running")
        or metric(http, "slimserve_num_requests_waiting")
    ):
        time.sleep(0.1)


def test_disconnect_storm_and_overload_leak_nothing(server, http):
    """48 clients at once: streams dropped after a few chunks, non-streamed requests that time
    out, streams that finish, and completions with n=4; then nothing runs, nothing waits, every
    KV block is back, and the server answers as before."""
    blocks_before = metric(http, "slimserve_kv_cache_blocks_used")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": MODEL, "max_tokens": 400, "ignore_eos": True}

    async def storm():
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=60) as c:

            async def drop_stream(i):
                body = {**long, "prompt": f"Story {i}:", "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n > 2 + i % 7:
                            return "dropped"

            async def time_out(i):
                try:
                    await c.post(
                        "/v1/completions",
                        json={**long, "prompt": f"Essay {i}:"},
                        timeout=0.5 + i % 3,
                    )
                except httpx.TimeoutException:
                    return "timed out"

            async def finish(i):
                r = await c.post(
                    "/v1/completions",
                    json={"model": MODEL, "prompt": f"{i} + {i} =", "max_tokens": 4, "n": 4},
                )
                return r.status_code

            jobs = [drop_stream(i) for i in range(20)] + [time_out(i) for i in range(16)]
            jobs += [finish(i) for i in range(12)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(storm())
    assert results.count("dropped") == 20 and results.count("timed out") == 16
    assert all(code in (200, 503) for code in results[36:]) and 200 in results[36:]
    _settled(http)
    assert metric(http, "slimserve_num_requests_running") == 0
    assert metric(http, "slimserve_num_requests_waiting") == 0
    assert metric(http, "slimserve_kv_cache_blocks_used") == blocks_before
    assert http.get("/health").status_code == 200


def test_queue_full_gets_503_with_retry_after_then_shutdown_is_clean():
    srv = ServerProcess("--max-queue", "1", "--max-num-seqs", "1")
    try:

        async def flood():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await asyncio.gather(
                    *(
                        c.post("/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": 8})
                        for i in range(8)
                    )
                )

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "capacity_error"
        assert (
            httpx.post(
                srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
            ).status_code
            == 200
        )
    finally:
        code, log = srv.stop()
    assert code == 0, log
    assert "serving" in log and "KV cache" in log


def _streams_then_sigterm(srv: ServerProcess, n: int, max_tokens: int):
    """n streams started, then SIGTERM: (texts and whether each ended with [DONE], the status of
    a request sent during the drain, the exit code, the log)."""
    import signal
    import threading

    results, started = [None] * n, threading.Barrier(n + 1)

    def one(i):
        with httpx.stream(
            "POST", srv.url + "/v1/completions", timeout=120,
            json={"prompt": f"Tell story {i}:", "max_tokens": max_tokens, "stream": True,
                  "ignore_eos": True},
        ) as r:  # fmt: skip
            lines = r.iter_lines()
            first = next(lines)
            started.wait()
            results[i] = [first, *lines]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started.wait()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    late = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    for t in threads:
        t.join(120)
    try:  # it exits by itself once drained
        code = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        code = srv.proc.wait()
    return results, late, code, srv.proc.stdout.read()


def test_sigterm_drains_in_flight_streams_then_exits_cleanly():
    srv = ServerProcess()
    results, late, code, log = _streams_then_sigterm(srv, 4, 160)
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["type"] == "capacity_error"
    for lines in results:
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]"  # every stream ran to its end
        assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert code == 0 and "Traceback" not in log and "CancelledError" not in log, log


def test_drain_past_its_deadline_ends_streams_with_an_error_event():
    srv = ServerProcess("--drain-timeout", "1")
    results, _, code, log = _streams_then_sigterm(srv, 3, 2000)
    for lines in results:
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert "shutting down" in json.loads(data[-1][6:])["error"]["message"]
    assert code == 0 and "Traceback" not in log, log
