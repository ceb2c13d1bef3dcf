"""How keys and values are stored in the cache, for the PyTorch paths (the native kernels read
and write the same rows: kernels/paged_attention.c).

A float32 or bfloat16 cache stores each row as it is (rounded); an int8 cache stores D int8
codes followed by the 4 bytes of the token's float32 scale for the head (symmetric, per token
and head), so one gather brings codes and scales together: (D + 4) bytes per head and token.
"""

import torch

INT8_SCALE_FLOOR = 1e-8  # kernels/paged_attention.c uses the same floor


def encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D) float keys/values -> what a cache of `dtype` stores: themselves (cast), or for
    int8 the codes with each vector's float32 scale appended as 4 bytes, (..., D + 4)."""
    if dtype != torch.int8:
        return x.to(dtype)
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(INT8_SCALE_FLOOR) / 127
    codes = torch.round(x / scale).to(torch.int8)
    return torch.cat((codes, scale.view(torch.int8)), dim=-1)


def decode(stored: torch.Tensor) -> torch.Tensor:
    """(..., D + 4) int8 cache rows -> (..., D) float32."""
    return stored[..., :-4].float() * stored[..., -4:].contiguous().view(torch.float32)


def as_stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` gives it back. A fresh prompt attends to these rounded values, like
    every later read from the cache, so a prompt computed whole, in chunks, or again after
    preemption gives the same numbers."""
    if dtype == torch.int8:
        return decode(encode(x, dtype))
    return x if dtype == x.dtype else x.to(dtype).float()
