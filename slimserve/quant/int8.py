"""int8 weight-only linears: per-output-channel round-to-nearest, bf16 activations.

PyTorch's `_weight_int8pack_mm` reads a quarter of fp32's bytes and is fast with bf16 inputs on
this CPU (`slimserve bench roofline`), so small-batch decode, which is bound by reading weights,
gains most. Activations round to bf16 on the way in; outputs return to fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from slimserve.engine.forward_context import get_forward_context
from slimserve.errors import InvalidRequest
from slimserve.layers.embedding import LMHead, VocabEmbedding
from slimserve.layers.linear import Linear


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) fp32 -> int8 (out, in) and bf16 scales (out,), symmetric per row."""
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


class Int8Linear(nn.Module):
    def __init__(self, linear: Linear):
        super().__init__()
        self.output_sizes = linear.output_sizes
        q, s = _quantize_rows(linear.weight.detach().t().float())  # stored (in, out) in Linear
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales)
        y = y.to(torch.float32)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows (a tied embedding's lookup)."""
        return self.qweight[ids].to(torch.float32) * self.scales[ids].to(torch.float32).unsqueeze(1)


class Int8LMHead(Int8Linear):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden[get_forward_context().logits_indices])


class _TiedInt8Embedding(nn.Module):
    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list: not registered twice as a submodule

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].rows(input_ids)


METHODS = ("int8",)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Swap every Linear (and the LM head, and a tied embedding's lookup) for its int8 form."""
    if method not in METHODS:
        raise InvalidRequest(
            f"unknown quantization {method!r}; supported: {', '.join(METHODS)}",
            param="quantization",
        )
    swaps = {}
    for name, module in model.named_modules():
        if isinstance(module, LMHead):
            swaps[name] = Int8LMHead(module)
        elif isinstance(module, Linear):
            swaps[name] = Int8Linear(module)
    for name, new in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    head = next((m for m in swaps.values() if isinstance(m, Int8LMHead)), None)
    for name, module in list(model.named_modules()):
        if isinstance(module, VocabEmbedding) and module.tied_head is not None and head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _TiedInt8Embedding(head))
    return model
