"""`slimserve bench kernels`: each native kernel against the PyTorch path it replaces, in one run.

Views, all A/B in the same process with the order alternated, so machine noise hits both:
- the op alone: paged decode attention vs gather + SDPA for one layer, over batch sizes and
  context lengths; the int4 x int8 matmul vs PyTorch's int4 kernel on the model's layer shapes;
- end to end: greedy decode tok/s of the engine with every kernel on, with all but the fused
  decode step (engine/decode_step.py), and with none.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from slimserve import kernels
from slimserve.backends.kv_format import encode as _encode
from slimserve.backends.torch_sdpa import TorchSDPABackend
from slimserve.bench.roofline import _best
from slimserve.bench.runinfo import run_info
from slimserve.config import default_of


def _best_us(fn, runs: int) -> float:
    return _best(fn, runs) * 1e6


def _gather_sdpa(q, k_cache, v_cache, tables, L, bs):
    k = TorchSDPABackend._read(k_cache, tables, L, bs)
    v = TorchSDPABackend._read(v_cache, tables, L, bs)
    return F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def _alternate(first, second, runs: int) -> tuple[float, float]:
    """Best microseconds of each, measured in four rounds that alternate which goes first."""
    a, b = [], []
    for i in range(4):
        if i % 2 == 0:
            a.append(_best_us(first, max(1, runs // 4)))
            b.append(_best_us(second, max(1, runs // 4)))
        else:
            b.append(_best_us(second, max(1, runs // 4)))
            a.append(_best_us(first, max(1, runs // 4)))
    return min(a), min(b)


def attention_op(shapes, kv_dtype: str, runs: int = 50, Hkv=3, G=3, D=64, bs=16) -> list[dict]:
    """Per-layer decode attention in microseconds: the kernel vs gathering and running SDPA."""
    dtype = {"int8": torch.int8, "bfloat16": torch.bfloat16}.get(kv_dtype, torch.float32)
    num_blocks = 4096
    k_cache = _encode(torch.randn(Hkv, num_blocks * bs, D), dtype).contiguous()
    v_cache = _encode(torch.randn(Hkv, num_blocks * bs, D), dtype).contiguous()
    rows = []
    for B, L in shapes:
        nblk = -(-L // bs)
        g = torch.Generator().manual_seed(B * 10007 + L)
        tables = torch.stack([torch.randperm(num_blocks, generator=g)[:nblk] for _ in range(B)])
        lens = torch.full((B,), L)
        q = torch.randn(B, Hkv, G, D)

        a, b = _alternate(
            partial(kernels.paged_decode_attention, q, k_cache, v_cache, tables, lens, bs, D**-0.5),
            partial(_gather_sdpa, q, k_cache, v_cache, tables, L, bs),
            runs,
        )
        rows.append(
            {
                "batch": B,
                "context": L,
                "native_us": a,
                "pytorch_us": b,
                "speedup": b / a,
            }
        )
    return rows


# The default model's layer linears, (out, in): qkv, o, gate/up and down.
INT4_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
AVX2_ONLY = ["-mno-avx512vnni", "-mno-avxvnni"]
VNNI256_ONLY = ["-DNO_ZMM"]
# The instruction each matmul path multiplies with, as kernels.peak_macs_per_s names it.
PATH_PEAK = {"vnni512": "int8_vnni512", "vnni256": "int8_vnni256", "avx2": "int8_avx2"}


def path_peaks(num_threads: int) -> dict[str, float]:
    """Measured multiply-adds per second of each matmul path's instruction (where present)."""
    out = {}
    for path, kind in PATH_PEAK.items():
        v = kernels.peak_macs_per_s(kind, num_threads)
        if v:
            out[path] = v
    return out


def _pytorch_int4(lin, x):
    with kernels.without(lin, "int4_matmul"):
        return lin(x)


