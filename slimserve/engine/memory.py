"""What the process holds: the packed weights' bytes and the resident set."""

from __future__ import annotations

import itertools
import os

import torch


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages under the model's parameters and buffers (a tied head and
    embedding count once)."""
    storages = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


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
