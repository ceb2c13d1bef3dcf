"""Python faces of the matmul kernels: int4 (PyTorch's packed layout, quant/int4.py) and int8
(one byte a weight, quant/int8.py), and the row lookups of embeddings held in either layout."""

from __future__ import annotations

import ctypes

import torch

from slimserve import kernels


def int4_rows(
    ids: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    group: int,
    doubled: bool,
    in_features: int,
) -> torch.Tensor:
    """Dequantized rows `ids` (T,) int64 of a weight in PyTorch's packed int4 layout, (T,
    in_features) float32 (a doubled weight's halves summed): quant/int4.py `rows`, bit for bit."""
    ids = ids.contiguous()
    out = torch.empty(ids.shape[0], in_features)
    kernels._lib.int4_rows(
        packed.data_ptr(),
        scales_zeros.data_ptr(),
        scales_zeros.shape[1],
        in_features,
        int(doubled),
        group,
        ids.data_ptr(),
        ids.shape[0],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _matmul_io(x: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x with unit column stride (its rows may be strided), and the (M, out_features) output."""
    if x.stride(1) != 1:
        x = x.contiguous()
    return x, x.new_empty(x.shape[0], out_features)


def int8_built() -> bool:
    """Whether the 8-bit matmul was compiled in (it needs AVX2 and F16C); check available()
    first."""
    return bool(kernels._lib.int8_built())


def int8_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor | None:
    """x (M, K) float32 times an 8-bit weight in quant/int8.py's tiles, activations rounded to
    int8 per 32 (+ bias): (M, out_features) float32, or None when the kernel does not take it."""
    x, y = _matmul_io(x, out_features)
    M, K = x.shape
    rc = (lib or kernels._lib).int8_matmul(
        x.data_ptr(),
        x.stride(0),
        M,
        K,
        codes.data_ptr(),
        scales.data_ptr(),
        scales.shape[1],
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        y.stride(0),
        out_features,
        torch.get_num_threads(),
    )
    return None if rc else y


def int8_rows(
    ids: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Dequantized rows `ids` (T,) int64 of an 8-bit weight in quant/int8.py's tiles, (T,
    in_features) float32: Int8Linear.rows' PyTorch path, bit for bit."""
    ids = ids.contiguous()
    out = torch.empty(ids.shape[0], in_features)
    rc = kernels._lib.int8_rows(
        codes.data_ptr(),
        scales.data_ptr(),
        scales.shape[1],
        in_features,
        ids.data_ptr(),
        ids.shape[0],
        out.data_ptr(),
    )
    if rc:
        raise RuntimeError("int8_rows: the native kernels were built without AVX2 and F16C")
    return out


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    group: int,
    doubled: bool,
    out_features: int,
    bias: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
    eight_bit: bool = False,
) -> torch.Tensor | None:
    """x (M, K) float32 times a weight in PyTorch's packed int4 layout (quant/int4.py), with the
    activations rounded to int8 per block of 32 (+ bias): (M, out_features) float32, or None
    when the kernel does not take it (no AVX2, K not a multiple of 32) and the caller should use
    PyTorch's kernel. `eight_bit`: a doubled weight that is purely 8-bit (Int4Linear.eight_bit),
    which the VNNI path reads as one byte per weight."""
    x, y = _matmul_io(x, out_features)
    M, K = x.shape
    rc = (lib or kernels._lib).int4_matmul(
        x.data_ptr(),
        x.stride(0),
        M,
        K,
        int(doubled),
        packed.data_ptr(),
        scales_zeros.data_ptr(),
        scales_zeros.shape[1],
        group,
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        y.stride(0),
        out_features,
        int(eight_bit),
        torch.get_num_threads(),
    )
    return None if rc else y
