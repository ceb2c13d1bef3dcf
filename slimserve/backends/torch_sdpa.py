"""Attention with PyTorch ops: gather a sequence's blocks, then SDPA (any device, any CPU).

One layer's cache is a pair of head-major tensors (Hkv, (num_blocks + 1) * block_size, row):
slot `block_id * block_size + offset` holds one token. Head-major keeps each head's block a
contiguous (block_size, row) tile, so gathering a sequence's blocks copies 4 KB rows, and the
gathered (B, Hkv, L, D) tensor has contiguous (L, D) matrices, the layout CPU SDPA is fastest on.

The plan's rows become attention groups: single-row decodes batched into one call (or, when
they share cached prefix blocks, a cascade: the prefix attended once for all of them, merged
with each suffix by log-sum-exp), and every other span (a prompt chunk, a verify of drafts) as
one causal block over its context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from slimserve.backends import kv_format
from slimserve.backends.base import AttentionBackend
from slimserve.kv_cache.block_pool import NULL_BLOCK

if TYPE_CHECKING:  # the step vocabulary (core/), below the backends: types only
    from slimserve.core.plan import Span, StepPlan
    from slimserve.kv_cache.spec import AttentionSpec

# Cascade decode attention pays off once the shared prefix spans a few blocks.
CASCADE_MIN_BLOCKS = 4

# Up to this many blocks per head, one index_select over all heads beats a per-head loop (see
# `slimserve bench kernels`; the loop wins from several hundred blocks).
SMALL_GATHER_TILES = 128

# SDPA that also returns the log-sum-exp of each query row, which merging partial attentions needs.
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(slots=True)
class AttentionGroup:
    """Rows `rows` of the flat batch viewed as (num_seqs, q_len) queries.

    kv_indices: (num_seqs, num_blocks) block ids holding each sequence's first kv_len tokens
    (padded with the null block); a slice of cache slots when num_seqs is 1 and its blocks are
    consecutive; None when the group is a single fresh prompt with no earlier context (it
    attends to its own new keys, causally).
    mask: (num_seqs, 1, q_len, kv_len) bool, True = attend; None when every key is visible
    (or, with `causal`, when plain causal masking is exact).
    shared: for a decode group whose sequences share their first shared_len tokens' blocks, where
    those blocks are (as kv_indices for one sequence); kv_indices, kv_len and mask then describe
    only each sequence's suffix, and the mask is additive float (0 / -inf).
    seq_lens: (num_seqs,) int64 tokens each row attends to, for decode groups that the native
    paged kernel reads in place (backends/native_cpu.py); kv_indices is then always the
    (num_seqs, num_blocks) table and no mask is built; with seq_begins, row i reads keys from
    seq_begins[i] on (a sliding window).
    """

    rows: slice | torch.Tensor
    num_seqs: int
    q_len: int
    kv_indices: torch.Tensor | slice | None
    mask: torch.Tensor | None
    causal: bool
    kv_len: int = 0
    block_size: int = 0
    shared: torch.Tensor | slice | None = None
    shared_len: int = 0
    seq_lens: torch.Tensor | None = None
    seq_begins: torch.Tensor | None = None  # (num_seqs,) each row's first key (a window's)


def _common_prefix(tables: list[list[int]]) -> int:
    """How many leading block ids every table has in common (shared through the prefix cache)."""
    n = min(len(t) for t in tables)
    first = tables[0]
    for i in range(n):
        b = first[i]
        if any(t[i] != b for t in tables):
            return i
    return n


def _rows_of(spans: list[Span]) -> slice | torch.Tensor:
    rows = [r for s in spans for r in s.rows]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long)


def _blocks(tables: list[list[int]], length: int, block_size: int) -> torch.Tensor | slice:
    """(B, nblk) block ids covering positions 0..length-1 of each table (null-padded).

    One table of consecutive blocks gives a slice of slots instead: attention then reads a
    view of the cache rather than gathering a copy (the common case for a lone request)."""
    nblk = -(-length // block_size)
    head = tables[0][:nblk]
    if len(tables) == 1 and head == list(range(head[0], head[0] + nblk)):
        return slice(head[0] * block_size, head[0] * block_size + length)
    rows = [t[:nblk] + [NULL_BLOCK] * (nblk - len(t[:nblk])) for t in tables]
    return torch.tensor(rows, dtype=torch.long)


class TorchSDPABackend(AttentionBackend):
    name = "torch-sdpa"

    # -- metadata ----------------------------------------------------------------------------
    def build_metadata(self, plan: StepPlan, spec: AttentionSpec) -> list[AttentionGroup]:
        if spec.window:
            return self._window_groups(plan, spec.window)
        bs = plan.block_size
        batched = [s for s in plan.spans if self._batched(s)]
        groups = [self._decode_group(run, common, bs) for run, common in self._runs(batched, bs)]
        groups += [self._chunk_group(s, bs) for s in plan.spans if not self._batched(s)]
        return groups

    def _batched(self, span: Span) -> bool:
        """Whether a span's rows join a batched decode group (else it is a causal block)."""
        return span.decode and span.num_rows == 1

    def _runs(self, spans: list[Span], bs: int) -> list[tuple[list[Span], int]]:
        """Runs of decode spans, each with the number of leading blocks all of them share (0 for
        the last run, which holds every span that shares too little). Only single-row spans
        cascade."""
        by_first: dict[int, list[Span]] = {}
        rest = []
        for s in spans:
            (by_first.setdefault(s.table[0], []) if s.num_rows == 1 else rest).append(s)
        runs = []
        for run in by_first.values():
            newest = min(s.start for s in run)  # shared blocks end before it
            common = min(_common_prefix([s.table for s in run]), newest // bs)
            if len(run) > 1 and common >= CASCADE_MIN_BLOCKS:
                runs.append((run, common))
            else:
                rest += run
        return runs + ([(rest, 0)] if rest else [])

    def _decode_group(self, spans: list[Span], common: int, bs: int) -> AttentionGroup:
        """One-token queries of `spans`; with `common` shared leading blocks, a cascade group
        (prefix attended once, then each suffix), else plain batched attention."""
        shared_len = common * bs  # < every length: the newest token's block is private
        lens = [s.start + 1 - shared_len for s in spans]
        L = max(lens)
        shared = _blocks([spans[0].table[:common]], shared_len, bs) if common else None
        mask = None
        if min(lens) != L:
            visible = (torch.arange(L).unsqueeze(0) < torch.tensor(lens).unsqueeze(1))[
                :, None, None
            ]
            # The cascade path calls the LSE-returning kernel, which takes an additive mask.
            mask = (
                torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
                if common
                else visible
            )
        blocks = _blocks([s.table[common:] for s in spans], L, bs)
        return AttentionGroup(
            _rows_of(spans), len(spans), 1, blocks, mask, causal=False, kv_len=L,
            block_size=bs, shared=shared, shared_len=shared_len,
        )  # fmt: skip

    def _chunk_group(self, s: Span, bs: int) -> AttentionGroup:
        rows = slice(s.first_row, s.first_row + s.num_rows)
        if s.start == 0:  # a fresh prompt attends to its own new keys, plain causal
            return AttentionGroup(rows, 1, s.num_rows, None, None, causal=True)
        L = s.start + s.num_rows
        q_pos = torch.arange(s.start, L).unsqueeze(1)
        mask = (torch.arange(L).unsqueeze(0) <= q_pos)[None, None]  # (1, 1, n, L)
        return AttentionGroup(
            rows, 1, s.num_rows, _blocks([s.table], L, bs), mask, causal=False, kv_len=L,
            block_size=bs,
        )  # fmt: skip

    # -- sliding-window layers ------------------------------------------------------------
    def _window_groups(self, plan: StepPlan, window: int) -> list[AttentionGroup]:
        """Groups for layers that see only the last `window` tokens: single-row decodes batched
        into one call, every other span a block of its own; each reads its blocks from the
        first one any of its rows sees, and a mask cuts what lies outside each row's window.
        No cascade: a shared prefix soon falls out of the window."""
        bs = plan.block_size
        single = [s for s in plan.spans if s.decode and s.num_rows == 1]
        groups = [self._window_decodes(single, window, bs)] if single else []
        return groups + [
            self._window_chunk(s, window, bs)
            for s in plan.spans
            if not (s.decode and s.num_rows == 1)
        ]

    @staticmethod
    def _window_decodes(spans: list[Span], window: int, bs: int) -> AttentionGroup:
        ends = torch.tensor([s.start + 1 for s in spans]).unsqueeze(1)  # (B, 1) keys seen
        first = max(0, int(ends.min()) - window) // bs  # the earliest block any row sees
        L = int(ends.max()) - first * bs
        keys = torch.arange(first * bs, first * bs + L).unsqueeze(0)
        visible = (keys < ends) & (keys >= ends - window)
        mask = None if bool(visible.all()) else visible[:, None, None]
        blocks = _blocks([s.table[first:] for s in spans], L, bs)
        return AttentionGroup(
            _rows_of(spans), len(spans), 1, blocks, mask, causal=False, kv_len=L, block_size=bs
        )

    @staticmethod
    def _window_chunk(s: Span, window: int, bs: int) -> AttentionGroup:
        rows = slice(s.first_row, s.first_row + s.num_rows)
        end = s.start + s.num_rows
        if s.start == 0 and end <= window:  # no row's window is cut: plain causal
            return AttentionGroup(rows, 1, s.num_rows, None, None, causal=True)
        first = max(0, s.start + 1 - window) // bs
        queries = torch.arange(s.start, end).unsqueeze(1)
        keys = torch.arange(first * bs, end).unsqueeze(0)
        mask = ((keys <= queries) & (keys > queries - window))[None, None]
        if s.start == 0:  # a fresh prompt: its own new keys
            return AttentionGroup(rows, 1, s.num_rows, None, mask, causal=False)
        return AttentionGroup(
            rows, 1, s.num_rows, _blocks([s.table[first:]], end - first * bs, bs), mask,
            causal=False, kv_len=end - first * bs, block_size=bs,
        )  # fmt: skip

    # -- the layer's work --------------------------------------------------------------------
    def write_kv(self, layer, k, v, slot_mapping):
        k_cache, v_cache = layer.kv_cache
        k_cache.index_copy_(1, slot_mapping, kv_format.encode(k, k_cache.dtype).transpose(0, 1))
        v_cache.index_copy_(1, slot_mapping, kv_format.encode(v, v_cache.dtype).transpose(0, 1))

    def forward(self, layer, q, k, v, groups: list[AttentionGroup]):
        T, H, D = q.shape
        if len(groups) == 1:  # it covers every row, in order
            return self._group(layer, groups[0], q, k, v).reshape(T, H * D)
        out = q.new_empty(T, H, D)
        for g in groups:
            out[g.rows] = self._group(layer, g, q, k, v)
        return out.view(T, H * D)

    @staticmethod
    def _read(cache: torch.Tensor, where, length: int, block_size: int) -> torch.Tensor:
        """(B, Hkv, length, D) keys or values: `where` is a slice of slots or (B, nblk) blocks."""
        if cache.dtype == torch.int8:
            return kv_format.decode(TorchSDPABackend._gather(cache, where, length, block_size))
        return TorchSDPABackend._gather(cache, where, length, block_size).float()

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

    def _suffix(self, layer, g: AttentionGroup, qg: torch.Tensor):
        """(out, lse) of decode queries qg (B, Hkv, G, D) over each sequence's own blocks."""
        k_cache, v_cache = layer.kv_cache
        return _flash(
            qg,
            self._read(k_cache, g.kv_indices, g.kv_len, g.block_size),
            self._read(v_cache, g.kv_indices, g.kv_len, g.block_size),
            attn_mask=g.mask,
            scale=layer.scale,
        )

    def _cascade(self, layer, g: AttentionGroup, qg: torch.Tensor) -> torch.Tensor:
        """Decode attention for sequences that share their first `g.shared_len` tokens' blocks.

        All B * G query rows attend to the shared prefix in one call (its KV is read once, not B
        times); each sequence attends to its own suffix; the two partial softmaxes are merged by
        their log-sum-exps. qg: (B, Hkv, G, D) -> (B, Hkv, G, D)."""
        B, Hkv, G, D = qg.shape
        k_cache, v_cache = layer.kv_cache
        ks = self._read(k_cache, g.shared, g.shared_len, g.block_size)  # (1, Hkv, P, D)
        vs = self._read(v_cache, g.shared, g.shared_len, g.block_size)
        q_all = qg.permute(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
        o1, lse1 = _flash(q_all, ks, vs, scale=layer.scale)
        o1 = o1.view(Hkv, B, G, D).transpose(0, 1)
        lse1 = lse1.view(Hkv, B, G).transpose(0, 1)
        o2, lse2 = self._suffix(layer, g, qg)
        lse = torch.logaddexp(lse1, lse2)
        return o1 * (lse1 - lse).exp_().unsqueeze(-1) + o2 * (lse2 - lse).exp_().unsqueeze(-1)

    def _group(self, layer, g: AttentionGroup, q, k, v) -> torch.Tensor:
        B, Lq, D = g.num_seqs, g.q_len, layer.head_dim
        H, Hkv = layer.num_heads, layer.num_kv_heads
        k_cache, v_cache = layer.kv_cache
        if Lq == 1:
            # Decode: the G query heads sharing a KV head become G query rows of that head, so
            # each KV head is read once instead of G times. No causal mask is needed.
            qg = q[g.rows].view(B, Hkv, H // Hkv, D)
            if g.shared is not None:
                return self._cascade(layer, g, qg).reshape(B, H, D)
            kg = self._read(k_cache, g.kv_indices, g.kv_len, g.block_size)
            vg = self._read(v_cache, g.kv_indices, g.kv_len, g.block_size)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=layer.scale)
            return o.reshape(B, H, D)
        if g.kv_indices is None:  # fresh prompt: its own new keys, causal
            kg = kv_format.as_stored(k[g.rows], k_cache.dtype).view(B, Lq, Hkv, D).transpose(1, 2)
            vg = kv_format.as_stored(v[g.rows], v_cache.dtype).view(B, Lq, Hkv, D).transpose(1, 2)
        else:
            kg = self._read(k_cache, g.kv_indices, g.kv_len, g.block_size)
            vg = self._read(v_cache, g.kv_indices, g.kv_len, g.block_size)
        qg = q[g.rows].view(B, Lq, H, D).transpose(1, 2)  # (B, H, Lq, D)
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, is_causal=g.causal, scale=layer.scale, enable_gqa=True
        )
        return o.transpose(1, 2).reshape(B * Lq, H, D)
