"""Attention with the native CPU kernels (slimserve/kernels): decode rows read the paged cache
in place, keys and values are written by one kernel call, and a step whose rows all decode (or
verify drafts) runs every layer in one native call (backends/native_step.py).

Every decode row, a verify row as much as a plain decode, is one query of the paged kernel with
its own block-table row and length: the k + 1 rows of a verify share their request's table and
attend to ctx + 1 ... ctx + k + 1 tokens. All rows' keys are written before any row reads, so a
row sees the drafts before it. Prompt chunks keep the PyTorch path (SDPA is faster for them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimserve import kernels
from slimserve.backends.native_step import NativeDecodeStep
from slimserve.backends.torch_sdpa import AttentionGroup, TorchSDPABackend, _blocks, _rows_of
from slimserve.kv_cache.block_pool import NULL_BLOCK

if TYPE_CHECKING:  # the plan's types; the engine imports the backends, not the reverse
    from slimserve.engine.input_batch import Span, StepPlan
    from slimserve.forward_context import ForwardContext


class NativeCPUBackend(TorchSDPABackend):
    name = "native-cpu"

    def __init__(self, fused_step: bool = True):
        self.fused_step = fused_step
        self.step: NativeDecodeStep | None = None

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
            qg, k_cache, v_cache, g.kv_indices, g.seq_lens, g.block_size, layer.scale, with_lse
        )

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
