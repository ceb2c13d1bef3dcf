import torch
import torch.nn.functional as F
from torch import nn

from slimserve import kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up over a packed (..., 2 * d) input."""

    NATIVE = ("silu_mul",)

    def __init__(self):
        super().__init__()
        self.native = kernels.chosen(self.NATIVE)  # settled again at build: kernels.select

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.native
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.dim() == 2
            and x.stride(1) == 1
        ):
            return kernels.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu_tanh(gate) * up over a packed (..., 2 * d) input (Gemma's gated MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
