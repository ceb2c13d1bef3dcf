"""`slimserve bench cutover`: where the 512-bit tiles start to beat the 256-bit paths, on this
CPU, with the model's own weights.

Both paths give the same bits, so the cut-over (`ZMIN` for the int4 matmuls, `ZMIN8` for the
8-bit head; kernels/build.py's `tuning_flags`) is a matter of speed alone, and it moves with the
CPU. Two builds are loaded into this one process: one held to the 256-bit paths (`-DNO_ZMM`) and
one that takes the tiles at any row count. For each row count, a sweep calls every int4 matmul
of the model in turn, as a decode step does (the weights stream from memory, not from cache),
then the 8-bit head after the caches were flushed; the builds alternate, and each figure is the
median over rounds of the pair's ratio (256-bit time / 512-bit time: above 1, the tiles win).
"""

from __future__ import annotations

import statistics
import time

import torch

from slimserve.bench.kernels import VNNI256_ONLY as NARROW
from slimserve.bench.runinfo import run_info

WIDE = ["-DZMIN=1", "-DZMIN8=1"]  # the tiles at any row count


def _sweeps(lins, heads, lib, rows: int, flush: torch.Tensor) -> tuple[float, float]:
    """Seconds for every int4 matmul of the model at `rows` rows, then for its 8-bit head."""
    from slimserve.kernels.matmul import int4_matmul, int8_matmul

    xs = {k: torch.randn(rows, k) for k in {m.in_features for m in lins + heads}}
    t = time.perf_counter()
    for m in lins:
        int4_matmul(xs[m.in_features], m.packed, m.scales_zeros, m.group, m.doubled,
                    m.out_features, m.bias, lib=lib, eight_bit=m.eight_bit)  # fmt: skip
    t4 = time.perf_counter() - t
    flush.add_(1.0)  # the head is read from memory, as after a step's layers
    t = time.perf_counter()
    for m in heads:
        int8_matmul(xs[m.in_features], m.codes, m.scales, m.out_features, m.bias, lib=lib)
    return t4, time.perf_counter() - t


def cutover(model, rows_list: list[int], rounds: int) -> list[dict]:
    """Per row count: each kind the model has ("int4", "head"), its median times on both builds
    and the median of their ratios."""
    from slimserve import kernels
    from slimserve.quant.int4 import Int4Linear
    from slimserve.quant.int8 import Int8Linear

    lins = [m for m in model.modules() if isinstance(m, Int4Linear)]
    heads = [m for m in model.modules() if isinstance(m, Int8Linear)]
    kinds = [w for w, ms in (("int4", lins), ("head", heads)) if ms]
    if not kinds:
        raise ValueError("the model has no int4 or 8-bit matmuls to time (--quantization none?)")
    libs = {"256": kernels.load_variant(NARROW), "512": kernels.load_variant(WIDE)}
    flush = torch.empty(64 << 20, dtype=torch.float32)  # 256 MiB, past any last-level cache
    times = {(p, r, w): [] for p in libs for r in rows_list for w in ("int4", "head")}
    for i in range(rounds):
        for rows in rows_list:
            for path in list(libs)[:: 1 if i % 2 == 0 else -1]:
                t4, th = _sweeps(lins, heads, libs[path], rows, flush)
                times[(path, rows, "int4")].append(t4)
                times[(path, rows, "head")].append(th)
    out = []
    for rows in rows_list:
        row = {"rows": rows}
        for w in kinds:
            narrow, wide = times[("256", rows, w)], times[("512", rows, w)]
            row[f"{w}_256_ms"] = 1000 * statistics.median(narrow)
            row[f"{w}_512_ms"] = 1000 * statistics.median(wide)
            row[f"{w}_ratio"] = statistics.median(n / x for n, x in zip(narrow, wide))
        out.append(row)
    return out


def suggested(rows: list[dict], kind: str) -> int | None:
    """The fewest rows from which the tiles win at every measured count (None: they never do)."""
    start = None
    for r in sorted(rows, key=lambda r: r["rows"]):
        if r.get(f"{kind}_ratio", 0.0) > 1.0:
            start = r["rows"] if start is None else start
        else:
            start = None
    return start


def run_cutover(args) -> None:
    import json

    from slimserve.cli import make_llm
    from slimserve.kernels.build import FLAGS
    from slimserve.kernels.peaks import matmul_path

    if min(args.rows) < 1:
        raise ValueError(f"--rows must be at least 1, got {min(args.rows)}")
    if matmul_path() != "vnni512":
        raise RuntimeError(f"this CPU runs the {matmul_path()} path: no 512-bit tiles here")
    llm = make_llm(args)
    rows = cutover(llm.engine.model, args.rows, args.rounds)
    print("rows   int4 256-bit / 512-bit ms  ratio   head 256-bit / 512-bit ms  ratio"
          "  (ratio > 1: the 512-bit tiles win)")  # fmt: skip

    def cells(r, w):
        if f"{w}_ratio" not in r:  # the model has no such matmul
            return f"{'-':>8} {'-':>8}  {'-':>5} "
        return f"{r[f'{w}_256_ms']:8.2f} {r[f'{w}_512_ms']:8.2f}  {r[f'{w}_ratio']:5.2f}x"

    for r in rows:
        print(f"{r['rows']:4d}   {cells(r, 'int4')}   {cells(r, 'head')}")
    start = {"ZMIN": suggested(rows, "int4"), "ZMIN8": suggested(rows, "head")}
    flags = " ".join(f"-D{k}={v if v is not None else 1 << 30}" for k, v in start.items())
    built = " ".join(f for f in FLAGS if f.startswith("-DZMIN")) or "the defaults, 8 and 8"
    print(f"cut-overs these figures suggest: SLIMSERVE_KERNEL_FLAGS='{flags}' (built: {built})")
    if args.output:
        result = {**run_info(), "rounds": args.rounds, "rows": rows, "suggested": start}
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
