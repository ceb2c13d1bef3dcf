"""`slimserve bench throughput`: offline batch throughput, ours and llama.cpp's, in one run.

Workloads:
  random        N prompts of random tokens, input_len in / output_len out, EOS ignored.
  shared-prefix N prompts = one system prompt of prefix_len tokens + a distinct question of
                question_len tokens (SGLang-style), output_len out.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from slimserve.sampling_params import SamplingParams


def make_prompts(
    kind: str,
    n: int,
    vocab: int,
    seed: int,
    *,
    input_len: int = 200,
    prefix_len: int = 1000,
    question_len: int = 50,
) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)

    def rand(k):
        return torch.randint(100, vocab - 100, (k,), generator=g).tolist()

    if kind == "random":
        return [rand(input_len) for _ in range(n)]
    if kind == "shared-prefix":
        prefix = rand(prefix_len)
        return [prefix + rand(question_len) for _ in range(n)]
    raise ValueError(f"unknown workload {kind!r}")


def run_ours(llm, prompts, output_len) -> dict:
    engine = llm.engine
    before = engine.stats()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    return {
        "elapsed_s": elapsed,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "prompt_tokens_computed": after.prompt_tokens_computed - before.prompt_tokens_computed,
        "prefix_hit_rate": (after.prefix_cache_hits - before.prefix_cache_hits) / max(queries, 1),
        "preemptions": after.preemptions - before.preemptions,
    }


def _rates(r: dict, prompts) -> dict:
    total_in = sum(len(p) for p in prompts)
    r["output_tok_s"] = r["output_tokens"] / r["elapsed_s"]
    r["total_tok_s"] = (r["output_tokens"] + total_in) / r["elapsed_s"]
    return r


def _peer_rows(args, llm, prompts, threads) -> dict:
    """Each peer's result on the same prompts, or the reason it was skipped."""
    from slimserve.bench.peers import LlamaServer, llama_server_binary, transformers_offline

    rows = {}
    if llama_server_binary():
        ctx = max(len(p) for p in prompts) + args.output_len + 16
        with LlamaServer(llm.engine.source.path, threads, args.parallel, ctx) as srv:
            srv.complete(prompts[0][:8], 2)  # warm-up
            rows["llama.cpp"] = _rates(
                srv.run_offline(prompts, args.output_len, args.parallel), prompts
            )
    else:
        rows["llama.cpp"] = "skipped: llama-server not installed (pip install 'slimserve[bench]')"
    if args.hf_prompts > 0:
        subset = prompts[: args.hf_prompts]  # the slow reference runs on a prefix of the list
        hf = transformers_offline(llm.engine.source.path, subset, args.output_len, args.parallel)
        rows["transformers"] = hf if isinstance(hf, str) else _rates(hf, subset)
    return rows


def run_throughput(args) -> dict:
    from slimserve.bench.runinfo import describe_memory, engine_memory, run_info
    from slimserve.cli import make_llm

    llm = make_llm(args, progress=False)
    vocab = llm.engine.model_config.vocab_size
    threads = torch.get_num_threads()
    results = {
        "model": llm.engine.model_name,
        "threads": threads,
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "memory": engine_memory(llm.engine),
        **run_info(),
        "workloads": {},
    }
    print(describe_memory(results["memory"]))
    for kind in args.workloads:
        prompts = make_prompts(
            kind,
            args.num_prompts,
            vocab,
            args.seed,
            input_len=args.input_len,
            prefix_len=args.prefix_len,
            question_len=args.question_len,
        )
        row = {"num_prompts": len(prompts), "output_len": args.output_len}
        llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        llm.engine.kv.reset_prefix_cache()  # start cold: no hits from the warm-up
        row["slimserve"] = ours = _rates(run_ours(llm, prompts, args.output_len), prompts)
        print(
            f"[{kind}] slimserve: {ours['output_tok_s']:.1f} output tok/s, "
            f"{ours['total_tok_s']:.1f} total tok/s, prefix hit rate "
            f"{100 * ours['prefix_hit_rate']:.0f}%, {ours['prompt_tokens_computed']} prompt "
            f"tokens computed, {ours['preemptions']} preemptions"
        )
        if args.peers:
            for name, peer in _peer_rows(args, llm, prompts, threads).items():
                row[name] = peer
                if isinstance(peer, str):
                    print(f"[{kind}] {name}: {peer}")
                    continue
                print(
                    f"[{kind}] {name}: {peer['output_tok_s']:.1f} output tok/s, "
                    f"{peer['total_tok_s']:.1f} total tok/s -> slimserve is "
                    f"{ours['total_tok_s'] / peer['total_tok_s']:.2f}x in total tok/s"
                )
        results["workloads"][kind] = row
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results
