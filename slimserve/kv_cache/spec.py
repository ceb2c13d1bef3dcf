"""What the KV cache holds, derived once from the model and cache configs by the engine.

The scheduler's manager needs only the block geometry; the runner allocates tensors from the
row format; each attention layer reads its own `AttentionSpec`, so layers of one model may
differ (full attention now; a sliding window or attention sinks are new kinds of spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.config import CacheConfig, ModelConfig


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """How one layer attends: "full" over every earlier token, or "sliding" over the last
    `window` tokens (the query's own included), as Gemma's and Mistral's window layers do."""

    kind: str = "full"
    window: int = 0

    def first_visible(self, position: int) -> int:
        """The earliest position a query at `position` attends to."""
        return max(0, position + 1 - self.window) if self.window else 0


FULL = AttentionSpec()


def layer_specs(cfg: ModelConfig) -> tuple[AttentionSpec, ...]:
    window = AttentionSpec("sliding", cfg.sliding_window) if cfg.sliding_window else FULL
    return tuple(window if cfg.is_window_layer(i) else FULL for i in range(cfg.num_layers))


@dataclass(frozen=True, slots=True)
class KVFormat:
    """One head's key (or value) row for one token: `width` elements of `dtype`. An int8 row
    carries its float32 scale in 4 extra bytes (backends/kv_format.py)."""

    name: str  # "float32" | "bfloat16" | "int8"
    width: int
    dtype: torch.dtype

    @classmethod
    def of(cls, name: str, head_dim: int) -> KVFormat:
        if name == "int8":
            return cls(name, head_dim + 4, torch.int8)
        return cls(name, head_dim, torch.bfloat16 if name == "bfloat16" else torch.float32)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The whole cache: one spec per layer, the row format, and the block geometry.

    Block 0 of the tensors is the null block: never handed out, it pads block tables and stands
    for entries that are not there; `num_blocks` counts the usable ones (1..num_blocks)."""

    layers: tuple[AttentionSpec, ...]
    num_kv_heads: int
    format: KVFormat
    block_size: int
    num_blocks: int

    @property
    def bytes_per_token(self) -> int:
        return (
            len(self.layers)
            * 2
            * self.num_kv_heads
            * self.format.width
            * self.format.dtype.itemsize
        )

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> int:
    fmt = KVFormat.of(dtype, cfg.head_dim)
    return cfg.num_layers * 2 * cfg.num_kv_heads * fmt.width * fmt.dtype.itemsize


def kv_cache_spec(model_cfg: ModelConfig, cache: CacheConfig) -> KVCacheSpec:
    """The cache `cache`'s memory budget holds for `model_cfg` (at least one block)."""
    per_block = kv_bytes_per_token(model_cfg, cache.dtype) * cache.block_size
    return KVCacheSpec(
        layers=layer_specs(model_cfg),
        num_kv_heads=model_cfg.num_kv_heads,
        format=KVFormat.of(cache.dtype, model_cfg.head_dim),
        block_size=cache.block_size,
        num_blocks=max(1, cache.memory_bytes // per_block),
    )
