"""What the KV cache holds, derived once from the model and cache configs by the engine.

The scheduler's manager needs only the block geometry; the runner allocates tensors from the
row format; each attention layer reads its own `AttentionSpec`, so layers of one model may
differ (full attention now; a sliding window or attention sinks are new kinds of spec).
"""

from __future__ import annotations

import math
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

    Layers are split into KV groups of `group_size` layers of one spec each (`groups`: the layer
    indices of each, full-attention groups first). Each group has its own block table per
    request, and one block (a page) holds `block_size` tokens of every layer of a group, so
    pages of all groups are the same size and come from one pool: a window group gives back the
    pages that fall out of its window while a full group keeps its own. A model whose layers all
    attend alike has one group of every layer, one table per request.

    Block 0 of the tensors is the null block: never handed out, it pads block tables and stands
    for entries that are not there; `num_blocks` counts the usable ones (1..num_blocks)."""

    layers: tuple[AttentionSpec, ...]
    num_kv_heads: int
    format: KVFormat
    block_size: int
    num_blocks: int
    groups: tuple[tuple[int, ...], ...] = ()

    @property
    def group_specs(self) -> tuple[AttentionSpec, ...]:
        return tuple(self.layers[g[0]] for g in self.groups)

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token holds in every layer."""
        return len(self.layers) * self.row_pair_bytes

    @property
    def row_pair_bytes(self) -> int:
        """One token's key and value rows in one layer."""
        return 2 * self.num_kv_heads * self.format.width * self.format.dtype.itemsize

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds when every group keeps every token (short contexts)."""
        return self.num_blocks // len(self.groups) * self.block_size

    @property
    def page_bytes(self) -> int:
        """One block of one group: `block_size` tokens of each of its layers."""
        return self.block_size * self.group_size * self.row_pair_bytes

    def pages_held(self, num_tokens: int, chunk: int = 1) -> int:
        """Pages one sequence of `num_tokens` holds at most while `chunk` tokens run a step: all
        of its blocks in a full group, the window's and the chunk's in a window group."""
        bs = self.block_size
        blocks = -(-num_tokens // bs)
        return sum(
            min(blocks, (s.window + chunk - 2) // bs + 2) if s.window else blocks
            for s in self.group_specs
        )


def kv_groups(layers: tuple[AttentionSpec, ...]) -> tuple[tuple[int, ...], ...]:
    """Layers grouped by spec into groups of one size (the gcd of the specs' layer counts)."""
    by_spec: dict[AttentionSpec, list[int]] = {}
    for i, s in enumerate(layers):
        by_spec.setdefault(s, []).append(i)
    size = math.gcd(*(len(v) for v in by_spec.values()))
    ordered = sorted(by_spec.items(), key=lambda kv: kv[0].window)  # full (window 0) first
    return tuple(tuple(idx[k : k + size]) for _, idx in ordered for k in range(0, len(idx), size))


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> int:
    fmt = KVFormat.of(dtype, cfg.head_dim)
    return cfg.num_layers * 2 * cfg.num_kv_heads * fmt.width * fmt.dtype.itemsize


def kv_cache_spec(model_cfg: ModelConfig, cache: CacheConfig) -> KVCacheSpec:
    """The cache `cache`'s memory budget holds for `model_cfg` (at least one page)."""
    layers = layer_specs(model_cfg)
    groups = kv_groups(layers)
    per_page = kv_bytes_per_token(model_cfg, cache.dtype) // len(groups) * cache.block_size
    return KVCacheSpec(
        layers=layers,
        num_kv_heads=model_cfg.num_kv_heads,
        format=KVFormat.of(cache.dtype, model_cfg.head_dim),
        block_size=cache.block_size,
        num_blocks=max(1, cache.memory_bytes // per_page),
        groups=groups,
    )
