"""Attention with the native CPU kernels (slimserve/kernels): every row reads the paged cache
in place, keys and values are written by one kernel call, and a step runs every layer in one
native call where the model's shape allows (backends/native_step.py).

Every row of a step, a decode, a verify of drafts or a row of a prompt chunk, is one query of the
paged kernel with its own block-table row and length: row i of a span attends to start + i + 1
tokens. All rows' keys are written before any row reads, so a row sees the rows before it.

This makes a row's arithmetic independent of everything but its own tokens: the kernel walks a
row's keys in the same chunks of 32 and partitions of 256 whatever else runs, so a greedy request
gives the same tokens alone or batched, prompt whole or chunked, computed or read from the prefix
cache, prefilled or decoded (a preempted request's recompute, a later turn reading an earlier
answer's blocks). PyTorch SDPA, which the prompt chunks used before, blocks its work by the
chunk's query and key counts, so the same row came out a few ulps apart from one chunking to
another, and greedy outputs flipped where two tokens were close (docs/architecture.md). For the
same reason this backend does no cascade over shared prefixes. `per_row=False` keeps the earlier
split (SDPA chunks, cascade decodes) for A/B measurement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimserve import kernels
from slimserve.backends.native_step import NativeDecodeStep
from slimserve.backends.torch_sdpa import AttentionGroup, TorchSDPABackend, _blocks, _rows_of
from slimserve.kv_cache.block_pool import NULL_BLOCK

if TYPE_CHECKING:  # the step vocabulary (core/), below the backends: types only
    from slimserve.core.forward_context import ForwardContext
    from slimserve.core.plan import Span, StepPlan


class NativeCPUBackend(TorchSDPABackend):
    name = "native-cpu"

    def __init__(self, fused_step: bool = True, per_row: bool = True):
        self.fused_step = fused_step
        self.per_row = per_row
        self.step: NativeDecodeStep | None = None

    def build_metadata(self, plan: StepPlan, spec):
        """One group: every row of the plan, a prompt chunk's as much as a decode's, as its own
        query over its request's blocks (see the module's docstring for why)."""
        if not self.per_row:
            if spec.window:  # window layers attend through SDPA, masked (TorchSDPABackend)
                return self._window_groups(plan, spec.window)
            return super().build_metadata(plan, spec)
        bs, spans = plan.block_size, plan.spans
        nblk = max(-(-(s.start + s.num_rows) // bs) for s in spans)
        table = torch.full((len(spans), nblk), NULL_BLOCK, dtype=torch.long)
        for i, s in enumerate(spans):
            used = s.table[: -(-(s.start + s.num_rows) // bs)]
            table[i, : len(used)] = torch.tensor(used, dtype=torch.long)
        counts = torch.tensor([s.num_rows for s in spans], dtype=torch.long)
        table = table.repeat_interleave(counts, dim=0) if len(spans) < plan.num_rows else table
        lens = plan.positions + 1
        # A window layer's row reads its last `window` keys; the blocks before are not read
        # (a window group gives them back: their entries are the null block).
        begins = (lens - spec.window).clamp_(min=0) if spec.window else None
        return [
            AttentionGroup(
                slice(0, plan.num_rows), plan.num_rows, 1, table, None, causal=False,
                kv_len=nblk * bs, block_size=bs, seq_lens=lens, seq_begins=begins,
            )
        ]  # fmt: skip

    def bind(self, model, kv_cache, block_size, built=None):
        if self.fused_step:
            self.step = built or NativeDecodeStep.build(model, kv_cache, block_size)
        return self.step

    def _batched(self, span: Span) -> bool:
        return span.decode

    def _decode_group(self, spans: list[Span], common: int, bs: int) -> AttentionGroup:
        """Every row of `spans` as its own query over its request's blocks past the `common`
        shared ones (a cascade suffix when common > 0)."""
        shared_len = common * bs
        lens = [s.start + i + 1 - shared_len for s in spans for i in range(s.num_rows)]
        nblk = -(-max(lens) // bs)
        table = []
        for s in spans:
            row = s.table[common : common + nblk]
            table += [row + [NULL_BLOCK] * (nblk - len(row))] * s.num_rows
        shared = _blocks([spans[0].table[:common]], shared_len, bs) if common else None
        return AttentionGroup(
            _rows_of(spans), len(lens), 1, torch.tensor(table, dtype=torch.long), None,
            causal=False, kv_len=max(lens), block_size=bs, shared=shared, shared_len=shared_len,
            seq_lens=torch.tensor(lens, dtype=torch.long),
        )  # fmt: skip

    def write_kv(self, layer, k, v, slot_mapping):
        k_cache, v_cache = layer.kv_cache
        kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def _paged(self, layer, g: AttentionGroup, qg: torch.Tensor, with_lse: bool = False):
        k_cache, v_cache = layer.kv_cache
        return kernels.paged_decode_attention(
            qg, k_cache, v_cache, g.kv_indices, g.seq_lens, g.block_size, layer.scale, with_lse,
            g.seq_begins,
        )  # fmt: skip

    def _suffix(self, layer, g, qg):
        return self._paged(layer, g, qg, with_lse=True)

    def _group(self, layer, g, q, k, v):
        if g.seq_lens is not None and g.shared is None:  # decode rows, read in place
            B, D, H, Hkv = g.num_seqs, layer.head_dim, layer.num_heads, layer.num_kv_heads
            qg = q[g.rows].view(B, Hkv, H // Hkv, D)
            return self._paged(layer, g, qg)[0].view(B, H, D)
        return super()._group(layer, g, q, k, v)

    def run_model(self, model, plan: StepPlan, ctx: ForwardContext):
        if self.step is not None and len(ctx.metadata) == 1:
            (groups,) = ctx.metadata.values()
            if NativeDecodeStep.takes(groups):
                return self.step(plan.input_ids, plan.positions, ctx.slot_mapping, groups[0])
        return model(plan.input_ids, plan.positions)
