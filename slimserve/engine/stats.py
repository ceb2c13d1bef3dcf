"""What the engine reports after each step: a frozen snapshot for /metrics and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for /metrics and the benchmarks; token counts are cumulative."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, served from cache
    preemptions: int
    steps: int
    last_batch_size: int
    last_batch_tokens: int
    tokens_computed: int  # every token the model ran (prompt chunks and decodes)
    prompt_tokens_computed: int  # of those, prompt tokens (the rest came from the prefix cache)
    spec_draft_tokens: int = 0  # draft tokens verified
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_verifies: int = 0  # request-steps that verified at least one draft
    preemptions_swap: int = 0  # of `preemptions`, those whose published blocks a tier kept
    recomputed_tokens: int = 0  # tokens run again whose KV a request had computed before
    tier_hits: int = 0  # prompt tokens of prefix hits whose KV was loaded from the disk tier
    tier_loads: int = 0  # pages loaded from the disk tier
    tier_saves: int = 0  # pages handed to the disk tier
    tier_corrupt: int = 0  # disk records that failed verification (recomputed instead)
    tier_bytes: int = 0  # bytes the disk tier holds
    kv_ram_bytes: int = 0  # bytes of the RAM pool's blocks in use or cached
    sessions: int = 0  # agent sessions whose blocks are kept (--session-ttl)
    session_pinned_blocks: int = 0  # block references they hold
    sessions_expired: int = 0  # sessions released when their time to live ran out
    sessions_pressed: int = 0  # sessions released early because the pool was short
