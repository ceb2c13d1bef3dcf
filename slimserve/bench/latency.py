"""`slimserve bench latency`: prefill tok/s, batch-1 decode tok/s, memory-bandwidth roofline.

Decode at batch 1 reads every weight once per token, so bytes-per-step / step-time against this
machine's measured bandwidth (taken in the same run) says how close to the hardware limit we are.
With llama.cpp installed, one round of its `llama-bench` follows each of our rounds, so drift in
the machine's load falls on both; each side reports its median round.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from slimserve.bench.runinfo import describe_memory, engine_memory, run_info
from slimserve.sampling_params import SamplingParams


def measure_bandwidth(nbytes: int = 512 << 20, runs: int = 5) -> float:
    """Sustained read bandwidth in bytes/s: the best of a reduction and a copy over `nbytes`."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(runs):
        t = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        y.copy_(x)
        best = max(best, 2 * nbytes / (time.perf_counter() - t))
    return best


def decode_bytes_per_step(model: torch.nn.Module, context_len: int, kv_bytes_per_token: int) -> int:
    """Bytes one batch-1 decode step must read: all weights but the embedding table, plus the KV.

    The embedding lookup reads one row; when it is tied to the LM head it is read in full there.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors = list(model.named_parameters(remove_duplicate=False))
    # Quantized weights are buffers; rotary tables are buffers too, but only a row is read.
    tensors += [(n, b) for n, b in model.named_buffers() if not n.endswith((".cos", ".sin"))]
    seen, total = set(), 0
    for name, t in tensors:
        if id(t) in seen or (name.endswith("embed_tokens.weight") and not tied):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total + context_len * kv_bytes_per_token


def _random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def _peer_runners(args, engine) -> dict:
    """Name -> a function running one round of that peer's `llama-bench` on the same model and
    thread count: llama.cpp's when installed (and peers are on), ik_llama.cpp's (with its
    run-time repacking, -rtr 1) when a binary is given."""
    from slimserve.bench.peers import llama_bench, llama_server_binary

    threads, model = torch.get_num_threads(), engine.source.path
    shape = (args.prompt_len, args.decode_tokens)
    runners = {}
    if args.peers and llama_server_binary() is not None:
        runners["llama.cpp"] = lambda: llama_bench(model, threads, *shape, runs=1)
    if args.ik_llama_bench:
        exe = args.ik_llama_bench
        runners["ik_llama.cpp"] = lambda: llama_bench(
            model, threads, *shape, runs=1, exe=exe, extra=("-rtr", "1")
        )
    return runners


def run_latency(args) -> dict:
    from slimserve.cli import make_llm
    from slimserve.kv_cache.spec import kv_bytes_per_token

    ik = args.ik_llama_bench
    if ik and not (os.path.isfile(ik) and os.access(ik, os.X_OK)):  # before the model loads
        raise FileNotFoundError(f"--ik-llama-bench: {ik} is not an executable file")
    llm = make_llm(args, progress=False)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    bw = measure_bandwidth()

    def timed(prompt, n_out):
        params = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        first = None
        n = 0
        for out in llm.stream(prompt, params):
            n = len(out.outputs[0].token_ids)
            if first is None:
                first = time.perf_counter()
        return first - t0, time.perf_counter() - first, n

    peers = _peer_runners(args, engine)
    prefill, decode = [], []
    peer_rounds: dict[str, list[dict]] = {name: [] for name in peers}
    for run in range(args.runs + 1):  # run 0 warms up
        ttft, _, _ = timed(_random_prompt(vocab, args.prompt_len, seed=run), 1)
        _, rest, n = timed(_random_prompt(vocab, 32, seed=100 + run), args.decode_tokens)
        if run:
            prefill.append(args.prompt_len / ttft)
            decode.append((n - 1) / rest)
            for name, one_round in peers.items():  # after each of ours: the same drift
                peer_rounds[name].append(one_round())
    decode_tok_s = statistics.median(decode)
    step_bytes = decode_bytes_per_step(
        engine.model,
        32 + args.decode_tokens // 2,
        kv_bytes_per_token(engine.model_config, engine.config.cache.dtype),
    )
    result = {
        "model": engine.model_name,
        "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": decode_tok_s,
        "decode_bytes_per_step": step_bytes,
        "memory_bandwidth_gb_s": bw / 1e9,
        "bandwidth_fraction": step_bytes * decode_tok_s / bw,
        "prefill_tok_s_all": prefill,
        "decode_tok_s_all": decode,
        "memory": engine_memory(engine),
        **run_info(),
    }
    print(describe_memory(result["memory"]))
    print(f"prefill ({args.prompt_len} tokens): {result['prefill_tok_s']:.1f} tok/s")
    print(f"decode (batch 1): {decode_tok_s:.1f} tok/s, {step_bytes / 1e6:.0f} MB read per step")
    print(
        f"memory bandwidth: {bw / 1e9:.1f} GB/s measured; decode reaches "
        f"{100 * result['bandwidth_fraction']:.0f}% of it"
    )
    if args.peers and "llama.cpp" not in peers:
        result["llama.cpp"] = "skipped: not installed (pip install 'slimserve[bench]')"
        print("llama.cpp: skipped (not installed)")
    for name, rounds in peer_rounds.items():
        peer = {
            k: statistics.median(r[k] for r in rounds) for k in ("prefill_tok_s", "decode_tok_s")
        }
        peer["rounds"] = rounds
        result[name] = peer
        print(
            f"{name} (llama-bench, rounds alternating with ours): prefill "
            f"{peer['prefill_tok_s']:.1f} tok/s, decode {peer['decode_tok_s']:.1f} tok/s "
            "-> ratios: prefill "
            f"{result['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x, decode "
            f"{decode_tok_s / peer['decode_tok_s']:.2f}x"
        )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.output}", file=sys.stderr)
    return result
