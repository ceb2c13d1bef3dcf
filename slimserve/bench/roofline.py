"""`slimserve bench roofline`: this machine's limits, the model's cost per token, and how close
measured figures come. Limits are measured in the same run; figures come from a latency JSON."""

from __future__ import annotations

import json
import time

import torch

from slimserve.bench.latency import decode_bytes_per_step, measure_bandwidth


def _best(fn, runs: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_gflops(m: int, shapes: list[tuple[int, int]]) -> float:
    """fp32 x @ W over a chain of (in, out) weights: one layer of the model, several times over
    (a single small GEMM is too short to time reliably on a shared machine)."""
    ws = [torch.randn(k, n) for k, n in shapes] * 4
    xs = {k: torch.randn(m, k) for k, _ in shapes}
    flops = sum(2 * m * w.shape[0] * w.shape[1] for w in ws)
    return flops / _best(lambda: [xs[w.shape[0]] @ w for w in ws]) / 1e9


def layer_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every linear weight of one decoder layer, from the model's config: the
    weights themselves may be packed buffers (quantized), not 2-D parameters."""
    c = model.config
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    return [
        (c.hidden_size, qkv),
        (c.num_heads * c.head_dim, c.hidden_size),
        (c.hidden_size, 2 * c.intermediate_size),
        (c.intermediate_size, c.hidden_size),
    ]


def gemv_gb_s(k: int = 576, n: int = 49152) -> float:
    """One row times an LM-head-sized (in, out) matrix: bandwidth-bound, too big for cache."""
    x, w = torch.randn(1, k), torch.randn(k, n)
    return k * n * 4 / _best(lambda: x @ w) / 1e9


def int8_gflops(m: int, k: int = 576, n: int = 1536) -> float:
    """PyTorch's int8 weight-only kernel with bf16 activations (what issue #6 builds on)."""
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randint(-128, 127, (n, k), dtype=torch.int8)
    s = torch.rand(n, dtype=torch.bfloat16)
    return 2 * m * k * n / _best(lambda: torch.ops.aten._weight_int8pack_mm(x, w, s)) / 1e9


def model_costs(model) -> dict:
    cfg = model.config
    # Multiply-adds per token of every linear and the LM head, from the config (quantized weights
    # are buffers, so counting 2-D parameters gave 0 on the default model).
    linear = cfg.num_layers * sum(k * n for k, n in layer_shapes(model))
    linear += cfg.hidden_size * cfg.vocab_size
    # Attention adds 4 * context * hidden FLOPs per token per layer (scores and weighted sum).
    return {
        "flops_per_token": 2 * linear,
        "attention_flops_per_token_per_ctx": 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim,
    }


def run_roofline(args) -> dict:
    from slimserve.bench.runinfo import run_info
    from slimserve.cli import make_llm
    from slimserve.kv_cache.spec import kv_bytes_per_token

    llm = make_llm(args, progress=False)
    model = llm.engine.model
    bw = measure_bandwidth()
    limits = {
        "memory_bandwidth_gb_s": bw / 1e9,
        "fp32_gemm_gflops_m512": gemm_gflops(512, layer_shapes(model)),
        "fp32_gemm_gflops_m64": gemm_gflops(64, layer_shapes(model)),
        "fp32_gemv_gb_s": gemv_gb_s(),
        "int8_weight_gflops_m1": int8_gflops(1),
        "int8_weight_gflops_m64": int8_gflops(64),
    }
    from slimserve import kernels
    from slimserve.bench.kernels import path_peaks

    threads = torch.get_num_threads()
    for kind in kernels.PEAK_KINDS:  # None where this CPU or build lacks the instruction
        v = kernels.peak_macs_per_s(kind, threads)
        limits[f"{kind}_gmacs"] = v / 1e9 if v else None
    path = kernels.matmul_path()
    peaks = path_peaks(threads)
    limits["matmul_path"] = path
    costs = model_costs(model)
    costs["decode_bytes_per_token"] = decode_bytes_per_step(
        model, 0, kv_bytes_per_token(model.config, llm.engine.config.cache.dtype)
    )
    costs["kv_bytes_per_token"] = kv_bytes_per_token(model.config, llm.engine.config.cache.dtype)
    result = {"limits": limits, "model": costs, **run_info()}
    print(
        f"memory bandwidth {limits['memory_bandwidth_gb_s']:.1f} GB/s; fp32 GEMM "
        f"{limits['fp32_gemm_gflops_m512']:.0f} GFLOP/s (M=512), "
        f"{limits['fp32_gemm_gflops_m64']:.0f} (M=64); int8 weight-only "
        f"{limits['int8_weight_gflops_m1']:.1f} GFLOP/s (M=1), "
        f"{limits['int8_weight_gflops_m64']:.1f} (M=64)"
    )
    print(
        "arithmetic peaks (G multiply-adds/s): "
        + ", ".join(
            f"{k} {limits[f'{k}_gmacs']:.0f}"
            for k in kernels.PEAK_KINDS
            if limits[f"{k}_gmacs"] is not None
        )
        + f"; the int4/int8 matmuls run {path}"
    )
    print(
        f"model: {costs['flops_per_token'] / 1e9:.3f} GFLOP/token, "
        f"{costs['decode_bytes_per_token'] / 1e6:.0f} MB read per batch-1 decode step, "
        f"{costs['kv_bytes_per_token'] / 1e3:.1f} KB of KV per token"
    )
    print(
        f"ceilings: prefill {limits['fp32_gemm_gflops_m512'] * 1e9 / costs['flops_per_token']:.0f}"
        f" tok/s (at fp32 GEMM speed), batch-1 decode "
        f"{bw / costs['decode_bytes_per_token']:.0f} tok/s (bandwidth)"
    )
    if path in peaks:
        print(
            f"prefill ceiling on the {path} matmuls' peak: "
            f"{2 * peaks[path] / costs['flops_per_token']:.0f} tok/s of weight math"
        )
    if args.kernel_table:
        from slimserve.bench.kernels import int4_op, print_int4_op

        result["int4_op"] = int4_op([8, 32, 128, 512], runs=10, peaks=peaks)
        print_int4_op(result["int4_op"])
    if args.latency:
        with open(args.latency) as f:
            lat = json.load(f)
        fractions = {
            "prefill_of_compute_limit": lat["prefill_tok_s"]
            * costs["flops_per_token"]
            / (limits["fp32_gemm_gflops_m512"] * 1e9),
            "decode_of_bandwidth_limit": lat["decode_tok_s"] * costs["decode_bytes_per_token"] / bw,
        }
        if path in peaks:  # the linears run int8 multiply-adds on this path
            fractions["prefill_of_matmul_peak"] = (
                lat["prefill_tok_s"] * costs["flops_per_token"] / (2 * peaks[path])
            )
        result["fractions"] = fractions
        print(
            f"measured ({args.latency}): prefill at "
            f"{100 * fractions['prefill_of_compute_limit']:.0f}% of the fp32 GEMM limit"
            + (
                f" ({100 * fractions['prefill_of_matmul_peak']:.0f}% of the {path} peak)"
                if "prefill_of_matmul_peak" in fractions
                else ""
            )
            + f", decode at {100 * fractions['decode_of_bandwidth_limit']:.0f}% of the "
            "bandwidth limit"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result
