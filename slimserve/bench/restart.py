"""`slimserve bench restart`: time to first token of a long-system-prompt chat across a server
restart, with the disk KV tier (`--kv-disk-cache`) and without it.

Each round starts `slimserve serve` on an empty cache directory and sends one chat (cold: the
whole prompt computed), sends it again (an in-RAM prefix hit), stops the server with SIGTERM,
starts it again on the same directory and sends it a third time (a restart: from disk, or cold
again without the tier). TTFT is the time to the first streamed content chunk; the greedy text
of every answer is compared with the cold one. The two configurations alternate round by round.
llama-server's `--cache-ram` lives in its process: after a restart it is cold by construction.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time

CASES = ("disk", "no-disk")
PEER = "llama-server"  # with --llama-server: its --cache-ram (default) across a restart


def register(sub) -> None:
    p = sub.add_parser(
        "restart", help="TTFT after a server restart, with and without the disk tier"
    )
    p.add_argument("--model", default=None)
    p.add_argument(
        "--system-tokens", type=int, default=1200, help="about this long a system prompt"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-server", action="store_true", help="add llama-server as a case")
    p.add_argument("--output", default=None)


def _messages(system_tokens: int) -> list[dict]:
    rule = (
        "Rule {i}: a visitor who asks about item {i} of the catalogue gets its shelf, its loan "
        "period and whether it may leave the reading room. "
    )
    text = "".join(rule.format(i=i) for i in range(system_tokens // 33 + 1))
    return [
        {"role": "system", "content": "You are the library's help desk. " + text},
        {"role": "user", "content": "Can I take item 7 home, and for how long?"},
    ]


def _ask(url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """(TTFT seconds, greedy text, usage) of one streamed chat."""
    import httpx

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0, ttft, parts, usage = time.perf_counter(), None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", ()):
                if c["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(c["delta"]["content"])
    return ttft if ttft is not None else time.perf_counter() - t0, "".join(parts), usage


def _server(case: str, args, folder: str):
    from slimserve.bench.peers import LlamaServer
    from slimserve.bench.serving import OurServer
    from slimserve.loader import default_model_path

    if case == PEER:
        return LlamaServer(args.model or default_model_path(), args.threads, 1, 4096)
    extra = ["--kv-disk-cache", folder] if case == "disk" else []
    return OurServer(args.model, args.threads, extra)


def _round(case: str, args, messages: list[dict]) -> dict:
    folder = tempfile.mkdtemp(prefix="slimserve-kv-")
    try:
        with _server(case, args, folder) as srv:
            cold, text, usage = _ask(srv.url, messages, args.max_tokens)
            ram, ram_text, _ = _ask(srv.url, messages, args.max_tokens)
        with _server(case, args, folder) as srv:
            again, again_text, again_usage = _ask(srv.url, messages, args.max_tokens)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cached = again_usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {
        "case": case, "prompt_tokens": usage.get("prompt_tokens"), "cold_ttft_s": cold,
        "ram_hit_ttft_s": ram, "restart_ttft_s": again, "restart_cached_tokens": cached,
        "same_text": text == ram_text == again_text,
    }  # fmt: skip


def run_restart(args) -> dict:
    from slimserve.bench.runinfo import alternate, run_info, write_result

    messages = _messages(args.system_tokens)
    cases = CASES + ((PEER,) if args.llama_server else ())
    rows = alternate(cases, args.rounds, lambda case: _round(case, args, messages), _describe)
    summary = {}
    for case in cases:
        mine = [x for x in rows if x["case"] == case]
        med = {k: statistics.median(x[k] for x in mine)
               for k in ("cold_ttft_s", "ram_hit_ttft_s", "restart_ttft_s")}  # fmt: skip
        med["cold_over_restart"] = med["cold_ttft_s"] / med["restart_ttft_s"]
        med["restart_over_ram_hit"] = med["restart_ttft_s"] / med["ram_hit_ttft_s"]
        med["same_text"] = all(x["same_text"] for x in mine)
        summary[case] = med
        print(
            f"{case:>12} medians: cold {med['cold_ttft_s'] * 1e3:.0f} ms, RAM hit "
            f"{med['ram_hit_ttft_s'] * 1e3:.0f} ms, restart {med['restart_ttft_s'] * 1e3:.0f} ms: "
            f"cold / restart {med['cold_over_restart']:.2f}x, restart / RAM hit "
            f"{med['restart_over_ram_hit']:.2f}x"
        )
    return write_result(args.output, {"run": run_info(), "rows": rows, "summary": summary})


def _describe(row: dict) -> str:
    return (
        f"prompt {row['prompt_tokens']} tokens, TTFT cold {row['cold_ttft_s'] * 1e3:.0f} ms, "
        f"RAM hit {row['ram_hit_ttft_s'] * 1e3:.0f} ms, after restart "
        f"{row['restart_ttft_s'] * 1e3:.0f} ms ({row['restart_cached_tokens']} cached), same "
        f"text {row['same_text']}"
    )
