"""`slimserve bench soak`: our server under a long mixed load, its memory sampled as it goes.

The load, from `--clients` concurrent loops: streamed chats, plain completions with n > 1,
streams dropped after a few chunks, non-streamed requests that time out, malformed bodies, and
bursts past --max-queue. Every answer is checked (a 2xx, or a 4xx/503 with an OpenAI error;
never another 5xx). Every `--sample-s` seconds the server process's resident memory is read
from /proc; at the end, requests running and KV blocks in use must be back to zero. Reported:
requests by outcome, RSS at start, end and peak (MiB), its growth after the first minute (once
warm), and blocks leaked. Kinds of request: streamed chats, n > 1, logprobs (with and without
echo), ~3k-token prompts, dropped streams, timeouts and malformed bodies.
"""

from __future__ import annotations

import asyncio
import json
import random
import shlex
import subprocess
import sys
import time

import httpx

from slimserve.bench.peers import free_port, wait_healthy
from slimserve.bench.runinfo import run_info
from slimserve.engine.memory import resident_bytes


def _rss_mib(pid: int) -> float:
    return resident_bytes(pid) / (1 << 20)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def _client(c: httpx.AsyncClient, rng: random.Random, until: float, counts: dict):
    def count(key):
        counts[key] = counts.get(key, 0) + 1

    while time.monotonic() < until:
        kind = rng.choice(["chat", "n", "drop", "timeout", "bad", "bad", "logprobs", "long",
                           "session", "session"])  # fmt: skip
        msgs = [{"role": "user", "content": f"Question {rng.randrange(10**6)}: tell me a fact."}]
        try:
            if kind == "session":  # a long prefix of its own, one of 8 sessions taking turns
                sid = rng.randrange(8)
                words = " ".join(str((sid * 7919 + i) % 10**6) for i in range(400))
                msgs = [{"role": "system", "content": f"Session {sid} notes: {words}"}, msgs[0]]
                body = {"messages": msgs, "max_tokens": 8, "session_id": f"soak-{sid}"}
                r = await c.post("/v1/chat/completions", json=body)
                ok = r.status_code in (200, 503)
                count("session ok" if ok else f"session FAILED {r.status_code}")
            elif kind == "chat":
                body = {"messages": msgs, "max_tokens": rng.randrange(1, 48), "stream": True}
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    text = "".join([line async for line in r.aiter_lines()])
                ok = r.status_code == 503 or "[DONE]" in text
                count("stream ok" if ok else "stream FAILED")
            elif kind == "n":
                body = {"prompt": f"{rng.randrange(100)} +", "max_tokens": 8, "n": 3}
                r = await c.post("/v1/completions", json=body)
                count("n=3 ok" if r.status_code in (200, 503) else f"n=3 FAILED {r.status_code}")
            elif kind == "logprobs":
                body = {"prompt": f"Fact {rng.randrange(10**6)}:", "max_tokens": 16,
                        "logprobs": 5, "echo": rng.random() < 0.5}  # fmt: skip
                r = await c.post("/v1/completions", json=body)
                ok = r.status_code == 503 or (
                    r.status_code == 200 and r.json()["choices"][0]["logprobs"]
                )
                count("logprobs ok" if ok else f"logprobs FAILED {r.status_code}")
            elif kind == "long":  # a prompt of ~3k tokens, mostly not in the prefix cache
                words = " ".join(str(rng.randrange(10**6)) for _ in range(700))
                msgs = [{"role": "user", "content": f"Sum these numbers: {words}"}]
                body = {"messages": msgs, "max_tokens": 8}
                r = await c.post("/v1/chat/completions", json=body)
                count("long ok" if r.status_code in (200, 503) else f"long FAILED {r.status_code}")
            elif kind == "drop":
                body = {"messages": msgs, "max_tokens": 200, "stream": True, "ignore_eos": True}
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n > rng.randrange(2, 10):
                            break
                count("dropped")
            elif kind == "timeout":
                body = {"prompt": "Essay:", "max_tokens": 300, "ignore_eos": True}
                try:
                    await c.post("/v1/completions", json=body, timeout=rng.uniform(0.2, 1.5))
                    count("finished before its timeout")
                except httpx.TimeoutException:
                    count("timed out")
            else:
                body = rng.choice(
                    [
                        '{"messages": "x"}',
                        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
                        '{"messages": [{"role": "user", "content": "hi"}], "top_k": 1e30}',
                        '{"prompt": [], "max_tokens": 2}',
                        "not json",
                    ]
                )
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                r = await c.post(path, content=body, headers={"Content-Type": "application/json"})
                good = r.status_code == 400 and set(r.json()["error"]) >= {"message", "type"}
                count("rejected cleanly" if good else f"bad FAILED {r.status_code}")
        except httpx.HTTPError as e:
            count(f"transport error {type(e).__name__}")


def _tier_bytes(text: str) -> dict:
    out = {}
    for tier in ("ram", "disk"):
        try:
            out[tier] = _metric(text, f'slimserve_kv_tier_bytes{{tier="{tier}"}}')
        except KeyError:
            pass
    return out


def run_soak(args) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "slimserve", "serve", "--port", str(port)]
    cmd += ["--max-queue", str(args.max_queue), "--kv-cache-memory", args.kv_cache_memory]
    cmd += shlex.split(args.serve_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, url, "slimserve serve")
        samples = [(0.0, _rss_mib(proc.pid))]
        tiers: list[dict] = []  # KV tier bytes at each sample
        counts: dict = {}

        async def main():
            t0 = time.monotonic()
            until = t0 + args.minutes * 60
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                rng = random.Random(args.seed)
                tasks = [
                    asyncio.create_task(_client(c, random.Random(rng.random()), until, counts))
                    for _ in range(args.clients)
                ]
                while time.monotonic() < until:
                    await asyncio.sleep(args.sample_s)
                    samples.append((time.monotonic() - t0, _rss_mib(proc.pid)))
                    tiers.append(_tier_bytes((await c.get("/metrics")).text))
                await asyncio.gather(*tasks)

        asyncio.run(main())
        time.sleep(args.settle_s)  # kept sessions expire (past --session-ttl)
        metrics = httpx.get(url + "/metrics").text
        running = _metric(metrics, "slimserve_num_requests_running")
        blocks = _metric(metrics, "slimserve_kv_cache_blocks_used")
        samples.append((samples[-1][0] + 2, _rss_mib(proc.pid)))
        healthy = httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        code = proc.wait(60)
    rss = [m for _, m in samples]
    warm = next((m for t, m in samples if t >= 60), rss[-1])  # the first minute warms caches
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "outcomes": dict(sorted(counts.items())),
        "requests": sum(counts.values()),
        "rss_mib": {"start": rss[0], "end": rss[-1], "peak": max(rss)},
        "rss_after_first_minute_mib": warm,
        "growth_after_warm": rss[-1] / warm - 1,
        "kv_tier_peak_bytes": {
            t: max((x.get(t, 0) for x in tiers), default=0) for t in ("ram", "disk")
        },  # fmt: skip
        "running_after": running,
        "kv_blocks_used_after": blocks,
        "healthy_after": healthy,
        "exit_code": code,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"run": run_info(), **result, "samples": samples}, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
    failed = sum(v for k, v in counts.items() if "FAILED" in k or "transport" in k)
    if running or blocks or not healthy or code or failed:
        raise RuntimeError("the soak left requests running, blocks held, or failed answers")
