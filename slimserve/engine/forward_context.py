"""Per-step attention metadata, set by the model runner and read only by attention and the LM head.

Models take tensors only (`forward(input_ids, positions)`); everything about how the flat token
batch maps onto sequences and KV-cache slots lives here for the duration of one step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionGroup:
    """A contiguous run [start, end) of the flat batch viewed as (num_seqs, q_len) queries.

    kv_indices: (num_seqs, num_blocks) block ids holding each sequence's first kv_len tokens
    (padded); a slice of cache slots when num_seqs is 1 and its blocks are consecutive; None when
    the group is a single fresh prompt with no earlier context (it attends to its own new keys,
    causally).
    mask: (num_seqs, 1, q_len, kv_len) bool, True = attend; None when every key is visible
    (or, with `causal`, when plain causal masking is exact).
    shared: for a decode group whose sequences share their first shared_len tokens' blocks, where
    those blocks are (as kv_indices for one sequence); kv_indices, kv_len and mask then describe
    only each sequence's suffix, and the mask is additive float (0 / -inf).
    seq_lens: (num_seqs,) int64 tokens each sequence attends to, set for decode groups that the
    native paged kernel reads in place (slimserve/kernels); kv_indices is then always the
    (num_seqs, num_blocks) table and no mask is built.
    """

    start: int
    end: int
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


@dataclass(slots=True)
class ForwardContext:
    slot_mapping: torch.Tensor  # (T,) flat KV slot each new token writes to
    groups: list[AttentionGroup]
    logits_indices: torch.Tensor  # (S,) rows of the flat batch whose next token is sampled


_current: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext):
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("model called outside a forward_context (the model runner sets it)")
    return _current
