import torch
import torch.nn.functional as F
from torch import nn

from slimserve import kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up over a packed (..., 2 * d) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.dim() == 2
            and x.stride(1) == 1
            and kernels.available("silu_mul")
        ):
            return kernels.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
