"""Attention over the paged KV cache.

One layer's cache is a pair of head-major tensors (Hkv, num_blocks * block_size, D): slot
`block_id * block_size + offset` holds one token. Head-major keeps each head's block a contiguous
(block_size, D) tile, so gathering a sequence's blocks copies 4 KB rows, and the gathered
(B, Hkv, L, D) tensor has contiguous (L, D) matrices, the layout CPU SDPA is fastest on.
New keys/values are scattered to their slots, then each attention group reads what it needs.
Only attention sees per-sequence shapes; every other layer works on the flat (T, hidden) batch.

A bfloat16 cache (`--kv-cache-dtype bfloat16`) stores each row rounded to bfloat16, half the bytes.
With an int8 cache (`--kv-cache-dtype int8`) each slot holds D int8 codes followed by the 4 bytes
of that token's float32 scale for the head (symmetric, per token and head), so one gather brings
codes and scales together and the cache costs (D + 4) bytes per head and token instead of 4 D.
"""

import torch
import torch.nn.functional as F
from torch import nn

from slimserve import kernels
from slimserve.engine.forward_context import get_forward_context


def _encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D) float keys/values -> what a cache of `dtype` stores: themselves (cast), or for
    int8 the codes with each vector's float32 scale appended as 4 bytes, (..., D + 4)."""
    if dtype != torch.int8:
        return x.to(dtype)
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(1e-8) / 127
    codes = torch.round(x / scale).to(torch.int8)
    return torch.cat((codes, scale.view(torch.int8)), dim=-1)


def _decode(stored: torch.Tensor) -> torch.Tensor:
    """(..., D + 4) int8 cache rows -> (..., D) float32."""
    return stored[..., :-4].float() * stored[..., -4:].contiguous().view(torch.float32)


