"""Attention over the paged KV cache.

The KV cache of one layer is a pair of flat tensors (num_blocks * block_size, Hkv, D): slot
`block_id * block_size + offset` holds one token. New keys/values are scattered to their slots,
then each attention group gathers the slots it needs. Only attention sees per-sequence shapes;
every other layer works on the flat (T, hidden) batch with no padding.
"""

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.engine.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # bound by the runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (T, H, D), k/v: (T, Hkv, D) -> (T, H * D)."""
        ctx = get_forward_context()
        k_cache, v_cache = self.kv_cache
        k_cache.index_copy_(0, ctx.slot_mapping, k)
        v_cache.index_copy_(0, ctx.slot_mapping, v)
        T, H, D = q.shape
        if len(ctx.groups) == 1:
            return self._group(ctx.groups[0], q, k, v, k_cache, v_cache).reshape(T, H * D)
        out = q.new_empty(T, H, D)
        for g in ctx.groups:
            out[g.start : g.end] = self._group(g, q, k, v, k_cache, v_cache)
        return out.view(T, H * D)

    def _group(self, g, q, k, v, k_cache, v_cache) -> torch.Tensor:
        B, Lq, D = g.num_seqs, g.q_len, self.head_dim
        qg = q[g.start : g.end].view(B, Lq, self.num_heads, D).transpose(1, 2)  # (B, H, Lq, D)
        if g.kv_indices is None:
            kg = k[g.start : g.end].view(B, Lq, self.num_kv_heads, D)
            vg = v[g.start : g.end].view(B, Lq, self.num_kv_heads, D)
        elif isinstance(g.kv_indices, slice):  # one sequence, consecutive blocks: a view
            kg, vg = k_cache[g.kv_indices].unsqueeze(0), v_cache[g.kv_indices].unsqueeze(0)
        else:
            kg, vg = k_cache[g.kv_indices], v_cache[g.kv_indices]  # (B, L, Hkv, D)
        o = F.scaled_dot_product_attention(
            qg,
            kg.transpose(1, 2),
            vg.transpose(1, 2),
            attn_mask=g.mask,
            is_causal=g.causal,
            scale=self.scale,
            enable_gqa=True,
        )
        return o.transpose(1, 2).reshape(B * Lq, self.num_heads, D)
