"""Which KV blocks each request holds. The scheduler talks to this, never to the pool."""

from __future__ import annotations

from slimserve.kv_cache.block_pool import Block, BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[Block]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in total; False (and no change) if the pool is short."""
        blocks = self.req_blocks.setdefault(request_id, [])
        need = self.blocks_needed(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        blocks.extend(self.pool.allocate(need))
        return True

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def free(self, request_id: str) -> None:
        # Tail blocks first into the LRU list: they are the least likely to be shared later.
        blocks = self.req_blocks.pop(request_id, [])
        self.pool.free(reversed(blocks))
