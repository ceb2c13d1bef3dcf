"""Linears and embeddings held in PyTorch's packed int4 CPU format, with bf16 activations.

`_weight_int4pack_mm_for_cpu` reads 4-bit codes with a bf16 (scale, zero) per group of 32-256
input features: w = (q - 8) * scale + zero. On this CPU it streams weights at ~19 GB/s from DRAM
against ~7 GB/s for `_weight_int8pack_mm` and ~14 GB/s for fp32 GEMV, and with bf16 activations
it is as fast as fp32 GEMM up to prefill batches (docs/benchmarks.md), so one path serves decode
and prefill alike.

8-bit codes of the layers (Q8_0, `--quantization int8`) go through the same kernel: q = 16 hi +
lo with hi in [-8, 7] and lo in [0, 15], so W x = W_hi x + W_lo x. The two halves sit side by
side along the input dimension (K doubles) and the input is repeated, so one call still computes
the sum. An 8-bit LM head or embedding table is held one byte a weight instead (quant/int8.py)
where the native kernel runs.
"""

from __future__ import annotations

import torch
from torch import nn

from slimserve import kernels

BLOCK_N = 64  # the packed layout interleaves output rows in tiles of 64 (see `_rows_codes`)
_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
_mm = torch.ops.aten._weight_int4pack_mm_for_cpu


def int8_as_int4(q: torch.Tensor, d: torch.Tensor):
    """int8 codes (N, K) with per-group scales d (N, K // g) -> the doubled-K 4-bit form."""
    q = q.to(torch.int16)
    hi, lo = (q >> 4) + 8, q & 15  # arithmetic shift: hi in [-8, 7] -> [0, 15]
    codes = torch.cat((hi, lo), dim=1).to(torch.uint8)
    return codes, torch.cat((16 * d, d), dim=1), torch.cat((torch.zeros_like(d), 8 * d), dim=1)


def _pure_8bit(sz: torch.Tensor) -> bool:
    """Whether a doubled (K'/g, N, 2) (scale, zero) table holds only `int8_as_int4` rows: hi
    groups (16 d, 0) and lo groups (d, 8 d). Then q + 128 = 16 hi + lo is one unsigned byte per
    weight, and the native kernel can multiply it as such (exact in bfloat16: powers of two)."""
    hi, lo = sz.float().chunk(2, dim=0)
    return bool(
        torch.equal(hi[..., 0], 16 * lo[..., 0])
        and not hi[..., 1].any()
        and torch.equal(lo[..., 1], 8 * lo[..., 0])
    )


def int4_as_doubled(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """A 4-bit weight in the doubled-K form (its high half is zero), to share a matrix with 8-bit
    shards."""
    return (
        torch.cat((torch.full_like(codes, 8), codes), dim=1),
        torch.cat((scale, scale), dim=1),
        torch.cat((torch.zeros_like(zero), zero), dim=1),
    )


def quantize_int4(w: torch.Tensor, group: int):
    """Round-to-nearest asymmetric int4 per group of `group` inputs: w (N, K) fp32."""
    N, K = w.shape
    g = w.view(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-10)
    codes = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15)
    return codes.to(torch.uint8).view(N, K), scale, lo + 8 * scale


def quantize_int8(w: torch.Tensor, group: int = 32):
    """Round-to-nearest symmetric int8 per group: codes int8 (N, K), scales (N, K // group)."""
    N, K = w.shape
    g = w.view(N, K // group, group)
    d = (g.abs().amax(-1) / 127).clamp_min(1e-10)
    return torch.round(g / d.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).view(N, K), d


class Int4Linear(nn.Module):
    """y = x W^T (+ b) for a packed W of `out_features` x `in_features` (K doubles for 8-bit).

    codes uint8 (N, K'), scale/zero f32 (N, K' / group); output_sizes as in Linear."""

    NATIVE = ("int4_matmul", "int4_rows")

    def __init__(self, codes, scale, zero, *, in_features: int, output_sizes, bias=None):
        super().__init__()
        self.native = kernels.chosen(self.NATIVE)  # settled again at build: kernels.select
        N, Kp = codes.shape
        self.in_features, self.output_sizes = in_features, list(output_sizes)
        self.out_features, self.doubled = N, Kp == 2 * in_features
        self.group = Kp // scale.shape[1]
        pad = -N % BLOCK_N
        if pad:  # the kernel wants N in tiles; padded rows decode to 0 and are sliced off
            codes = torch.cat((codes, codes.new_full((pad, Kp), 8)))
            scale = torch.cat((scale, scale.new_zeros(pad, scale.shape[1])))
            zero = torch.cat((zero, zero.new_zeros(pad, zero.shape[1])))
        self.register_buffer("packed", _pack(codes.to(torch.int32).contiguous(), 1))
        sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()  # (K'/g, N, 2)
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))
        self.bias = bias
        self.eight_bit = self.doubled and _pure_8bit(self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "int4_matmul" in self.native and x.dtype == torch.float32 and x.device.type == "cpu":
            y = kernels.int4_matmul(
                x,
                self.packed,
                self.scales_zeros,
                self.group,
                self.doubled,
                self.out_features,
                self.bias,
                eight_bit=self.eight_bit,
            )
            if y is not None:
                return y
        xb = x.to(torch.bfloat16)
        if self.doubled:
            xb = torch.cat((xb, xb), dim=-1)
        y = _mm(xb, self.packed, self.group, self.scales_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        y = y.float()
        return y if self.bias is None else y + self.bias

    def _rows_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """The 4-bit codes of output rows `ids`, (T, K'), read from the packed layout: tile
        n // 64 is a (K', 32) byte array whose column j holds row 64t + j in its low nibble and
        row 64t + 32 + j in its high one."""
        Kp = self.packed.shape[1] * 2
        tiles = self.packed.view(-1, Kp, BLOCK_N // 2)
        j = ids % BLOCK_N
        bytes_ = tiles[ids // BLOCK_N, :, j % (BLOCK_N // 2)]  # (T, K')
        return (bytes_ >> (4 * (j >= BLOCK_N // 2)).to(torch.uint8).unsqueeze(1)) & 15

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows `ids`, (T, in_features) fp32: a tied embedding's lookup."""
        if "int4_rows" in self.native and ids.dtype == torch.int64 and ids.device.type == "cpu":
            return kernels.int4_rows(
                ids, self.packed, self.scales_zeros, self.group, self.doubled, self.in_features
            )
        codes = self._rows_codes(ids).float()
        T, Kp = codes.shape
        sz = self.scales_zeros[:, ids].float()  # (K'/g, T, 2)
        w = (codes.view(T, -1, self.group) - 8) * sz[..., 0].t().unsqueeze(-1)
        w = (w + sz[..., 1].t().unsqueeze(-1)).view(T, Kp)
        return w[:, : self.in_features] + w[:, self.in_features :] if self.doubled else w


class PackedEmbedding(nn.Module):
    """Token embeddings read from a packed matrix: the tied LM head's, or a table of its own."""

    def __init__(self, table: Int4Linear, tied: bool):
        super().__init__()
        if tied:
            self._table = [table]  # a list: the head is registered once, by its parent
        else:
            self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self._table[0] if hasattr(self, "_table") else self.table
        return table.rows(input_ids)
