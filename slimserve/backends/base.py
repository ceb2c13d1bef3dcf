"""The attention backend interface: how a step plan becomes attention over the paged cache.

A backend is chosen once, when the engine is built (backends/__init__.py). Per step the runner
asks it for metadata for each layer spec (`build_metadata`), and for the model's forward over the
plan (`run_model`: the modules, or a fused native step where the backend has one); each attention
layer hands it its new keys and values (`write_kv`) and its queries (`forward`). Layers hold their
own cache tensors and spec; a backend holds no per-layer state.

The backend also decides the cache's layout (`kv_cache_shape`, `layer_cache`) and how one page (a
block of one KV group: its tokens in every layer of the group) is gathered to bytes and
scattered back (`read_page`, `write_page`), which is what a KV tier stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the step vocabulary (core/), below the backends: types only
    from slimserve.core.forward_context import ForwardContext
    from slimserve.core.plan import StepPlan
    from slimserve.kv_cache.spec import AttentionSpec, KVCacheSpec


class AttentionBackend(ABC):
    name: str

    # -- the cache's layout -----------------------------------------------------------------
    @staticmethod
    def kv_cache_shape(spec: KVCacheSpec, num_slots: int) -> tuple[int, ...]:
        """The one tensor every layer's cache is a view of: head-major (Hkv, slots, row) per
        K/V and member of a KV group. The j-th layer of every group reads tensor j at the slots
        of its group's blocks, so a block holds its tokens for every layer of one group, and
        each head's block is a contiguous (block_size, row) tile (what the CPU paths gather)."""
        return (spec.group_size, 2, spec.num_kv_heads, num_slots, spec.format.width)

    @staticmethod
    def layer_cache(kv_cache: torch.Tensor, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (key, value) cache of the `member`-th layer of each KV group."""
        return kv_cache[member, 0], kv_cache[member, 1]

    @staticmethod
    def read_page(kv_cache: torch.Tensor, block_id: int, block_size: int) -> bytes:
        """A copy of block `block_id`'s page, as bytes."""
        page = kv_cache[:, :, :, block_id * block_size : (block_id + 1) * block_size]
        return page.contiguous().view(torch.uint8).numpy().tobytes()

    @staticmethod
    def write_page(kv_cache: torch.Tensor, block_id: int, block_size: int, data: bytes) -> None:
        """Block `block_id`'s page from what `read_page` gave."""
        page = kv_cache[:, :, :, block_id * block_size : (block_id + 1) * block_size]
        if isinstance(data, bytes) or memoryview(data).readonly:
            data = bytearray(data)  # torch.frombuffer wants a writable buffer
        src = torch.frombuffer(data, dtype=torch.uint8)
        page.copy_(src.view(kv_cache.dtype).view(page.shape))

    @abstractmethod
    def build_metadata(self, plan: StepPlan, spec: AttentionSpec):
        """What `forward` needs to attend every row of `plan` for layers of `spec`."""

    @abstractmethod
    def write_kv(self, layer, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor):
        """Store new keys/values (T, Hkv, D) at their slots of `layer.kv_cache`."""

    @abstractmethod
    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata):
        """q: (T, H, D), k/v: (T, Hkv, D), already written -> (T, H * D)."""

    def bind(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int, built=None):
        """Called once the model's layers hold their caches: a backend may prepare here.
        `built` is what a backend of the same runner prepared before (to reuse)."""
        return None

    def run_model(self, model: torch.nn.Module, plan: StepPlan, ctx: ForwardContext):
        """The model's final hidden states (T, hidden) for the plan's rows, inside `ctx`."""
        return model(plan.input_ids, plan.positions)
