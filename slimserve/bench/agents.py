"""`slimserve bench agents`: agent loops against one server, with sessions kept between turns
(`--session-ttl`), with the disk tier (`--kv-disk-cache`), and with neither.

Each agent has a system prompt of its own and runs several turns: a chat, a think time (the
tool call), then the next turn with the answer and a tool result appended. One-shot requests
with distinct prompts run beside them the whole time, so that without help an agent's prefix is
evicted from the RAM pool between its turns. Reported per case: TTFT median and p90 of the
later turns, the share of their prompt tokens that came from cache, and the server's peak
resident set against `--memory-budget`. The cases run one after another, in alternating order
round by round, each against a fresh server.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time

CASES = ("none", "session-ttl", "disk", "llama-server")


def register(sub) -> None:
    p = sub.add_parser("agents", help="multi-turn agents with think time: sessions, disk tier")
    p.add_argument("--model", default=None)
    p.add_argument("--agents", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--think", type=float, default=1.5, help="seconds between an agent's turns")
    p.add_argument("--system-words", type=int, default=350)
    p.add_argument("--background", type=int, default=2, help="one-shot clients beside them")
    p.add_argument("--kv-cache-memory", default="96MiB")
    p.add_argument("--memory-budget", default="1GiB")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:3]))
    p.add_argument("--output", default=None)


WORDS = (
    "file build test tool patch module error trace config branch merge review deploy cache queue "
    "worker schema index token parser client server retry limit"
).split()


async def _chat(client, messages, session: str | None, **extra) -> tuple[float, str, dict]:
    """(TTFT seconds, greedy text, usage) of one streamed chat."""
    body = {"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    if session:
        body["session_id"] = session
    t0, ttft, parts, usage = time.perf_counter(), None, [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", ()):
                if c["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(c["delta"]["content"])
    return ttft if ttft is not None else time.perf_counter() - t0, "".join(parts), usage


async def _agent(client, i: int, args, rows: list, session: bool) -> None:
    rng = random.Random(i)
    system = " ".join(rng.choice(WORDS) for _ in range(args.system_words))
    msgs = [{"role": "system", "content": f"Agent {i}. Context: {system}"},
            {"role": "user", "content": "Start the task."}]  # fmt: skip
    for t in range(args.turns):
        ttft, text, usage = await _chat(client, msgs, f"agent-{i}" if session else None)
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        rows.append({"agent": i, "turn": t, "ttft_s": ttft, "prompt": usage.get("prompt_tokens", 0),
                     "cached": cached})  # fmt: skip
        msgs += [{"role": "assistant", "content": text},
                 {"role": "user", "content": f"Tool result {t}: ok. Continue."}]  # fmt: skip
        await asyncio.sleep(args.think)


async def _background(client, k: int, until: float) -> None:
    rng = random.Random(1000 + k)
    while time.monotonic() < until:
        text = " ".join(rng.choice(WORDS) for _ in range(300))
        await _chat(client, [{"role": "user", "content": text}], None)


async def _rss_peak(pid: int, stop: asyncio.Event, peak: list) -> None:
    from slimserve.engine.memory import resident_bytes

    while not stop.is_set():
        peak[0] = max(peak[0], resident_bytes(pid))
        await asyncio.sleep(0.1)


def _server(case: str, args, folder: str | None):
    """Our server for a case, or llama-server with a slot per client and its default
    --cache-ram (prompts leaving a slot are kept in RAM)."""
    from slimserve.bench.peers import LlamaServer
    from slimserve.bench.serving import OurServer
    from slimserve.loader import default_model_path

    if case == "llama-server":
        slots = args.agents + args.background
        return LlamaServer(args.model or default_model_path(), args.threads, slots, 2048)
    extra = ["--kv-cache-memory", args.kv_cache_memory, "--memory-budget", args.memory_budget]
    extra += {
        "session-ttl": ["--session-ttl", "60"],
        "disk": ["--kv-disk-cache", folder or ""],
    }.get(case, [])
    return OurServer(args.model, args.threads, extra)


def one_case(case: str, args) -> dict:
    import httpx

    folder = tempfile.mkdtemp(prefix="slimserve-kv-") if case == "disk" else None
    rows, peak = [], [0]
    try:
        with _server(case, args, folder) as srv:

            async def main():
                stop = asyncio.Event()
                async with httpx.AsyncClient(base_url=srv.url, timeout=600) as client:
                    watch = asyncio.create_task(_rss_peak(srv.proc.pid, stop, peak))
                    horizon = time.monotonic() + args.turns * (args.think + 3)
                    bg = [asyncio.create_task(_background(client, k, horizon))
                          for k in range(args.background)]  # fmt: skip
                    await asyncio.gather(*(_agent(client, i, args, rows, case == "session-ttl")
                                           for i in range(args.agents)))  # fmt: skip
                    for task in bg:
                        task.cancel()
                    stop.set()
                    await watch

            asyncio.run(main())
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    later = [r for r in rows if r["turn"] > 0]
    ttfts = sorted(r["ttft_s"] for r in later)
    from slimserve.config import parse_bytes

    return {
        "case": case, "later_turns": len(later), "ttft_p50_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
        "cached_share": sum(r["cached"] for r in later) / max(sum(r["prompt"] for r in later), 1),
        "peak_rss_bytes": peak[0], "budget_bytes": parse_bytes(args.memory_budget),
    }  # fmt: skip


def run_agents(args) -> dict:
    from slimserve.bench.runinfo import alternate, run_info, write_result

    rows = alternate(args.cases, args.rounds, lambda case: one_case(case, args), _describe)
    return write_result(args.output, {"run": run_info(), "rows": rows})


def _describe(row: dict) -> str:
    return (
        f"later turns TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms, p90 "
        f"{row['ttft_p90_s'] * 1e3:.0f} ms, {row['cached_share']:.0%} of their prompt tokens "
        f"cached; peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB (budget "
        f"{row['budget_bytes'] / 2**20:.0f} MiB)"
    )
