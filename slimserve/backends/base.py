"""The attention backend interface: how a step plan becomes attention over the paged cache.

A backend is chosen once, when the engine is built (backends/__init__.py). Per step the runner
asks it for metadata for each layer spec (`build_metadata`), and for the model's forward over the
plan (`run_model`: the modules, or a fused native step where the backend has one); each attention
layer hands it its new keys and values (`write_kv`) and its queries (`forward`). Layers hold their
own cache tensors and spec; a backend holds no per-layer state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the plan's types; the engine imports the backends, not the reverse
    from slimserve.engine.input_batch import StepPlan
    from slimserve.forward_context import ForwardContext
    from slimserve.kv_cache.spec import AttentionSpec


class AttentionBackend(ABC):
    name: str

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
