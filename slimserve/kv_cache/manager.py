"""Which KV blocks each request holds, and the prefix cache over them.

The scheduler talks to this, never to the pool. Full blocks are identified by a chained hash
(kv_cache/hashing.py): a digest of the parent block's hash and this block's token ids, rooted in a
salt for whatever else shapes the KV (model file, KV dtype, block size, quantization), the same in
every process. A hit is verified against the stored (parent hash, tokens) key, then shared by
reference. Blocks freed by a finished request stay cached until the pool reuses them (LRU).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimserve.kv_cache.block_pool import Block, BlockPool
from slimserve.kv_cache.hashing import hash_block, kv_salt


@dataclass(slots=True)
class PrefixHit:
    """What a prefix-cache lookup found: blocks to share, and the tokens they cover."""

    blocks: list[Block]
    num_tokens: int


@dataclass(slots=True)
class CacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        salt: bytes | None = None,
    ):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}  # chained hashes of its full blocks
        self.root = salt if salt is not None else kv_salt(block_size)
        self.stats = CacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def _key(parent: bytes, tokens: list[int]) -> tuple[bytes, tuple[int, ...]]:
        return parent, tuple(tokens)

    def find_prefix(self, token_ids: list[int]) -> PrefixHit:
        """The longest run of cached full blocks at the start of `token_ids`.

        The last token is never covered: it must be recomputed to produce the next logits."""
        hit = PrefixHit([], 0)
        if not self.enable_prefix_caching:
            return hit
        bs, parent = self.block_size, self.root
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            block = self.pool.lookup(hash_block(parent, tokens))
            if block is None or block.key != self._key(parent, tokens):
                break
            hit.blocks.append(block)
            parent = block.block_hash
        hit.num_tokens = len(hit.blocks) * bs
        return hit

    def allocate_slots(
        self, request_id: str, num_tokens: int, hit: PrefixHit | None = None
    ) -> bool:
        """Hold blocks for `num_tokens` tokens in total, sharing `hit` (for a new request).

        False, with nothing changed, when the pool is short."""
        blocks = self.req_blocks.get(request_id, [])
        shared = hit.blocks if hit else []
        need = self.blocks_needed(num_tokens) - len(blocks) - len(shared)
        # Hit blocks sitting in the free list stop being free once shared.
        reviving = sum(1 for b in shared if b.ref_cnt == 0)
        if need > self.pool.num_free - reviving:
            return False
        for b in shared:
            self.pool.touch(b)
        blocks = self.req_blocks.setdefault(request_id, [])
        blocks.extend(shared)
        if shared:
            self.req_hashes[request_id] = [b.block_hash for b in shared]
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Publish the request's blocks that are full of computed tokens to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self.req_hashes.setdefault(request_id, [])
        blocks = self.req_blocks[request_id]
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            parent = hashes[-1] if hashes else self.root
            tokens = token_ids[i * bs : (i + 1) * bs]
            digest = hash_block(parent, tokens)
            self.pool.cache(blocks[i], digest, self._key(parent, tokens))
            hashes.append(digest)

    def record_lookup(self, num_prompt_tokens: int, hit: PrefixHit) -> None:
        self.stats.queries += num_prompt_tokens
        self.stats.hits += hit.num_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents; none is freed)."""
        self.pool.forget_cached()
        for hashes in self.req_hashes.values():
            hashes.clear()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def free(self, request_id: str) -> None:
        # Tail blocks first into the LRU list: a prefix's later blocks are the least likely to be
        # shared, so they are evicted before its head.
        blocks = self.req_blocks.pop(request_id, [])
        self.req_hashes.pop(request_id, None)
        self.pool.free(reversed(blocks))
