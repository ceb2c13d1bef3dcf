"""Greedy sampling's argmax over each row of the logits, natively (kernels/argmax.c)."""

from __future__ import annotations

import torch

from slimserve import kernels  # read at call time: this module loads with the package


def argmax(logits: torch.Tensor, native: bool = True) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of (R, V) logits, the same indices (the first maximum; the first
    NaN where a row has one). Float32 CPU rows with contiguous values run natively when `native`
    (the caller's choice, settled once with `kernels.available("argmax")`); any other tensor
    runs PyTorch's."""
    lib = kernels._lib
    if not (native and lib is not None and logits.dim() == 2 and logits.shape[1] > 0
            and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and logits.stride(1) == 1):  # fmt: skip
        return logits.argmax(dim=-1)
    rows, n = logits.shape
    out = torch.empty(rows, dtype=torch.long)
    lib.argmax_rows(logits.data_ptr(), logits.stride(0), rows, n, out.data_ptr(),
                    torch.get_num_threads())  # fmt: skip
    return out
