"""`slimserve bench scaleout`: `slimserve serve` alone against engine replicas on Ray Serve.

Every configuration is started as users start it (`slimserve serve`, with `--replicas N` for
Ray), measured with the serving bench's client (bench/serving.py) and stopped before the next:
- random 200/128 at each concurrency: one server with all threads, one Ray replica with all
  threads (the Ray path's overhead), two Ray replicas with one thread each;
- shared-prefix traffic (G system prompts of L tokens, interleaved tenants) over two replicas,
  prefix-aware routing against round-robin: prefix-cache hit rate from the replicas' own
  counters (`/router/stats`), TTFT and throughput.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from contextlib import contextmanager

import httpx


@contextmanager
def _server(flags: list[str], kv: str):
    from slimserve.bench.peers import free_port, wait_healthy

    port = free_port()
    cmd = [sys.executable, "-m", "slimserve", "serve", "--port", str(port),
           "--kv-cache-memory", kv, *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, " ".join(cmd), timeout=300)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _hits(url: str) -> tuple[int, int] | None:
    try:
        reps = httpx.get(url + "/router/stats", timeout=30).json()["replicas"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return sum(r["prefix_cache_hits"] for r in reps), sum(r["prefix_cache_queries"] for r in reps)


def _measure(url, requests, conc) -> dict:
    from slimserve.bench.datasets import BenchRequest
    from slimserve.bench.metrics import summarize
    from slimserve.bench.serving import run_load

    asyncio.run(run_load(url, None, [BenchRequest([101, 102, 103], 3, 2)], 1))  # warm
    before = _hits(url)
    records, dur = asyncio.run(run_load(url, None, requests, conc))
    s = summarize(records, dur, {})
    after = _hits(url)
    row = {
        "concurrency": conc,
        "output_tok_s": s["output_tok_s"],
        "ttft_p50_ms": s["ttft_ms"]["median"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "tpot_p50_ms": s["tpot_ms"]["median"],
        "failed": s["failed"],
    }
    if before and after and after[1] > before[1]:
        row["prefix_hit_rate"] = (after[0] - before[0]) / (after[1] - before[1])
    return row


def run_scaleout(args) -> dict:
    from slimserve.bench.datasets import random_requests, shared_prefix_requests
    from slimserve.bench.runinfo import run_info

    cores = len(os.sched_getaffinity(0))
    vocab = 49152
    shared = shared_prefix_requests(args.groups, args.per_group, args.prefix_len, 50,
                                    args.shared_output_len, vocab, seed=1)  # fmt: skip
    # Tenants arrive in random order: in the dataset's fixed rotation over an even number of
    # tenants, round-robin over two replicas would send each tenant to one replica by accident.
    random.Random(2).shuffle(shared)
    half = str(max(1, cores // 2))
    configs = {
        f"serve 1 x {cores} threads": ["--threads", str(cores)],
        f"ray 1 x {cores} threads": ["--replicas", "1", "--threads", str(cores)],
        f"ray 2 x {half} threads": ["--replicas", "2", "--routing", "prefix"],
    }
    rows = []

    def log(row):
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)

    for name, flags in configs.items():
        if "random" not in args.workloads:
            break
        with _server(flags, args.kv_cache_memory) as url:
            for conc in args.concurrency:
                if conc == 1 and name.startswith("ray 2"):
                    continue  # c=1 measures the Ray path's overhead: one replica against none
                # Fresh prompts at each concurrency: the server keeps the last ones cached.
                n = args.num_prompts if conc > 1 else max(4, args.num_prompts // 8)
                reqs = random_requests(n, args.input_len, args.output_len, vocab, seed=conc)
                log({"config": name, "workload": "random", **_measure(url, reqs, conc)})
    for policy in ("prefix", "round-robin") if "shared-prefix" in args.workloads else ():
        flags = ["--replicas", "2", "--routing", policy]
        with _server(flags, args.kv_cache_memory) as url:
            log({"config": f"ray 2 x {half} threads, {policy}", "workload": "shared-prefix",
                 **_measure(url, shared, args.shared_concurrency)})  # fmt: skip
    result = {"run": run_info(), "cores": cores, "rows": rows, "params": {
        k: v for k, v in vars(args).items() if k != "func"}}  # fmt: skip
    for r in rows:
        hit = f", prefix hits {r['prefix_hit_rate']:.2f}" if "prefix_hit_rate" in r else ""
        print(f"{r['config']:>34} {r['workload']:>13} c={r['concurrency']:<3} "
              f"{r['output_tok_s']:7.1f} out tok/s  TTFT p50 {r['ttft_p50_ms'] or 0:7.0f} p99 "
              f"{r['ttft_p99_ms'] or 0:7.0f} ms  TPOT p50 {r['tpot_p50_ms'] or 0:6.1f} ms"
              f"{hit}  failed {r['failed']}")  # fmt: skip
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result
