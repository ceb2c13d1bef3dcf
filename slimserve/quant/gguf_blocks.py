"""llama.cpp's block formats, decoded into the groups PyTorch's int4 CPU kernel takes.

Every 4-bit format here becomes, per group of 32 weights along the input dimension, 4-bit codes
q in [0, 15] with w = (q - 8) * scale + zero, which is exactly the dequantization of
`_weight_int4pack_mm_for_cpu`:
  Q4_0  w = d * (q - 8)                    scale = d, zero = 0
  Q4_1  w = d * q + m                      scale = d, zero = m + 8 d
  Q4_K  w = d * sc_j * q - dmin * m_j      scale = d sc_j, zero = 8 d sc_j - dmin m_j
Q8_0 (w = d * q, q int8) comes back as int8 codes and per-group d; `int4.py` splits it in two
4-bit halves. Layouts follow ggml-quants.c; tests check them against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import torch

FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
EIGHT_BIT = ("Q8_0",)
SUPPORTED = FOUR_BIT + EIGHT_BIT


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian halves -> (...) float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes -> (..., 32) codes: low nibbles are elements 0-15, high ones 16-31."""
    return torch.cat((qs & 15, qs >> 4), dim=-1)


def decode_4bit(kind: str, blocks: torch.Tensor, cols: int):
    """(rows, bytes) blocks -> codes uint8 (rows, cols), scale and zero f32 (rows, cols // 32)."""
    rows = blocks.shape[0]
    if kind == "Q4_0":
        b = blocks.view(rows, cols // 32, 18)
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:]).reshape(rows, cols), d, torch.zeros_like(d)
    if kind == "Q4_1":
        b = blocks.view(rows, cols // 32, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return _nibbles(b[..., 4:]).reshape(rows, cols), d, m + 8 * d
    if kind == "Q4_K":
        b = blocks.view(rows, cols // 256, 144)
        d, dmin = _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)
        sc, mn = _k4_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(rows, cols // 256, 4, 32)  # 4 chunks of 64 weights
        codes = torch.stack((qs & 15, qs >> 4), dim=3)  # chunk j: low -> sub-block 2j, high 2j+1
        scale = d * sc
        return (
            codes.reshape(rows, cols),
            scale.reshape(rows, -1),
            (8 * scale - dmin * mn).reshape(rows, -1),
        )
    raise ValueError(kind)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (get_scale_min_k4)."""
    s = s.int()
    lo_sc, lo_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    hi_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), -1).float(), torch.cat((lo_mn, hi_mn), -1).float()


def decode_q8_0(blocks: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, bytes) Q8_0 blocks -> codes int8 (rows, cols), d f32 (rows, cols // 32)."""
    rows = blocks.shape[0]
    b = blocks.view(rows, cols // 32, 34)
    return b[..., 2:].contiguous().view(torch.int8).reshape(rows, cols), _f16(b[..., 0:2])
