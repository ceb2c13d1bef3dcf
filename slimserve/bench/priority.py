"""`slimserve bench priority`: time to first token of a short priority-0 chat that arrives
behind a queue of long priority-10 prompts, under `--scheduling-policy priority` and `fcfs`.

Each round starts `slimserve serve`, sends `--queued` completions of `--prompt-len` random
token ids at priority 10, waits `--lead` seconds (they are queued and prefilling), then streams
a short chat at priority 0 and times its first content chunk; the long requests are then
dropped (a disconnect aborts them). The policies alternate round by round.
"""

from __future__ import annotations

import asyncio
import random
import statistics

POLICIES = ("priority", "fcfs")


def register(sub) -> None:
    p = sub.add_parser("priority", help="a priority-0 chat behind queued long prompts")
    p.add_argument("--model", default=None)
    p.add_argument("--queued", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=2000)
    p.add_argument("--lead", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None)


def one_round(policy: str, args) -> dict:
    import httpx

    from slimserve.bench.agents import _chat
    from slimserve.bench.serving import OurServer

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)]
               for _ in range(args.queued)]  # fmt: skip
    with OurServer(args.model, args.threads, ["--scheduling-policy", policy]) as srv:

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=600) as c:
                body = {"max_tokens": 16, "priority": 10, "ignore_eos": True}
                long = [asyncio.create_task(c.post("/v1/completions", json={**body, "prompt": p}))
                        for p in prompts]  # fmt: skip
                await asyncio.sleep(args.lead)
                msgs = [{"role": "user", "content": "What is two plus two?"}]
                ttft, text, _ = await _chat(c, msgs, None, priority=0)
                for task in long:
                    task.cancel()
                await asyncio.gather(*long, return_exceptions=True)
                return ttft, text

        ttft, text = asyncio.run(main())
    return {"policy": policy, "ttft_s": ttft, "answered": bool(text)}


def run_priority(args) -> dict:
    from slimserve.bench.runinfo import alternate, run_info, write_result

    rows = alternate(
        POLICIES, args.rounds, lambda p: one_round(p, args),
        lambda row: f"TTFT of the priority-0 chat {row['ttft_s'] * 1e3:.0f} ms",
    )  # fmt: skip
    summary = {p: statistics.median(r["ttft_s"] for r in rows if r["policy"] == p)
               for p in POLICIES}  # fmt: skip
    print("medians: " + ", ".join(f"{p} {v * 1e3:.0f} ms" for p, v in summary.items()))
    return write_result(args.output, {"run": run_info(), "rows": rows, "summary": summary})