def _as_stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` gives it back. A fresh prompt attends to these rounded values, like
    every later read from the cache, so a prompt computed whole, in chunks, or again after
    preemption gives the same numbers."""
    if dtype == torch.int8:
        return _decode(_encode(x, dtype))
    return x if dtype == x.dtype else x.to(dtype).float()


# Up to this many blocks per head, one index_select over all heads beats a per-head loop (9 vs
# 30 us for one 13-block sequence; 42 vs 51 us for 8 of them; the loop wins from ~500 blocks).
SMALL_GATHER_TILES = 128

# SDPA that also returns the log-sum-exp of each query row, which merging partial attentions needs.
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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
        if kernels.available("write_kv") and k.device.type == "cpu":
            kernels.write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        else:
            k_cache.index_copy_(1, ctx.slot_mapping, _encode(k, k_cache.dtype).transpose(0, 1))
            v_cache.index_copy_(1, ctx.slot_mapping, _encode(v, v_cache.dtype).transpose(0, 1))
        T, H, D = q.shape
        if len(ctx.groups) == 1:
            return self._group(ctx.groups[0], q, k, v).reshape(T, H * D)
        out = q.new_empty(T, H, D)
        for g in ctx.groups:
            out[g.start : g.end] = self._group(g, q, k, v)
        return out.view(T, H * D)

    @staticmethod
    def _read(cache: torch.Tensor, where, length: int, block_size: int) -> torch.Tensor:
        """(B, Hkv, length, D) keys or values: `where` is a slice of slots or (B, nblk) blocks."""
        if cache.dtype == torch.int8:
            return _decode(Attention._gather(cache, where, length, block_size))
        return Attention._gather(cache, where, length, block_size).float()

    @staticmethod
    def _gather(cache: torch.Tensor, where, length: int, block_size: int) -> torch.Tensor:
        if isinstance(where, slice):  # one sequence, consecutive blocks: a view
            return cache[:, where].unsqueeze(0)
        B, nblk = where.shape
        Hkv, _, D = cache.shape
        per_head = cache.view(Hkv, -1, block_size * D)
        if B * nblk <= SMALL_GATHER_TILES:  # one call: per-call overhead dominates small reads
            tiles = per_head.index_select(1, where.view(-1))
        else:
            # One dim-0 select per head copies whole 4 KB tiles: ~2-3x faster than selecting
            # along dim 1 of the (Hkv, blocks, tile) view once there are hundreds of tiles.
            tiles = cache.new_empty(Hkv, B * nblk, block_size * D)
            for h in range(Hkv):
                torch.index_select(per_head[h], 0, where.view(-1), out=tiles[h])
        return tiles.view(Hkv, B, nblk * block_size, D)[:, :, :length].transpose(0, 1)

    def _context(self, g, cache: torch.Tensor) -> torch.Tensor:
        return self._read(cache, g.kv_indices, g.kv_len, g.block_size)

    def _cascade(self, g, qg: torch.Tensor) -> torch.Tensor:
        """Decode attention for sequences that share their first `g.shared_len` tokens' blocks.

        All B * G query rows attend to the shared prefix in one call (its KV is read once, not B
        times); each sequence attends to its own suffix; the two partial softmaxes are merged by
        their log-sum-exps. qg: (B, Hkv, G, D) -> (B, Hkv, G, D)."""
        B, Hkv, G, D = qg.shape
        k_cache, v_cache = self.kv_cache
        ks = self._read(k_cache, g.shared, g.shared_len, g.block_size)  # (1, Hkv, P, D)
        vs = self._read(v_cache, g.shared, g.shared_len, g.block_size)
        q_all = qg.permute(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
        o1, lse1 = _flash(q_all, ks, vs, scale=self.scale)
        o1 = o1.view(Hkv, B, G, D).transpose(0, 1)
        lse1 = lse1.view(Hkv, B, G).transpose(0, 1)
        if g.seq_lens is not None:
            o2, lse2 = self._paged(g, qg, with_lse=True)
        else:
            o2, lse2 = _flash(
                qg,
                self._context(g, k_cache),
                self._context(g, v_cache),
                attn_mask=g.mask,
                scale=self.scale,
            )
        lse = torch.logaddexp(lse1, lse2)
        return o1 * (lse1 - lse).exp_().unsqueeze(-1) + o2 * (lse2 - lse).exp_().unsqueeze(-1)

    def _paged(self, g, qg: torch.Tensor, with_lse: bool = False):
        k_cache, v_cache = self.kv_cache
        return kernels.paged_decode_attention(
            qg, k_cache, v_cache, g.kv_indices, g.seq_lens, g.block_size, self.scale, with_lse
        )

    def _group(self, g, q, k, v) -> torch.Tensor:
        B, Lq, D = g.num_seqs, g.q_len, self.head_dim
        Hkv, G = self.num_kv_heads, self.num_heads // self.num_kv_heads
        if g.seq_lens is not None and g.shared is None:  # decode, read in place (native kernel)
            qg = q[g.start : g.end].view(B, Hkv, G, D)
            return self._paged(g, qg)[0].view(B, self.num_heads, D)
        if g.kv_indices is None:  # fresh prompt: its own new keys, causal
            k_cache, v_cache = self.kv_cache
            kg = _as_stored(k[g.start : g.end], k_cache.dtype).view(B, Lq, Hkv, D).transpose(1, 2)
            vg = _as_stored(v[g.start : g.end], v_cache.dtype).view(B, Lq, Hkv, D).transpose(1, 2)
        elif g.shared is not None:
            kg = vg = None  # read inside _cascade (or by the native kernel)
        else:
            k_cache, v_cache = self.kv_cache
            kg, vg = self._context(g, k_cache), self._context(g, v_cache)
        if Lq == 1:
            # Decode: the G query heads sharing a KV head become G query rows of that head, so
            # each KV head is read once instead of G times. No causal mask is needed.
            qg = q[g.start : g.end].view(B, Hkv, G, D)
            if g.shared is not None:
                return self._cascade(g, qg).reshape(B, self.num_heads, D)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale)
            return o.reshape(B, self.num_heads, D)
        qg = q[g.start : g.end].view(B, Lq, self.num_heads, D).transpose(1, 2)  # (B, H, Lq, D)
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, is_causal=g.causal, scale=self.scale, enable_gqa=True
        )
        return o.transpose(1, 2).reshape(B * Lq, self.num_heads, D)
