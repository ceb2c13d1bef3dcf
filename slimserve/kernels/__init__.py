"""Native CPU kernels, compiled from C on first use and loaded with ctypes.

They are plain C (no PyTorch headers), so building one takes about a second with the system C
compiler. The shared library links the OpenMP runtime PyTorch has already loaded, so its parallel
loops share PyTorch's threads instead of starting a second pool. Built libraries are cached per
source, flags and CPU under ~/.cache/slimserve/kernels (or $SLIMSERVE_CACHE/kernels).

Every kernel is optional: with no C compiler, a failed build, or SLIMSERVE_NATIVE_KERNELS=0, the
callers use their PyTorch path and the engine says so once in its log.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from slimserve.config import kernel_flags_from_env, native_kernels_from_env
from slimserve.kernels.build import FLAGS, build
from slimserve.kernels.select import chosen, select, without

logger = logging.getLogger("slimserve")

_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True
_turned_off: set[str] = set()  # single kernels turned off, for A/B runs


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if not native_kernels_from_env():
        return None
    try:
        lib = _bind(ctypes.CDLL(str(build([*FLAGS, *kernel_flags_from_env()]))))
    except (OSError, RuntimeError) as e:
        logger.warning("native kernels unavailable, using the PyTorch paths: %s", e)
        return None
    _lib = lib
    return _lib


KERNELS = (
    "paged_decode_attention",
    "write_kv",
    "add_rms_norm",
    "int4_matmul",
    "rope",
    "silu_mul",
    "decode_step",
    "int4_rows",
    "int8_matmul",
    "int8_rows",
    "argmax",
)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = lib.paged_decode_attention
    fn.argtypes = [p] * 8 + [i64] * 8 + [ctypes.c_float, i64]
    fn.restype = ctypes.c_int
    fn = lib.write_kv
    fn.argtypes = [p, p, i64, i64, p, p, p] + [i64] * 6
    fn.restype = None
    fn = lib.add_rms_norm
    fn.argtypes = [p] * 5 + [i64, i64, ctypes.c_float, i64]
    fn.restype = None
    fn = lib.int4_matmul
    fn.argtypes = [p, i64, i64, i64, i64, p, p, i64, i64, p, p, i64, i64, i64, i64]
    fn.restype = ctypes.c_int
    lib.int8_built.argtypes, lib.int8_built.restype = [], ctypes.c_int
    fn = lib.int8_matmul
    fn.argtypes = [p, i64, i64, i64, p, p, i64, p, p, i64, i64, i64]
    fn.restype = ctypes.c_int
    fn = lib.int8_rows
    fn.argtypes = [p, p, i64, i64, p, i64, p]
    fn.restype = ctypes.c_int
    fn = lib.int4_rows
    fn.argtypes = [p, p, i64, i64, i64, i64, p, i64, p, i64]
    fn.restype = None
    fn = lib.rope
    fn.argtypes = [p] + [i64] * 4 + [p, p, p, i64]
    fn.restype = None
    fn = lib.silu_mul
    fn.argtypes = [p, i64, i64, i64, p, i64]
    fn.restype = None
    fn = lib.decode_scratch_bytes
    fn.argtypes = [p, p, i64, p]
    fn.restype = i64
    fn = lib.decode_layers
    fn.argtypes = [p, p, i64, p, p, i64]
    fn.restype = ctypes.c_int
    lib.argmax_rows.argtypes, lib.argmax_rows.restype = [p, i64, i64, i64, p, i64], None
    lib.peak_macs.argtypes, lib.peak_macs.restype = [i64, i64, i64], i64
    lib.matmul_path.argtypes, lib.matmul_path.restype = [], i64
    return lib


def load_variant(extra_flags: list[str]) -> ctypes.CDLL:
    """A separate copy of the kernels built with extra compiler flags, e.g. `-mno-avx512vnni
    -mno-avxvnni` to run the AVX2 code paths on a CPU that has more: for tests."""
    return _bind(ctypes.CDLL(str(build([*FLAGS, *extra_flags]))))


def set_enabled(enabled: bool, kernel: str | None = None) -> None:
    """Turn the native kernels, or one of KERNELS, off (or back on) in this process: for A/B
    tests and benchmarks."""
    global _enabled
    if kernel is None:
        _enabled = enabled
        _turned_off.clear()
    elif kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {', '.join(KERNELS)}")
    elif enabled:
        _turned_off.discard(kernel)
    else:
        _turned_off.add(kernel)


# Cache row formats the kernels read and write (layers/attention.py describes them).
_ROW_KINDS = {torch.float32: 0, torch.int8: 1, torch.bfloat16: 2}


def row_kind(dtype: torch.dtype) -> int:
    """The kernels' code for a KV cache of `dtype`."""
    return _ROW_KINDS[dtype]


def available(kernel: str | None = None) -> bool:
    """Whether the native kernels (or one of KERNELS) can run in this process: built, loaded and
    not turned off. Asked when something is built, never per step."""
    return _enabled and kernel not in _turned_off and _load() is not None


# The decode-attention kernel keeps one (sequence, KV head)'s accumulators on the stack.
MAX_QUERY_GROUP, MAX_HEAD_DIM = 32, 256


