import torch
import torch.nn.functional as F
from torch import nn

from slimserve import kernels


class RMSNorm(nn.Module):
    """RMSNorm with the residual add fused in: returns (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and kernels.available("add_rms_norm")
        ):
            return kernels.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x
