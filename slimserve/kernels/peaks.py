"""The arithmetic peaks `slimserve bench roofline` rates the kernels by (kernels/peaks.c), and which
matmul path a build of the kernels runs."""

from __future__ import annotations

import ctypes
import time

from slimserve import kernels  # read at call time: this module loads with the package

MATMUL_PATHS = ("none", "avx2", "vnni256", "vnni512")
PEAK_KINDS = {"fp32_fma256": 0, "fp32_fma512": 1, "int8_vnni256": 2, "int8_vnni512": 3,
              "bf16_dot512": 4, "int8_avx2": 5}  # fmt: skip


def matmul_path(lib: ctypes.CDLL | None = None) -> str:
    """Which int4/int8 matmul path the library (the loaded one by default) runs, from the
    features it was compiled for: vnni512, vnni256, avx2 or none."""
    lib = lib or kernels._load()
    return MATMUL_PATHS[lib.matmul_path()] if lib is not None else "none"


def peak_macs_per_s(kind: str, num_threads: int, runs: int = 3) -> float | None:
    """Measured multiply-adds per second of one instruction kind (PEAK_KINDS) on num_threads
    threads, best of `runs`; None where the CPU or build lacks it."""
    lib = kernels._load()
    if lib is None:
        return None
    iters, best = 2_000_000, 0.0
    for _ in range(runs):
        t = time.perf_counter()
        done = lib.peak_macs(PEAK_KINDS[kind], iters, num_threads)
        if done < 0:
            return None
        best = max(best, done / (time.perf_counter() - t))
    return best