def decode_attention_supports(group: int, head_dim: int) -> bool:
    """Whether the paged decode kernel takes G = `group` query heads per KV head of `head_dim`."""
    return group <= MAX_QUERY_GROUP and head_dim <= MAX_HEAD_DIM


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) float32 with heads D apart in each row (a view of qkv is fine)."""
    if x.dtype != torch.float32 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.float().contiguous()
    return x


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values (T, Hkv, D) at their slots of a (Hkv, slots, row) cache pair,
    encoding each row in the cache's format (float32, bfloat16, or int8 with its scale)."""
    k, v = _rows(k), _rows(v)
    T, Hkv, D = k.shape
    _lib.write_kv(
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        v.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        T,
        Hkv,
        D,
        k_cache.shape[1],
        row_kind(k_cache.dtype),
        torch.get_num_threads(),
    )


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) over the last dim of float32 tensors."""
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None  # kept alive for the call
    h, y = torch.empty_like(x), torch.empty_like(x)
    H = x.shape[-1]
    _lib.add_rms_norm(
        x.data_ptr(),
        residual.data_ptr() if residual is not None else None,
        weight.data_ptr(),
        h.data_ptr(),
        y.data_ptr(),
        x.numel() // H,
        H,
        eps,
        torch.get_num_threads(),
    )
    return y, h


def rope_(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotate x (T, heads, D) float32 in place by its token's position (rotate_half layout), from
    (max_position, D) float32 tables; x's heads must be contiguous, its rows may be strided (a
    view of qkv). Returns x."""
    T, heads, D = x.shape
    _lib.rope(
        x.data_ptr(),
        x.stride(0),
        T,
        heads,
        D,
        cos.data_ptr(),
        sin.data_ptr(),
        positions.data_ptr(),
        torch.get_num_threads(),
    )
    return x


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for float32 x (T, 2 I) with unit column stride."""
    T, I2 = x.shape
    y = x.new_empty(T, I2 // 2)
    _lib.silu_mul(x.data_ptr(), x.stride(0), T, I2 // 2, y.data_ptr(), torch.get_num_threads())
    return y


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
    with_lse: bool = False,
    begins: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention over one layer's paged cache, reading each block in place.

    q (B, Hkv, G, D) float32; k/v_cache (Hkv, slots, D) float32 or bfloat16, or (Hkv, slots,
    D + 4) int8 rows with their scale (layers/attention.py); tables (B, max_blocks) int64; lens
    (B,) int64: row b attends to tokens [begins[b], lens[b]) (begins (B,) int64, default 0: a
    sliding window's first token; table entries before it are not read).
    Returns out (B, Hkv, G, D) and, with `with_lse`, the log-sum-exp (B, Hkv, G) of each row."""
    lib = _load()
    if lib is None:
        raise RuntimeError("native kernels are unavailable; check available()")
    B, Hkv, G, D = q.shape
    q, tables, lens = q.contiguous(), tables.contiguous(), lens.contiguous()
    begins = begins.contiguous() if begins is not None else None
    out = torch.empty_like(q)
    lse = q.new_empty(B, Hkv, G) if with_lse else None
    rc = lib.paged_decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        begins.data_ptr() if begins is not None else None,
        out.data_ptr(),
        lse.data_ptr() if lse is not None else None,
        B,
        Hkv,
        G,
        D,
        k_cache.shape[1],
        tables.shape[1],
        block_size,
        _ROW_KINDS[k_cache.dtype],
        scale,
        torch.get_num_threads(),
    )
    if rc:
        raise ValueError(
            f"paged_decode_attention: unsupported shape G={G}, D={D} (at most "
            f"{MAX_QUERY_GROUP}, {MAX_HEAD_DIM}), or no memory for long sequences' partitions"
        )
    return out, lse


def decode_scratch_bytes(
    model: ctypes.Structure, layers: ctypes.Array, batch: ctypes.Structure
) -> int:
    """Scratch bytes decode_layers needs for a batch, or -1 when it does not take the model
    (engine/decode_step.py builds the structures)."""
    return _lib.decode_scratch_bytes(ctypes.byref(model), layers, len(layers), ctypes.byref(batch))


def decode_layers(
    model: ctypes.Structure, layers: ctypes.Array, batch: ctypes.Structure, scratch: torch.Tensor
) -> None:
    """Every layer and the final norm of one decode step, in place on batch.x."""
    rc = _lib.decode_layers(
        ctypes.byref(model),
        layers,
        len(layers),
        ctypes.byref(batch),
        scratch.data_ptr(),
        torch.get_num_threads(),
    )
    if rc:
        raise ValueError("decode_layers: a shape outside what the native step takes")


# The matmul wrappers live in their own file; they read the library loaded above.
from slimserve.kernels.matmul import (  # noqa: E402
    int4_matmul,
    int4_rows,
    int8_built,
    int8_matmul,
    int8_rows,
)
from slimserve.kernels.peaks import PEAK_KINDS, matmul_path, peak_macs_per_s  # noqa: E402

__all__ = [
    "KERNELS",
    "PEAK_KINDS",
    "add_rms_norm",
    "available",
    "chosen",
    "decode_attention_supports",
    "decode_layers",
    "decode_scratch_bytes",
    "int4_matmul",
    "int4_rows",
    "int8_built",
    "int8_matmul",
    "int8_rows",
    "load_variant",
    "matmul_path",
    "paged_decode_attention",
    "peak_macs_per_s",
    "rope_",
    "row_kind",
    "select",
    "set_enabled",
    "silu_mul",
    "without",
    "write_kv",
]
