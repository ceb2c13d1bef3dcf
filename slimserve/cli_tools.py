"""`slimserve bench ...` and `slimserve eval ...`: the measuring subcommands' flags and dispatch."""

from __future__ import annotations

import argparse
import sys

from slimserve.cli import add_engine_args

LLAMA_MODES = ("none", "ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


def cmd_bench(args) -> int:
    from importlib import import_module

    runners = {
        "latency": ("latency", "run_latency"),
        "throughput": ("throughput", "run_throughput"),
        "serve": ("serving", "run_serving"),
        "roofline": ("roofline", "run_roofline"),
        "report": ("report", "run_report"),
        "compare": ("compare", "run_compare"),
        "kernels": ("kernels", "run_kernels"),
        "invariance": ("invariance", "run_invariance"),
        "soak": ("soak", "run_soak"),
        "spec": ("speculative", "run_spec"),
        "structured": ("structured", "run_structured"),
        "load": ("load", "run_load"),
        "kv": ("kv", "run_kv"),
        "moe": ("moe", "run_moe"),
        "scaleout": ("scaleout", "run_scaleout"),
        "ab": ("ab", "run_ab"),
        "cutover": ("cutover", "run_cutover"),
        "restart": ("restart", "run_restart"),
        "overload": ("overload", "run_overload"),
        "agents": ("agents", "run_agents"),
        "priority": ("priority", "run_priority"),
        "cotenant": ("cotenant", "run_cotenant"),
    }
    module, func = runners[args.bench_kind]
    try:
        getattr(import_module(f"slimserve.bench.{module}"), func)(args)
    except (RuntimeError, ValueError, OSError) as e:  # a peer or URL down, a bad results file
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args) -> int:
    from slimserve.eval.perplexity import run_perplexity

    try:
        run_perplexity(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_tool_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_kind", required=True)
    from slimserve.bench import agents, cotenant, overload, priority, restart

    # These benches keep their flags beside their code; the rest are still listed below.
    for module in (restart, overload, agents, priority, cotenant):
        module.register(bsub)
    lat = bsub.add_parser("latency", help="prefill and single-stream decode speed")
    lat.add_argument("--prompt-len", type=int, default=512)
    lat.add_argument("--decode-tokens", type=int, default=128)
    lat.add_argument("--runs", type=int, default=5)
    lat.add_argument("--output", default=None, help="write results as JSON here")
    lat.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run llama.cpp's llama-bench when installed",
    )
    lat.add_argument(
        "--ik-llama-bench",
        default=None,
        metavar="PATH",
        help="also run this llama-bench of ik_llama.cpp (built from its source) with -rtr 1",
    )
    add_engine_args(lat)
    thr = bsub.add_parser(
        "throughput", help="offline batch throughput, side by side with llama.cpp"
    )
    thr.add_argument(
        "--workloads",
        nargs="+",
        default=["random", "shared-prefix"],
        choices=["random", "shared-prefix"],
    )
    thr.add_argument("--num-prompts", type=int, default=128)
    thr.add_argument("--input-len", type=int, default=200)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--prefix-len", type=int, default=1000)
    thr.add_argument("--question-len", type=int, default=50)
    thr.add_argument("--seed", type=int, default=0)
    thr.add_argument("--parallel", type=int, default=8, help="llama-server slots and clients")
    thr.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    thr.add_argument(
        "--hf-prompts",
        type=int,
        default=16,
        help="run transformers generate on the first N prompts as the slow reference (0: skip)",
    )
    thr.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(thr)
    srv = bsub.add_parser("serve", help="online serving: our server and llama-server, or any URL")
    srv.add_argument("--base-url", default=None, help="measure this endpoint instead")
    srv.add_argument("--model-name", default=None, help="model name to send with --base-url")
    srv.add_argument("--api-key", default=None)
    srv.add_argument(
        "--vocab-size", type=int, default=49152, help="for random prompts with --base-url"
    )
    srv.add_argument(
        "--engines",
        nargs="+",
        default=["slimserve", "llama.cpp"],
        choices=["slimserve", "llama.cpp"],
    )
    srv.add_argument("--model", default=None, help="GGUF both engines load (default model)")
    srv.add_argument("--threads", type=int, default=None)
    srv.add_argument(
        "--dataset", default="random", choices=["random", "shared-prefix", "multi-turn", "file"]
    )
    srv.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    srv.add_argument("--reply-len", type=int, default=64, help="multi-turn: earlier replies")
    srv.add_argument("--file", default=None, help="JSONL prompts for --dataset file")
    srv.add_argument("--num-prompts", type=int, default=64)
    srv.add_argument("--input-len", type=int, default=200)
    srv.add_argument("--output-len", type=int, default=128)
    srv.add_argument("--groups", type=int, default=4, help="shared-prefix: system prompts")
    srv.add_argument("--prefix-len", type=int, default=1000)
    srv.add_argument("--question-len", type=int, default=50)
    srv.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    srv.add_argument("--request-rate", type=float, default=float("inf"))
    srv.add_argument("--burstiness", type=float, default=1.0)
    srv.add_argument("--slo", default=None, help="e.g. ttft_ms=2000,tpot_ms=100 for goodput")
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--output", default=None, help="write results as JSON here")
    spec = bsub.add_parser(
        "spec", help="speculative decoding vs plain decoding and llama-server's n-gram modes"
    )
    spec.add_argument("--methods", nargs="+", default=["ngram", "suffix"],
                      choices=["ngram", "suffix", "draft"])  # fmt: skip
    spec.add_argument(
        "--draft-model", default=None, help="for --methods draft (default: the default model)"
    )
    spec.add_argument("--max-tokens", type=int, default=256)
    spec.add_argument("--rounds", type=int, default=2)
    spec.add_argument("--num-tokens", type=int, default=16, help="draft cap per request a step")
    spec.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    spec.add_argument("--prompts-limit", type=int, default=0, help="first N prompts of each set")
    spec.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    spec.add_argument("--llama-modes", nargs="+", default=list(LLAMA_MODES))
    spec.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(spec)
    so = bsub.add_parser("structured", help="JSON-schema suite: validity, mask cost, llama-server")
    so.add_argument("--max-tokens", type=int, default=300)
    so.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    so.add_argument("--rounds", type=int, default=2)
    so.add_argument("--limit", type=int, default=0, help="first N schemas only")
    so.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    so.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(so)
    ld = bsub.add_parser("load", help="load time and resident memory, cold and warm, llama-server")
    ld.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ld.add_argument("--kv-cache-memory-sizes", nargs="+", default=["64MiB", "1GiB"])
    ld.add_argument("--quantization", default="auto", help="auto (default) or none (float32)")
    ld.add_argument("--rounds", type=int, default=3)
    ld.add_argument("--threads", type=int, default=None)
    ld.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    ld.add_argument("--output", default=None, help="write results as JSON here")
    kvb = bsub.add_parser("kv", help="KV bytes a sequence holds per token, by context length")
    kvb.add_argument("--lengths", type=int, nargs="+", default=[512, 4096, 16384])
    kvb.add_argument("--seed", type=int, default=0)
    kvb.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(kvb)
    moe = bsub.add_parser("moe", help="MoE experts resident, cached on disk, read every time")
    moe.add_argument("--model", default=None, help="an MoE GGUF (default: a synthetic one)")
    moe.add_argument("--layers", type=int, default=8, help="the synthetic model's layers")
    moe.add_argument("--cap", default="512MiB", help="the expert cache's memory")
    moe.add_argument("--prompt", type=int, default=32)
    moe.add_argument("--tokens", type=int, default=48)
    moe.add_argument("--rounds", type=int, default=2)
    moe.add_argument("--threads", type=int, default=None)
    moe.add_argument("--seed", type=int, default=0)
    moe.add_argument(
        "--cold",
        action="store_true",
        help="drop each read range from the page cache: misses read the device",
    )
    moe.add_argument("--workdir", default=None, help="where the synthetic model is written")
    moe.add_argument("--output", default=None, help="write results as JSON here")
    so_ = bsub.add_parser("scaleout", help="serve alone vs engine replicas on Ray Serve")
    so_.add_argument("--workloads", nargs="+", default=["random", "shared-prefix"],
                     choices=["random", "shared-prefix"])  # fmt: skip
    so_.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    so_.add_argument("--num-prompts", type=int, default=64)
    so_.add_argument("--input-len", type=int, default=200)
    so_.add_argument("--output-len", type=int, default=128)
    so_.add_argument("--groups", type=int, default=8, help="shared-prefix: system prompts")
    so_.add_argument("--per-group", type=int, default=4, help="shared-prefix: users per prompt")
    so_.add_argument("--prefix-len", type=int, default=1000)
    so_.add_argument("--shared-output-len", type=int, default=32)
    so_.add_argument("--shared-concurrency", type=int, default=8)
    so_.add_argument("--kv-cache-memory", default="256MiB", help="per server or replica")
    so_.add_argument("--output", default=None, help="write results as JSON here")
    roof = bsub.add_parser("roofline", help="machine limits, model cost per token, fractions")
    roof.add_argument("--latency", default=None, help="a bench latency JSON to rate")
    roof.add_argument(
        "--kernel-table", action="store_true", help="each matmul path per layer shape vs its peak"
    )
    roof.add_argument("--output", default=None)
    add_engine_args(roof)
    rep = bsub.add_parser("report", help="markdown table and plot from a results folder")
    rep.add_argument("results", nargs="?", default="bench-results")
    rep.add_argument("--markdown", default="docs/benchmark-results.md")
    rep.add_argument("--plot", default="docs/img/latency-throughput.png")
    ker = bsub.add_parser("kernels", help="native kernels vs the PyTorch paths they replace")
    ker.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ker.add_argument("--decode-tokens", type=int, default=64)
    ker.add_argument("--rounds", type=int, default=3)
    ker.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(ker)
    cut = bsub.add_parser("cutover", help="where the 512-bit tiles overtake the 256-bit paths")
    cut.add_argument("--rows", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, 12, 16])
    cut.add_argument("--rounds", type=int, default=11)
    cut.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(cut)
    inv = bsub.add_parser(
        "invariance", help="batch-invariant attention against SDPA chunks + cascade, A/B"
    )
    inv.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512, 2048])
    inv.add_argument("--prefix-len", type=int, default=1000, help="the shared system prompt")
    inv.add_argument("--batch", type=int, default=16)
    inv.add_argument("--tokens", type=int, default=32, help="decoded per request")
    inv.add_argument("--rounds", type=int, default=4)
    inv.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(inv)
    soak = bsub.add_parser("soak", help="our server under a long mixed load; memory and leaks")
    soak.add_argument("--minutes", type=float, default=30)
    soak.add_argument("--clients", type=int, default=16)
    soak.add_argument("--max-queue", type=int, default=8, help="low, so bursts hit 503")
    soak.add_argument("--kv-cache-memory", default="128MiB")
    soak.add_argument("--sample-s", type=float, default=10.0)
    soak.add_argument("--serve-args", default="", help="more server flags, e.g. --kv-disk-cache")
    soak.add_argument("--settle-s", type=float, default=2.0, help="wait before the final check")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--output", default=None, help="write results as JSON here")
    ab = bsub.add_parser("ab", help="this tree against another commit, alternating rounds")
    ab.add_argument("--baseline", required=True, help="a git revision (e.g. main, HEAD~3)")
    ab.add_argument("--candidate", default=None, help="a git revision (default: this tree)")
    ab.add_argument("--rounds", type=int, default=7, help="pairs per figure")
    ab.add_argument("--prompt-len", type=int, default=512)
    ab.add_argument("--decode-tokens", type=int, default=64)
    ab.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ab.add_argument("--output", default=None, help="write results as JSON here")
    cmp_ = bsub.add_parser("compare", help="ratios between two result files (B / A)")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    bench.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="quality measurements")
    esub = ev.add_subparsers(dest="eval_kind", required=True)
    ppl = esub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    ppl.add_argument("--text", default=None, help="UTF-8 text (default: a shipped public text)")
    ppl.add_argument("--window", type=int, default=1024, help="tokens of context per window")
    ppl.add_argument("--stride", type=int, default=512, help="tokens between window starts")
    ppl.add_argument("--chunk", type=int, default=128, help="prefill chunk inside a window")
    ppl.add_argument("--max-tokens-eval", type=int, default=None, help="score only a prefix")
    ppl.add_argument("--output", default=None, help="write results as JSON here")
    add_engine_args(ppl)
    ev.set_defaults(func=cmd_eval)
