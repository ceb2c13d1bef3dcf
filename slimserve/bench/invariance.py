"""`slimserve bench invariance`: what batch-invariant attention costs, and whether it holds.

The native backend runs every row, prompt chunks included, as its own query of the paged kernel
(backends/native_cpu.py); before, prompt chunks went through PyTorch SDPA and decodes sharing a
cached prefix through cascade attention. Both are A/B'd here in one process on the same engine,
rounds alternating which goes first (`per_row` on the backend):
- prefill tok/s of one prompt of each length (chunks of max_num_batched_tokens);
- decode tok/s of a batch sharing a long cached system prompt (where cascade applied);
- whether a prompt's logits are bit-equal computed whole and in chunks of 7 and 16.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from slimserve.bench.runinfo import run_info
from slimserve.sampling_params import SamplingParams


def _prefill_s(engine, ids) -> float:
    t = time.perf_counter()
    engine.prompt_logits(ids, chunk=engine.config.scheduler.max_num_batched_tokens)
    return time.perf_counter() - t


def _shared_decode_tok_s(llm, system: list[int], batch: int, tokens: int) -> float:
    prompts = [system + [1000 + i, 2000 + i] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # cache the prefix
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return batch * tokens / (time.perf_counter() - t)


def _invariant(engine, ids) -> bool:
    whole = engine.prompt_logits(ids)
    return all(torch.equal(engine.prompt_logits(ids, chunk=c), whole) for c in (7, 16))


def run_invariance(args) -> None:
    from slimserve import LLM
    from slimserve.cli import engine_settings

    settings = {"kv_cache_memory": "512MiB", **engine_settings(args)}
    llm = LLM(args.model, **settings)
    engine, backend = llm.engine, llm.engine.runner.backend
    if not hasattr(backend, "per_row"):
        raise RuntimeError(f"the {backend.name} backend has no per-row mode to compare")
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 40000, (max(args.prompt_lens),), generator=g).tolist()
    system = text[: args.prefix_len]
    modes = {"per_row": True, "sdpa_cascade": False}
    rows = []
    for L in args.prompt_lens:
        best = {m: float("inf") for m in modes}
        for r in range(args.rounds):
            order = list(modes) if r % 2 == 0 else list(modes)[::-1]
            for m in order:
                backend.per_row = modes[m]
                best[m] = min(best[m], _prefill_s(engine, text[:L]))
        rows.append({"view": "prefill", "tokens": L, **{m: L / best[m] for m in modes}})
    best = {m: 0.0 for m in modes}
    for r in range(args.rounds):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        for m in order:
            backend.per_row = modes[m]
            best[m] = max(best[m], _shared_decode_tok_s(llm, system, args.batch, args.tokens))
    rows.append({"view": f"decode, batch {args.batch} sharing {args.prefix_len} tokens", **best})
    checks = {}
    for m in modes:
        backend.per_row = modes[m]
        checks[m] = _invariant(engine, text[:300])
    backend.per_row = True
    print("| view | per-row (tok/s) | SDPA + cascade (tok/s) | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        name = row["view"] + (f", {row['tokens']} tokens" if "tokens" in row else "")
        a, b = row["per_row"], row["sdpa_cascade"]
        print(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    print(
        "| logits bit-equal whole / chunks of 7 / 16 | "
        + " | ".join("yes" if checks[m] else "no" for m in modes)
        + " | |"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"run": run_info(), "rows": rows, "invariant": checks}, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
