"""`slimserve bench cotenant`: streaming chats while long prompts arrive, with and without a
time-per-output-token target (`--tpot-slo-ms`).

`--chats` clients stream long answers; once they run, `--long` completions of `--long-len`
random token ids arrive `--stagger` seconds apart. Reported per case: the chats' inter-token
latency (median, p99, max) from the first long prompt's arrival to the last one's answer, and
how long the long prompts took (median and last). Cases alternate round by round.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time


def register(sub) -> None:
    p = sub.add_parser("cotenant", help="streaming chats' pace while long prompts arrive")
    p.add_argument("--model", default=None)
    p.add_argument("--chats", type=int, default=4)
    p.add_argument("--long", type=int, default=8)
    p.add_argument("--long-len", type=int, default=6000)
    p.add_argument("--stagger", type=float, default=0.5)
    p.add_argument("--slo-ms", type=float, default=150.0, help="the target of the paced case")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cases", nargs="+", choices=("none", "slo"), default=["none", "slo"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None)


async def _stream(c, i: int, stamps: list, stop: asyncio.Event) -> None:
    body = {"messages": [{"role": "user", "content": f"Tell story number {i}, at length."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}  # fmt: skip
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    stamps.append(time.monotonic())
            if stop.is_set():
                return


def one_case(case: str, args) -> dict:
    import httpx

    from slimserve.bench.serving import OurServer

    extra = ["--tpot-slo-ms", str(args.slo_ms)] if case == "slo" else []
    rng = random.Random(0)
    longs = [[rng.randrange(100, 40000) for _ in range(args.long_len)] for _ in range(args.long)]
    with OurServer(args.model, args.threads, extra) as srv:

        async def main():
            stop = asyncio.Event()
            stamps = [[] for _ in range(args.chats)]
            async with httpx.AsyncClient(base_url=srv.url, timeout=1200) as c:
                chats = [asyncio.create_task(_stream(c, i, stamps[i], stop))
                         for i in range(args.chats)]  # fmt: skip
                while not all(stamps):  # every chat streams
                    await asyncio.sleep(0.05)
                t0 = time.monotonic()

                async def one(prompt, delay):
                    await asyncio.sleep(delay)
                    start = time.monotonic()
                    body = {"prompt": prompt, "max_tokens": 16, "ignore_eos": True}
                    r = await c.post("/v1/completions", json=body)
                    r.raise_for_status()
                    return time.monotonic() - start

                took = await asyncio.gather(
                    *(one(p, k * args.stagger) for k, p in enumerate(longs))
                )
                t1 = time.monotonic()
                stop.set()
                for task in chats:
                    task.cancel()
                await asyncio.gather(*chats, return_exceptions=True)
            gaps = sorted(b - a for s in stamps for a, b in zip(s, s[1:]) if a >= t0 and b <= t1)
            return gaps, took

        gaps, took = asyncio.run(main())
    return {
        "case": case, "itl_p50_ms": 1e3 * statistics.median(gaps),
        "itl_p99_ms": 1e3 * gaps[min(len(gaps) - 1, round(0.99 * (len(gaps) - 1)))],
        "itl_max_ms": 1e3 * gaps[-1], "long_p50_s": statistics.median(took),
        "long_last_s": max(took),
    }  # fmt: skip


def run_cotenant(args) -> dict:
    from slimserve.bench.runinfo import alternate, run_info, write_result

    rows = alternate(
        args.cases, args.rounds, lambda case: one_case(case, args),
        lambda r: (f"chats' ITL p50 {r['itl_p50_ms']:.0f} ms, p99 {r['itl_p99_ms']:.0f} ms, max "
                   f"{r['itl_max_ms']:.0f} ms; long prompts p50 {r['long_p50_s']:.1f} s, last "
                   f"{r['long_last_s']:.1f} s"),
    )  # fmt: skip
    return write_result(args.output, {"run": run_info(), "rows": rows})
