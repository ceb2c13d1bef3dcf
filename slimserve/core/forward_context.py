"""Per-step attention metadata, set by the model runner and read only by attention layers.

Models take tensors only (`forward(input_ids, positions)`); how the flat batch of query rows maps
onto sequences and KV-cache slots lives here for one step. `metadata` holds what the attention
backend built for each KV group (kv_cache/spec.py), so layers that attend differently (a sliding
window beside full attention) or read other block tables each find their own.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class ForwardContext:
    slot_mapping: torch.Tensor  # (T,) flat KV slot each new token writes to (KV group 0)
    metadata: dict = field(default_factory=dict)  # KV group -> the backend's metadata
    group_slots: tuple[torch.Tensor, ...] = ()  # the slots in KV groups 1, 2, ...

    def slots(self, group: int) -> torch.Tensor:
        return self.slot_mapping if group == 0 else self.group_slots[group - 1]


# Per thread: two engines on two threads each see their own step.
_local = threading.local()


@contextmanager
def forward_context(ctx: ForwardContext):
    if getattr(_local, "ctx", None) is not None:
        raise RuntimeError("forward_context is not reentrant: one step at a time")
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = None


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("model called outside a forward_context (the model runner sets it)")
    return ctx
