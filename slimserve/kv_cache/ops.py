"""KV page movements the scheduler asks for and the runner carries out around a forward.

The scheduler (through the KV manager) is the only one that decides which block holds what; the
runner is the only one that touches the cache tensors. An operation names a block and a hash:
  load  write `payload` (a page read from a tier) into block `block_id` before the forward;
  save  gather block `block_id`'s page after the step that filled it, for the tier to store;
  copy  write block `src`'s page into block `block_id` before the forward (a preempted
        request's partial last block, taken back into a block of its own).
Saves are carried out at the end of the step that published their blocks, and loads before the
forward of the step that admitted them, so no block is overwritten before its save is gathered
and a finished request's blocks can be freed at once (no deferred free is needed in-process).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVOp:
    kind: str  # "load" | "save" | "copy"
    block_id: int
    block_hash: bytes  # the block's group hash (kv_cache/manager.py)
    key: tuple  # (parent hash, token ids): what verifies the page
    payload: bytes | None = None  # a load's page
    src: int = 0  # a copy's source block

    @property
    def is_load(self) -> bool:
        return self.kind == "load"
