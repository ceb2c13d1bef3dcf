"""Attention over the paged KV cache: the layer holds its cache tensors and spec; the backend
chosen at build (slimserve/backends) writes the new keys/values and attends, with the metadata
it built for this layer's spec. Only attention sees per-sequence shapes; every other layer works
on the flat (T, hidden) batch."""

import torch
from torch import nn

from slimserve.core.forward_context import get_forward_context
from slimserve.kv_cache.spec import FULL, AttentionSpec


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, spec: AttentionSpec = FULL
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.spec = spec
        # Bound by the model runner: the (Hkv, slots, row) key and value caches, the KV group
        # whose block tables index them, the backend.
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.group = 0
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (T, H, D), k/v: (T, Hkv, D) -> (T, H * D)."""
        ctx = get_forward_context()
        self.backend.write_kv(self, k, v, ctx.slots(self.group))
        return self.backend.forward(self, q, k, v, ctx.metadata[self.group])