def int4_op(rows_list, runs: int = 40, peaks: dict[str, float] | None = None) -> list[dict]:
    """The int4 x int8 kernel vs PyTorch's int4 kernel (bf16 activations) on the default model's
    layer shapes, in equivalent GFLOP/s; with the kernels' narrower paths as further columns where
    the CPU has more (a build held to 256-bit VNNI, one without VNNI: the AVX2 path). With
    `peaks` (path_peaks), each path's figure also as a fraction of its instruction's peak."""
    from slimserve.quant.int4 import Int4Linear, quantize_int4

    native = kernels.matmul_path()
    others = {"avx2": kernels.load_variant(AVX2_ONLY)}
    if native == "vnni512":
        others["vnni256"] = kernels.load_variant(VNNI256_ONLY)
    g = torch.Generator().manual_seed(0)
    out = []
    for name, (N, K) in INT4_SHAPES.items():
        codes, scale, zero = quantize_int4(torch.randn(N, K, generator=g), 32)
        lin = Int4Linear(codes, scale, zero, in_features=K, output_sizes=[N])
        args = (lin.packed, lin.scales_zeros, lin.group, lin.doubled, N)
        for M in rows_list:
            x = torch.randn(M, K, generator=g)
            n = max(1, runs * 8 // (M + 7))
            native_us, pytorch_us = _alternate(
                partial(kernels.int4_matmul, x, *args), partial(_pytorch_int4, lin, x), n
            )
            gflop = 2 * M * N * K / 1e3  # per microsecond -> GFLOP/s
            row = {
                "layer": name,
                "rows": M,
                "native_path": native,
                "native_gflops": gflop / native_us,
                "pytorch_gflops": gflop / pytorch_us,
                "speedup": pytorch_us / native_us,
            }
            for path, lib in others.items():
                us = _best_us(partial(kernels.int4_matmul, x, *args, None, lib), n)
                row[f"{path}_gflops"] = gflop / us
            if peaks:  # GFLOP/s are 2 per multiply-add
                for path, col in ((native, "native"), *((p, p) for p in others)):
                    if path in peaks:
                        row[f"{col}_of_peak"] = row[f"{col}_gflops"] * 1e9 / (2 * peaks[path])
            out.append(row)
    return out


def print_int4_op(rows: list[dict]) -> None:
    paths = [p for p in ("vnni256", "avx2") if f"{p}_gflops" in rows[0]]
    print(
        f"int4 matmul (equivalent GFLOP/s; % of the path's peak): layer rows "
        f"native ({rows[0]['native_path']}) {' '.join(paths)} pytorch speedup"
    )
    for r in rows:
        cols = [("native", r["native_gflops"])] + [(p, r[f"{p}_gflops"]) for p in paths]
        cells = " ".join(
            f"{v:7.1f}" + (f" ({100 * r[f'{c}_of_peak']:3.0f}%)" if f"{c}_of_peak" in r else "")
            for c, v in cols
        )
        print(
            f"  {r['layer']:>8} {r['rows']:>4} {cells} {r['pytorch_gflops']:7.1f}"
            f" {r['speedup']:6.2f}x"
        )


# End-to-end variants: what is turned off for each.
VARIANTS = {"native": None, "without_step": "decode_step", "pytorch": "all"}


def _turn_off(llm, what: str | None) -> None:
    """Rebuild `llm`'s step with the kernel `what` (or "all") off; None turns all back on."""
    kernels.set_enabled(True)
    if what == "all":
        kernels.set_enabled(False)
    elif what is not None:
        kernels.set_enabled(False, what)
    llm.engine.use_kernels(True)


def end_to_end(llm, batches, decode_tokens: int, rounds: int) -> list[dict]:
    """Greedy decode tok/s with every native kernel on, with all but the fused decode step, and
    with none (the PyTorch paths): rotating which goes first, best of `rounds`."""
    from slimserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    names = list(VARIANTS)
    rows = []
    for B in batches:
        prompts = [list(range(1000 + 7 * i, 1200 + 7 * i)) for i in range(B)]  # 200 tokens each
        llm.generate(prompts, params, use_tqdm=False)  # warm up, fill the prefix cache
        best = dict.fromkeys(names, 0.0)
        for i in range(rounds):
            for name in names[i % 3 :] + names[: i % 3]:
                _turn_off(llm, VARIANTS[name])
                try:
                    t = time.perf_counter()
                    llm.generate(prompts, params, use_tqdm=False)
                    best[name] = max(best[name], B * decode_tokens / (time.perf_counter() - t))
                finally:
                    _turn_off(llm, None)
        rows.append(
            {
                "batch": B,
                **{f"{n}_tok_s": best[n] for n in names},
                "speedup": best["native"] / best["pytorch"],
                "step_speedup": best["native"] / best["without_step"],
            }
        )
    return rows


def run_kernels(args) -> None:
    from slimserve.cli import make_llm

    if not kernels.available():
        raise RuntimeError("native kernels are not available here (see the log for why)")
    result = {**run_info(), "kv_cache_dtype": args.kv_cache_dtype or default_of("kv_cache_dtype")}
    shapes = [(1, 300), (1, 1000), (8, 300), (32, 300), (64, 260)]
    result["attention_op"] = attention_op(shapes, result["kv_cache_dtype"])
    print("decode attention, one layer (us): batch context native pytorch speedup")
    for r in result["attention_op"]:
        print(
            f"  {r['batch']:>3} {r['context']:>6} {r['native_us']:8.0f} {r['pytorch_us']:8.0f}"
            f" {r['speedup']:6.2f}x"
        )
    result["int4_op"] = int4_op([1, 8, 32, 256])
    print_int4_op(result["int4_op"])
    llm = make_llm(args, progress=False)
    result["end_to_end"] = end_to_end(llm, args.batch, args.decode_tokens, args.rounds)
    print("greedy decode (tok/s): batch native without-step pytorch speedup step-speedup")
    for r in result["end_to_end"]:
        print(
            f"  {r['batch']:>3} {r['native_tok_s']:8.1f} {r['without_step_tok_s']:8.1f}"
            f" {r['pytorch_tok_s']:8.1f} {r['speedup']:6.2f}x {r['step_speedup']:6.2f}x"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}", file=sys.stderr)
