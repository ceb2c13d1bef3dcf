"""`slimserve bench load`: how long a model takes to load and what the process then holds.

Every measurement is a fresh process, so nothing is warm that a user's first run would not
have. For each KV cache size, rounds alternate:
- cold: an empty artifact cache (the packed model and tokenizer are built and written);
- warm: the same cache again (they are mapped and read);
- the CLI: `slimserve generate --max-tokens 1` end to end, against `python -c "import torch"`;
- llama-server on the same file with a context of the same number of tokens: seconds from
  start to a healthy /health, and its resident memory then and after one completion.
Resident memory is read after load and after a short generation, minus `import torch`'s (the
floor any PyTorch engine starts from); the issue's budget is 1.15 x (file + KV bytes) + 40 MiB.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from slimserve.bench.peers import LlamaServer, llama_server_binary
from slimserve.bench.runinfo import run_info
from slimserve.config import parse_bytes
from slimserve.engine.memory import resident_bytes

MiB = 1 << 20

# Run in a fresh interpreter; prints one JSON line.
_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter() - t0
from slimserve.engine.memory import resident_bytes
rss_torch = resident_bytes()
from slimserve import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1], kv_cache_memory=sys.argv[2], quantization=sys.argv[3])
t_load = time.perf_counter() - t1
rss_load = resident_bytes()
t2 = time.perf_counter()
llm.generate(["Write one sentence about the sea."],
             SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
t_first = time.perf_counter() - t2
llm.generate(["Write one sentence about the sea."],
             SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)
e = llm.engine
print(json.dumps({
    "import_torch_s": t_torch, "load_s": t_load, "first_token_s": t_first,
    "rss_torch": rss_torch, "rss_load": rss_load, "rss_generated": resident_bytes(),
    "from_cache": e.model.from_cache, "kv_bytes": e.runner.kv_cache.nbytes,
    "capacity_tokens": e.capacity_tokens, "weights_bytes": e.memory()["weights"],
}))
"""


def _probe(model: str, kv: str, quantization: str, artifacts: str) -> dict:
    env = dict(os.environ, SLIMSERVE_ARTIFACTS=artifacts)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, model, kv, quantization],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"load probe failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    return time.perf_counter() - t0


def _llama_server(model: str, tokens: int, threads: int) -> dict:
    t0 = time.perf_counter()
    with LlamaServer(model, threads=threads, parallel=1, ctx_per_slot=tokens) as srv:
        healthy = time.perf_counter() - t0
        rss_load = resident_bytes(srv.proc.pid)
        srv.complete([1, 2, 3, 4], 32)
        return {"healthy_s": healthy, "rss_load": rss_load,
                "rss_generated": resident_bytes(srv.proc.pid)}  # fmt: skip


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run_load(args) -> None:
    from slimserve.loader import open_model

    model = open_model(args.model).path
    file_bytes = os.path.getsize(model)
    threads = args.threads or os.cpu_count()
    peers = args.peers and llama_server_binary() is not None
    result = {"model": os.path.basename(model), "file_mib": file_bytes / MiB, "kv": {}}
    for kv in args.kv_cache_memory_sizes:
        rows = {"cold": [], "warm": [], "cli_s": [], "import_torch_s": [], "llama": []}
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as cache:
                rows["cold"].append(_probe(model, kv, args.quantization, cache))
                rows["warm"].append(_probe(model, kv, args.quantization, cache))
                env = dict(os.environ, SLIMSERVE_ARTIFACTS=cache)
                rows["cli_s"].append(_wall(
                    [sys.executable, "-m", "slimserve", "generate", "Hi", "--model", model,
                     "--max-tokens", "1", "--kv-cache-memory", kv], env,
                ))  # fmt: skip
                rows["import_torch_s"].append(_wall([sys.executable, "-c", "import torch"], env))
            if peers:
                tokens = rows["warm"][-1]["capacity_tokens"]
                rows["llama"].append(_llama_server(model, tokens, threads))
        budget = 1.15 * (file_bytes + parse_bytes(kv)) + 40 * MiB
        out = {}
        for phase in ("cold", "warm"):
            r = rows[phase]
            out[phase] = {
                "load_s": _median(r, "load_s"),
                "first_token_s": _median(r, "first_token_s"),
                "rss_over_torch_mib": _median(r, "rss_generated") / MiB
                - _median(r, "rss_torch") / MiB,
                "rss_after_load_over_torch_mib": (_median(r, "rss_load") - _median(r, "rss_torch"))
                / MiB,
                "from_cache": all(x["from_cache"] for x in r),
            }
        out["budget_mib"] = budget / MiB
        out["cli_first_token_s"] = statistics.median(rows["cli_s"])
        out["import_torch_s"] = statistics.median(rows["import_torch_s"])
        out["capacity_tokens"] = rows["warm"][-1]["capacity_tokens"]
        out["weights_mib"] = rows["warm"][-1]["weights_bytes"] / MiB
        if rows["llama"]:
            out["llama_server"] = {
                "healthy_s": _median(rows["llama"], "healthy_s"),
                "rss_load_mib": _median(rows["llama"], "rss_load") / MiB,
                "rss_generated_mib": _median(rows["llama"], "rss_generated") / MiB,
            }
        result["kv"][kv] = out
        w, c = out["warm"], out["cold"]
        line = (f"KV {kv}: load cold {c['load_s']:.2f} s, warm {w['load_s']:.2f} s; CLI to "
                f"first token {out['cli_first_token_s']:.2f} s (import torch "
                f"{out['import_torch_s']:.2f} s); RSS over torch {w['rss_over_torch_mib']:.0f} "
                f"MiB (budget {out['budget_mib']:.0f})")  # fmt: skip
        if rows["llama"]:
            ls = out["llama_server"]
            line += (f"; llama-server healthy in {ls['healthy_s']:.2f} s, RSS "
                     f"{ls['rss_generated_mib']:.0f} MiB")  # fmt: skip
        print(line)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"run": run_info(), **result}, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
