"""8-bit weights held one byte each: the LM head and untied embedding tables.

Q8_0 blocks (and `--quantization int8`'s head) in the 4-bit layout of quant/int4.py cost two
nibble halves and two (scale, zero) pairs per 32 weights: 1.25 bytes a weight and twice the
multiply-adds. kernels/int8_matmul.c reads them as one byte (q + 128) with one float16 scale per
32 weights, 1.06 bytes a weight; for the default model's head that is 30 MB a decoded token
instead of 35. The scales stay float16, as GGUF stores them (the 4-bit layout rounds them to
bfloat16).

Where the native kernel is missing, the loader keeps the 4-bit layout (quant/__init__.py). When
it is turned off in a running process (A/B runs), the same weights are packed into the 4-bit
layout on first use and PyTorch's kernel runs them.
"""

from __future__ import annotations

import torch
from torch import nn

from slimserve import kernels
from slimserve.quant.int4 import BLOCK_N, Int4Linear, int8_as_int4

GROUP = 32  # inputs per scale


class Int8Linear(nn.Module):
    """y = x W^T (+ b) for int8 codes q (N, K) with scales d (N, K / 32): W = q d."""

    NATIVE = ("int8_matmul", "int8_rows")

    def __init__(self, q, d, *, in_features: int, output_sizes, bias=None):
        super().__init__()
        self.native = kernels.chosen(self.NATIVE)  # settled again at build: kernels.select
        N, K = q.shape
        self.in_features, self.out_features = in_features, N
        self.output_sizes = list(output_sizes)
        pad = -N % BLOCK_N
        u = (q.to(torch.int16) + 128).to(torch.uint8)
        d = d.float()
        if pad:  # padded rows are q = 0, d = 0, and sliced off
            u = torch.cat((u, u.new_full((pad, K), 128)))
            d = torch.cat((d, d.new_zeros(pad, d.shape[1])))
        tiles = u.view(-1, BLOCK_N, K // 4, 4).transpose(1, 2)  # (N / 64, K / 4, 64, 4)
        self.register_buffer("codes", tiles.contiguous())
        self.register_buffer("scales", d.t().contiguous().to(torch.float16))  # (K / 32, N)
        self.bias = bias
        self._fallback: list[Int4Linear] = []  # a list: not registered, not counted as resident

    @staticmethod
    def takes(q: torch.Tensor, d: torch.Tensor, native: bool = True) -> bool:
        """Whether the native kernel runs these codes: native kernels are on (`native`), it is
        built here, the scales are per 32 inputs, and no code is -128 (kernels/int8_matmul.c
        says why)."""
        return (
            native
            and kernels.available("int8_matmul")
            and kernels.int8_built()
            and q.shape[1] % GROUP == 0
            and d.shape[1] * GROUP == q.shape[1]
            and int(q.min()) > -128
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "int8_matmul" in self.native and x.dtype == torch.float32 and x.device.type == "cpu":
            y = kernels.int8_matmul(x, self.codes, self.scales, self.out_features, self.bias)
            if y is not None:
                return y
        return self._as_int4()(x)

    def _int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 (N, K), d float32 (N, K / 32)) back from the tiles."""
        u = self.codes.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]
        q = (u.to(torch.int16) - 128).to(torch.int8)
        return q, self.scales.float().t()[: self.out_features]

    def _as_int4(self) -> Int4Linear:
        if not self._fallback:
            self._fallback.append(
                Int4Linear(
                    *int8_as_int4(*self._int8()),
                    in_features=self.in_features,
                    output_sizes=self.output_sizes,
                    bias=self.bias,
                )
            )
        return self._fallback[0]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows `ids`, (T, in_features) fp32: an embedding's lookup."""
        if "int8_rows" in self.native and ids.dtype == torch.int64 and ids.device.type == "cpu":
            return kernels.int8_rows(ids, self.codes, self.scales, self.in_features)
        T, K = ids.shape[0], self.in_features
        u = self.codes[ids // BLOCK_N, :, ids % BLOCK_N, :].reshape(T, K)
        d = self.scales[:, ids].t().float()  # (T, K / 32)
        return ((u.to(torch.int32) - 128).float().view(T, -1, GROUP) * d.unsqueeze(-1)).view(T, K)
