"""Which KV blocks each request holds, and the prefix cache over them.

The scheduler talks to this, never to the pool. Full blocks are identified by a chained hash
(kv_cache/hashing.py): a digest of the parent block's hash and this block's token ids, rooted in a
salt for whatever else shapes the KV (model file, KV dtype, block size, quantization), the same in
every process. A hit is verified against the stored (parent hash, tokens) key, then shared by
reference. Blocks freed by a finished request stay cached until the pool reuses them (LRU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.kv_cache.block_pool import NULL_BLOCK, Block, BlockPool
from slimserve.kv_cache.hashing import hash_block, kv_salt
from slimserve.kv_cache.spec import FULL, AttentionSpec


@dataclass(slots=True)
class PrefixHit:
    """What a prefix-cache lookup found: blocks to share, and the tokens they cover. `blocks`
    are the first KV group's; `others` those of the other groups (window groups: None for blocks
    no later token sees, which need not be cached)."""

    blocks: list[Block]
    num_tokens: int
    others: tuple[list[Block | None], ...] = ()
    hashes: list[bytes] = field(default_factory=list)  # the chained hash of each hit block

    def per_group(self) -> tuple[list[Block | None], ...]:
        return (self.blocks, *self.others)


@dataclass(slots=True)
class CacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    """Block tables of every request, one per KV group (kv_cache/spec.py), over one pool.

    A window group's table keeps a request's blocks that some later token still sees; earlier
    ones are given back as the request advances (their entries become None, the null block in
    tables). Every group publishes its full blocks to the prefix cache under the same chained
    hash, group 0 as is and group g > 0 with g appended, so a router can compute group 0's."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        salt: bytes | None = None,
        groups: tuple[AttentionSpec, ...] = (FULL,),
    ):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.groups = tuple(groups)
        self.windows = tuple(g.window for g in self.groups)
        self.req_blocks: dict[str, list[list[Block | None]]] = {}
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

    def first_needed(self, group: int, num_computed: int) -> int:
        """The first block of `group` that the token at position `num_computed` (and so every
        later one) still reads."""
        w = self.windows[group]
        return max(0, num_computed + 1 - w) // self.block_size if w else 0

    @staticmethod
    def _key(parent: bytes, tokens: list[int]) -> tuple[bytes, tuple[int, ...]]:
        return parent, tuple(tokens)

    @staticmethod
    def _group_hash(digest: bytes, group: int) -> bytes:
        return digest if group == 0 else digest + bytes((group,))

    def find_prefix(self, token_ids: list[int], max_blocks: int | None = None) -> PrefixHit:
        """The longest run of cached full blocks at the start of `token_ids` (at most
        `max_blocks`) that every group can serve: a full group all of its blocks, a window
        group those its window still sees from the first token after the run.

        The last token is never covered: it must be recomputed to produce the next logits."""
        hit = PrefixHit([], 0, tuple([] for _ in self.groups[1:]))
        if not self.enable_prefix_caching:
            return hit
        bs, parent = self.block_size, self.root
        n = (len(token_ids) - 1) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        found: list[list[Block | None]] = [[] for _ in self.groups]
        hashes = []
        for i in range(n):
            tokens = token_ids[i * bs : (i + 1) * bs]
            digest, key = hash_block(parent, tokens), self._key(parent, tokens)
            row = []
            for g in range(len(self.groups)):
                b = self.pool.lookup(self._group_hash(digest, g))
                row.append(b if b is not None and b.key == key else None)
            if any(b is None for b, w in zip(row, self.windows) if not w):
                break  # a full group misses: no longer run exists
            for g, b in enumerate(row):
                found[g].append(b)
            hashes.append(digest)
            parent = digest
        h = len(found[0])
        while (
            h
            and not all(  # a window group must hold the blocks its window still sees
                all(b is not None for b in found[g][self.first_needed(g, h * bs) : h])
                for g, w in enumerate(self.windows)
                if w
            )
        ):
            h -= 1
        per_group = [
            [None] * self.first_needed(g, h * bs) + found[g][self.first_needed(g, h * bs) : h]
            for g in range(len(self.groups))
        ]
        return PrefixHit(per_group[0], h * bs, tuple(per_group[1:]), hashes[:h])

    def allocate_slots(
        self,
        request_id: str,
        num_tokens: int,
        hit: PrefixHit | None = None,
        num_computed: int | None = None,
    ) -> bool:
        """Hold blocks for `num_tokens` tokens in total, sharing `hit` (for a new request), of
        which the first `num_computed` are computed (default: the hit's): window groups first
        give back the blocks no token from there on sees.

        False, with nothing else changed, when the pool is short."""
        if num_computed is None:
            num_computed = hit.num_tokens if hit else 0
        tables = self.req_blocks.get(request_id)
        if tables is None:
            shared = hit.per_group() if hit else tuple([] for _ in self.groups)
            tables = self.req_blocks[request_id] = [[] for _ in self.groups]
        else:
            shared = tuple([] for _ in self.groups)
        self._release_outside_windows(tables, num_computed)
        total = self.blocks_needed(num_tokens)
        # Blocks a window no longer sees are never taken.
        need = [
            max(0, total - max(len(t) + len(s), self.first_needed(g, num_computed)))
            for g, (t, s) in enumerate(zip(tables, shared))
        ]
        # Hit blocks sitting in the free list stop being free once shared.
        reviving = sum(1 for s in shared for b in s if b is not None and b.ref_cnt == 0)
        if sum(need) > self.pool.num_free - reviving:
            if not any(tables):
                del self.req_blocks[request_id]
            return False
        for g, table in enumerate(tables):
            for b in shared[g]:
                if b is not None:
                    self.pool.touch(b)
            table.extend(shared[g])
            first = self.first_needed(g, num_computed)
            if len(table) < first:  # a window group's blocks before its window: none held
                table.extend([None] * (first - len(table)))
            if need[g]:
                table.extend(self.pool.allocate(need[g]))
        if hit and hit.hashes and request_id not in self.req_hashes:
            self.req_hashes[request_id] = list(hit.hashes)
        return True

    def _release_outside_windows(self, tables: list[list[Block | None]], num_computed: int):
        """Window groups give back their blocks before `first_needed`. What a table no longer
        holds is always a prefix of it, so the scan walks back from there only over blocks
        released now (per step, not per block of the context)."""
        for g, table in enumerate(tables):
            if not self.windows[g]:
                continue
            stop = min(self.first_needed(g, num_computed), len(table))
            start = stop
            while start and table[start - 1] is not None:
                start -= 1
            released = table[start:stop]
            table[start:stop] = [None] * (stop - start)
            self.pool.free(released)  # oldest first into the LRU list

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Publish the request's blocks that are full of computed tokens to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self.req_hashes.setdefault(request_id, [])
        tables = self.req_blocks[request_id]
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            parent = hashes[-1] if hashes else self.root
            tokens = token_ids[i * bs : (i + 1) * bs]
            digest, key = hash_block(parent, tokens), self._key(parent, tokens)
            for g, table in enumerate(tables):
                if table[i] is not None:
                    self.pool.cache(table[i], self._group_hash(digest, g), key)
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
        """Group 0's block table of the request (null block where none is held)."""
        return self.tables(request_id)[0]

    def tables(self, request_id: str) -> tuple[list[int], ...]:
        """The request's block table in each group (null block where none is held)."""
        tables = self.req_blocks.get(request_id)
        if tables is None:
            return tuple([] for _ in self.groups)
        return tuple([NULL_BLOCK if b is None else b.block_id for b in t] for t in tables)

    def num_held(self, request_id: str) -> int:
        """Blocks the request holds, over all groups."""
        return sum(b is not None for t in self.req_blocks.get(request_id, ()) for b in t)

    def free(self, request_id: str) -> None:
        # Tail blocks first into the LRU list: a prefix's later blocks are the least likely to be
        # shared, so they are evicted before its head.
        tables = self.req_blocks.pop(request_id, [])
        self.req_hashes.pop(request_id, None)
        for t in tables:
            self.pool.free(b for b in reversed(t) if b is not None)
