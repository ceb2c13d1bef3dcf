"""`slimserve bench overload`: many long requests at once in a KV pool that holds about one of
them, with the disk tier (`--kv-disk-cache`) and without it.

Every request arrives at once (distinct random prompts, so no prefix is shared) and runs to
its token budget. Reported per case: preemptions, tokens the model computed, and of those the
ones computed a second time (tokens computed less each request's prompt + output - 1, which
needs nothing but the engine's token count, so the same script measures an older tree), output
tokens a second, TTFT median and p99 (from the start to a request's first token), and whether
every output equals the other case's token for token. The cases alternate round by round.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time

CASES = ("disk", "ram")


def register(sub) -> None:
    p = sub.add_parser("overload", help="many requests in a KV pool for one: swap vs recompute")
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=865)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--kv-cache-memory", default="24MiB")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)


def one_case(case: str, args) -> dict:
    from slimserve import LLM, SamplingParams

    folder = tempfile.mkdtemp(prefix="slimserve-kv-") if case == "disk" else None
    extra = {"kv_disk_cache": folder} if folder else {}
    try:
        llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, **extra)
        eng = llm.engine
        rng = random.Random(args.seed)
        vocab = eng.model_config.vocab_size
        prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)]
                   for _ in range(args.requests)]  # fmt: skip
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        before = eng.stats()
        t0 = time.perf_counter()
        ids = [eng.add_request(p, params) for p in prompts]
        first, tokens = {}, {}
        while eng.has_unfinished():
            for out in eng.step():
                if out.outputs[0].token_ids and out.request_id not in first:
                    first[out.request_id] = time.perf_counter() - t0
                if out.finished:
                    tokens[out.request_id] = out.outputs[0].token_ids
        wall = time.perf_counter() - t0
        s = eng.stats()
        if hasattr(eng, "close"):  # (an older tree, measured as the baseline, has none)
            eng.close()
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    computed = s.tokens_computed - before.tokens_computed
    needed = sum(len(p) + len(tokens[i]) - 1 for p, i in zip(prompts, ids))
    ttfts = sorted(first.values())
    return {
        "case": case, "preemptions": s.preemptions - before.preemptions,
        "tokens_computed": computed, "recomputed_tokens": computed - needed,
        "recomputed_share": (computed - needed) / computed, "wall_s": wall,
        "output_tok_s": sum(len(t) for t in tokens.values()) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "outputs": [tokens[i] for i in ids],
    }  # fmt: skip


def run_overload(args) -> dict:
    from slimserve.bench.runinfo import alternate, run_info, write_result

    rows = alternate(args.cases, args.rounds, lambda case: one_case(case, args), _describe)
    outs = {tuple(map(tuple, x.pop("outputs"))) for x in rows}
    same = len(outs) == 1
    print(f"every case's outputs equal: {same}")
    return write_result(args.output, {"run": run_info(), "rows": rows, "same_outputs": same})


def _describe(row: dict) -> str:
    return (
        f"{row['preemptions']} preemptions, {row['recomputed_tokens']} of "
        f"{row['tokens_computed']} tokens computed again ({row['recomputed_share']:.1%}), "
        f"{row['output_tok_s']:.1f} output tok/s, TTFT p50 {row['ttft_p50_s']:.1f} s p99 "
        f"{row['ttft_p99_s']:.1f} s"
    )
