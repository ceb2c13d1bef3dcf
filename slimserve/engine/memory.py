"""What the process holds: the packed weights' bytes and the resident set; and one memory
budget (`--memory-budget`) over the weights, the expert cache, the KV pool (pinned sessions
included) and the disk tier's buffers, which sizes the KV pool to what the rest leaves."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os

import torch

from slimserve.config import CacheConfig, ModelConfig
from slimserve.errors import InvalidRequest
from slimserve.kv_cache.spec import kv_cache_spec
from slimserve.kv_cache.tiers import BUFFER_BYTES

logger = logging.getLogger("slimserve")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages under the model's parameters and buffers (a tied head and
    embedding count once)."""
    storages = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def expert_cache_bytes(model: torch.nn.Module) -> int:
    store = getattr(model, "expert_store", None)
    return store.num_slots * store.slot_bytes if store is not None else 0


def tier_buffer_bytes(cache: CacheConfig) -> int:
    """RAM the disk tier may hold in pages waiting to be written or taken (kv_cache/tiers.py)."""
    return BUFFER_BYTES if cache.disk_dir and cache.enable_prefix_caching else 0


def fit_cache(
    cache: CacheConfig, budget: int | None, model: torch.nn.Module, model_cfg: ModelConfig
) -> CacheConfig:
    """`cache` with its KV pool cut to what `budget` leaves beside the weights, the expert cache
    and the disk tier's buffers (unchanged when it fits, or without a budget). A budget that
    does not hold the rest and one KV page per group is refused, naming the parts."""
    if budget is None:
        return cache
    fixed = {
        "weights": weight_bytes(model),
        "expert cache": expert_cache_bytes(model),
        "KV disk buffers": tier_buffer_bytes(cache),
    }
    one = kv_cache_spec(model_cfg, dataclasses.replace(cache, memory_bytes=1))
    room = budget - sum(fixed.values()) - one.page_bytes  # the null block's page comes on top
    least = one.page_bytes * len(one.groups)
    if room < least:
        held = ", ".join(f"{k} {mib(v)}" for k, v in fixed.items() if v)
        raise InvalidRequest(
            f"--memory-budget {mib(budget)} does not hold {held} and one KV block "
            f"({mib(least)})", param="memory_budget",
        )  # fmt: skip
    if cache.memory_bytes <= room:
        return cache
    logger.info("KV cache %s (of %s asked): what --memory-budget leaves", mib(room),
                mib(cache.memory_bytes))  # fmt: skip
    return dataclasses.replace(cache, memory_bytes=room)


def resident_bytes(pid: int | str = "self") -> int:
    """A process's resident set (0 where /proc is not there)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def mib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def load_summary(engine) -> str:
    """One line for the start of generate/chat/serve: load time, cache hit, bytes, RSS."""
    m = engine.memory()
    how = " (packed weights mapped from the cache)" if engine.model.from_cache else ""
    weights, kv, rss = (mib(m[k]) for k in ("weights", "kv_cache", "resident"))
    return (
        f"loaded {engine.source.name} in {engine.load_seconds:.2f}s{how}; weights {weights}, "
        f"KV cache {kv} for {engine.capacity_tokens} tokens (resident as used), process "
        f"resident {rss}"
    )
