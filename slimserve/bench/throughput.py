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


def run_throughput(args) -> dict:
    from slimserve.bench.peers import LlamaServer, llama_server_binary
    from slimserve.cli import make_llm

    llm = make_llm(args, progress=False)
    vocab = llm.engine.model_config.vocab_size
    threads = torch.get_num_threads()
    results = {"model": llm.engine.model_name, "threads": threads, "workloads": {}}
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
        llm.engine.runner.kv.reset_prefix_cache()  # start cold: no hits from the warm-up
        row["slimserve"] = _rates(run_ours(llm, prompts, args.output_len), prompts)
        if args.peers and llama_server_binary():
            ctx = max(len(p) for p in prompts) + args.output_len + 16
            with LlamaServer(llm.engine.source.path, threads, args.parallel, ctx) as srv:
                srv.complete(prompts[0][:8], 2)  # warm-up
                row["llama.cpp"] = _rates(
                    srv.run_offline(prompts, args.output_len, args.parallel), prompts
                )
        elif args.peers:
            row["llama.cpp"] = (
                "skipped: llama-server not installed (pip install 'slimserve[bench]')"
            )
        ours = row["slimserve"]
        print(
            f"[{kind}] slimserve: {ours['output_tok_s']:.1f} output tok/s, "
            f"{ours['total_tok_s']:.1f} total tok/s, prefix hit rate "
            f"{100 * ours['prefix_hit_rate']:.0f}%, {ours['prompt_tokens_computed']} prompt "
            f"tokens computed, {ours['preemptions']} preemptions"
        )
        peer = row.get("llama.cpp")
        if isinstance(peer, dict):
            print(
                f"[{kind}] llama.cpp: {peer['output_tok_s']:.1f} output tok/s, "
                f"{peer['total_tok_s']:.1f} total tok/s -> ratio "
                f"{ours['total_tok_s'] / peer['total_tok_s']:.2f}x total tok/s"
            )
        elif peer:
            print(f"[{kind}] llama.cpp: {peer}")
        results["workloads"][kind] = row
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results
