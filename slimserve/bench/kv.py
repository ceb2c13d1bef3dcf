"""`slimserve bench kv`: KV bytes a sequence holds per token at several context lengths.

One request of each length runs alone (its prompt, then two tokens); after every step the pages
it holds are counted, over all KV groups (kv_cache/spec.py), and the peak is reported per token
beside what the same model would hold with every layer attending in full. For a model with
sliding-window layers (Gemma 3) the difference is the window layers' pages given back.
"""

from __future__ import annotations

import json
import random
import sys

from slimserve.bench.runinfo import engine_memory, run_info


def run_kv(args) -> dict:
    from slimserve.cli import make_llm
    from slimserve.sampling_params import SamplingParams

    llm = make_llm(args, progress=False)
    eng = llm.engine
    spec = eng.kv_spec
    page = spec.page_bytes
    rng = random.Random(args.seed)
    vocab = eng.model_config.vocab_size
    rows = []
    for n in args.lengths:
        if n + 1 > eng.max_model_len:
            print(f"skip {n}: past the context length {eng.max_model_len}", file=sys.stderr)
            continue
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        rid = eng.add_request(ids, SamplingParams(max_tokens=2, ignore_eos=True))
        peak = 0
        while eng.has_unfinished():
            eng.step()
            peak = max(peak, eng.kv.num_held(rid))
        row = {
            "context": n,
            "pages_held": peak,
            "kv_bytes_per_token": peak * page / n,
            "full_attention_bytes_per_token": spec.bytes_per_token,
        }
        row["ratio_to_full"] = row["kv_bytes_per_token"] / spec.bytes_per_token
        rows.append(row)
        print(
            f"context {n:>6}: {row['kv_bytes_per_token'] / 1e3:7.2f} KB/token held "
            f"(every layer in full: {spec.bytes_per_token / 1e3:.2f} KB, "
            f"x{row['ratio_to_full']:.2f})"
        )
    result = {
        "run": run_info(),
        "memory": engine_memory(eng),
        "groups": [list(g) for g in spec.groups],
        "windows": [s.window for s in spec.group_specs],
        "rows": rows,
    }
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result
