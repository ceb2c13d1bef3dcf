"""Linear layers. Several HF weights may be packed into one (q/k/v, gate/up) to cut GEMM calls.

Weights are stored transposed, (in_features, out_features): on CPU `x @ W` reads a row-major
(in, out) matrix at 1.4-2x the bandwidth of `F.linear` with (out, in) when x has one row (batch-1
decode; docs/benchmarks.md), and prefill GEMMs run at the same speed either way.
"""

import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        out = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(in_features, out), requires_grad=False)  # (in, out)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy an HF-layout tensor ((out, in) weight or (out,) bias) into output shard `shard`."""
        start = sum(self.output_sizes[:shard])
        cols = slice(start, start + self.output_sizes[shard])
        dst = self.weight[:, cols].t() if name == "weight" else self.bias[cols]
        if dst.shape != tensor.shape:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias
