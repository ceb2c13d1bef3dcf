"""Which KV blocks each request holds, and the prefix cache over them.

The scheduler talks to this, never to the pool. Full blocks are identified by a chained hash
(kv_cache/hashing.py): a digest of the parent block's hash and this block's token ids, rooted in a
salt for whatever else shapes the KV (model file, KV dtype, block size, quantization), the same in
every process. A hit is verified against the stored (parent hash, tokens) key, then shared by
reference. Blocks freed by a finished request stay cached until the pool reuses them (LRU).

Below the RAM pool there may be a tier (kv_cache/tiers.py: a disk), keyed by the same hashes. A
lookup that misses RAM asks the tier; a page found there takes a fresh block and a load
operation (kv_cache/ops.py) that the runner carries out before the forward. Every block
published is also handed to the tier, as a save operation the runner carries out after the
step that filled it. The manager is the one place that decides which block holds what.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.kv_cache.block_pool import NULL_BLOCK, Block, BlockPool
from slimserve.kv_cache.hashing import block_hashes, hash_block, kv_salt, partial_hash
from slimserve.kv_cache.ops import KVOp
from slimserve.kv_cache.sessions import Sessions
from slimserve.kv_cache.spec import FULL, AttentionSpec


@dataclass(slots=True)
class Stored:
    """A block of a hit that a tier holds: it takes a fresh block, and its page is loaded, when
    the hit is taken (allocate_slots)."""

    block_hash: bytes  # the group hash
    key: tuple
    payload: bytes | None = None  # read (and verified) by find_prefix


@dataclass(slots=True)
class PrefixHit:
    """What a prefix-cache lookup found: blocks to share, and the tokens they cover. `blocks`
    are the first KV group's; `others` those of the other groups (window groups: None for blocks
    no later token sees, which need not be cached)."""

    blocks: list[Block | Stored]
    num_tokens: int  # the full blocks' tokens, and the partial block's
    others: tuple[list[Block | Stored | None], ...] = ()
    hashes: list[bytes] = field(default_factory=list)  # the chained hash of each hit block
    stored_tokens: int = 0  # of num_tokens, those whose KV comes from a tier
    # After the full blocks: the first tokens of the next block, as a preempted request left
    # them (keep_partial); its page is copied (or loaded) into a fresh block of the request's.
    partial: Block | Stored | None = None

    def per_group(self) -> tuple[list[Block | Stored | None], ...]:
        return (self.blocks, *self.others)


@dataclass(slots=True)
class CacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached (in RAM or a tier)
    tier_hits: int = 0  # of those, tokens whose blocks were loaded from the tier
    loads: int = 0  # pages loaded from the tier
    saves: int = 0  # pages handed to the tier


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
        tier=None,
    ):
        self.block_size = block_size
        self.tier = tier if enable_prefix_caching else None  # kv_cache/tiers.py
        self.ops: list[KVOp] = []  # what the runner is to carry out next (take_ops)
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.sessions = Sessions(self.pool)  # agent sessions kept between turns
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
        found: list[list[Block | Stored | None]] = [[] for _ in self.groups]
        hashes = []
        for i in range(n):
            tokens = token_ids[i * bs : (i + 1) * bs]
            digest, key = hash_block(parent, tokens), self._key(parent, tokens)
            row = [self._lookup(self._group_hash(digest, g), key) for g in range(len(self.groups))]
            if any(b is None for b, w in zip(row, self.windows) if not w):
                break  # a full group misses: no longer run exists
            for g, b in enumerate(row):
                found[g].append(b)
            hashes.append(digest)
            parent = digest
        while True:
            h = self._visible_run(found)
            per_group = [
                [None] * self.first_needed(g, h * bs) + found[g][self.first_needed(g, h * bs) : h]
                for g in range(len(self.groups))
            ]
            bad = self._read_stored(per_group, h)
            if bad is None:
                stored = sum(isinstance(b, Stored) for b in per_group[0]) * bs
                hit = PrefixHit(per_group[0], h * bs, tuple(per_group[1:]), hashes[:h], stored)
                if max_blocks is None and len(self.groups) == 1:
                    self._find_partial(hit, token_ids)
                return hit
            for f in found:  # a page the tier could not give: the run ends before it
                del f[bad:]

    def _find_partial(self, hit: PrefixHit, token_ids: list[int]) -> None:
        """Extend `hit` with the longest partial block a preempted request left after it (at
        most a block less one token, and never the last token)."""
        bs, h = self.block_size, len(hit.blocks)
        parent = hit.hashes[-1] if hit.hashes else self.root
        for c in range(min(bs - 1, len(token_ids) - 1 - h * bs), 0, -1):
            tokens = token_ids[h * bs : h * bs + c]
            b = self._lookup(partial_hash(parent, tokens), self._key(parent, tokens))
            if isinstance(b, Stored):
                b.payload = self.tier.get(b.block_hash, b.key)
                if b.payload is None:
                    continue
                hit.stored_tokens += c
            if b is not None:
                hit.partial, hit.num_tokens = b, hit.num_tokens + c
                return

    def _lookup(self, block_hash: bytes, key: tuple) -> Block | Stored | None:
        b = self.pool.lookup(block_hash)
        if b is not None and b.key == key:
            return b
        if self.tier is not None and block_hash in self.tier:
            return Stored(block_hash, key)
        return None

    def _visible_run(self, found: list[list[Block | Stored | None]]) -> int:
        """How many of the found blocks a hit can take: a window group must hold the blocks
        its window still sees from the first token after the run."""
        h, bs = len(found[0]), self.block_size
        while h and not all(
            all(b is not None for b in found[g][self.first_needed(g, h * bs) : h])
            for g, w in enumerate(self.windows)
            if w
        ):
            h -= 1
        return h

    def _read_stored(self, per_group, h: int) -> int | None:
        """Read the tier's pages of a hit of `h` blocks, in block order; the index of the first
        block whose page could not be read (corrupt, gone), or None when every one was."""
        for i in range(h):
            for table in per_group:
                b = table[i]
                if isinstance(b, Stored) and b.payload is None:
                    b.payload = self.tier.get(b.block_hash, b.key)
                    if b.payload is None:
                        return i
        return None

    def prefetch(self, token_ids: list[int]) -> None:
        """Ask the tier to read ahead the pages of `token_ids`' prefix that RAM does not hold
        (a request waiting to be admitted)."""
        if self.tier is None:
            return
        n = (len(token_ids) - 1) // self.block_size
        want = []
        for digest in block_hashes(token_ids[: n * self.block_size], self.block_size, self.root):
            for g in range(len(self.groups)):
                gh = self._group_hash(digest, g)
                if self.pool.lookup(gh) is None:
                    want.append(gh)
        self.tier.prefetch(want)

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

        Kept sessions' blocks give way (oldest session first) when the pool is short. False,
        with nothing else changed, when it is short all the same."""
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
        # Hit blocks sitting in the free list stop being free once shared; a tier's pages take
        # fresh blocks.
        reviving = sum(1 for s in shared for b in s if isinstance(b, Block) and b.ref_cnt == 0)
        stored = sum(1 for s in shared for b in s if isinstance(b, Stored))
        while sum(need) + stored > self.pool.num_free - reviving and self.sessions:
            self.sessions.give_way()  # kept sessions give way first, oldest first
            reviving = sum(1 for s in shared for b in s if isinstance(b, Block) and b.ref_cnt == 0)
        if sum(need) + stored > self.pool.num_free - reviving:
            if not any(tables):
                del self.req_blocks[request_id]
            extra = [hit.partial] if hit and hit.partial is not None else []
            for b in [b for s in shared for b in s] + extra:  # read for nothing: keep them
                if isinstance(b, Stored) and b.payload is not None:
                    self.tier.restage(b.block_hash, b.key, b.payload)
            return False
        for s in shared:  # every RAM hit first: a fresh block must not evict one of them
            for b in s:
                if isinstance(b, Block):
                    self.pool.touch(b)
        for g, table in enumerate(tables):
            table.extend(self._load(b) if isinstance(b, Stored) else b for b in shared[g])
            first = self.first_needed(g, num_computed)
            if len(table) < first:  # a window group's blocks before its window: none held
                table.extend([None] * (first - len(table)))
            if need[g]:
                table.extend(self.pool.allocate(need[g]))
        if hit and hit.hashes and request_id not in self.req_hashes:
            self.req_hashes[request_id] = list(hit.hashes)
        if hit and hit.partial is not None:
            self._take_partial(hit.partial, tables[0][len(hit.blocks)])
        return True

    def _take_partial(self, src: Block | Stored, dst: Block) -> None:
        """The partial block's page into `dst`, a fresh block of the request's own (the request
        writes its next tokens there, so the published one is never shared)."""
        if isinstance(src, Stored):
            self.ops.append(KVOp("load", dst.block_id, src.block_hash, src.key, src.payload))
            self.stats.loads += 1
        else:  # before the forward, so `src` is intact even if this step reallocated it
            self.ops.append(KVOp("copy", dst.block_id, b"", (), src=src.block_id))

    def keep_partial(self, request_id, token_ids: list[int], num_computed: int) -> None:
        """Publish the request's partial last block (its first `num_computed % block_size`
        tokens computed) under a partial hash before it is freed (a preemption), so that its
        readmission takes the page back instead of computing those tokens again; saved to the
        tier too. Only for a single KV group, with every full block before it published."""
        bs, c = self.block_size, num_computed % self.block_size
        i = num_computed // bs
        tables, hashes = self.req_blocks.get(request_id), self.req_hashes.get(request_id, [])
        if not c or not tables or len(self.groups) != 1 or len(hashes) != i:
            return
        if not self.enable_prefix_caching or len(tables[0]) <= i or tables[0][i] is None:
            return
        parent = hashes[-1] if hashes else self.root
        tokens = token_ids[i * bs : i * bs + c]
        block, ph = tables[0][i], partial_hash(parent, tokens)
        if self.pool.lookup(ph) is None and self.pool.cache(block, ph, self._key(parent, tokens)):
            if self.tier is not None:
                self.ops.append(KVOp("save", block.block_id, ph, self._key(parent, tokens)))

    def _load(self, stored: Stored) -> Block:
        """A fresh block published under a tier page's hash, with its load queued."""
        b = self.pool.allocate(1)[0]
        self.pool.cache(b, stored.block_hash, stored.key)
        self.ops.append(KVOp("load", b.block_id, stored.block_hash, stored.key, stored.payload))
        self.stats.loads += 1
        return b

    def take_ops(self) -> list[KVOp]:
        """The page movements queued since the last call, in the order they were decided."""
        ops, self.ops = self.ops, []
        return ops

    def saved(self, op: KVOp, payload: bytes) -> None:
        """The runner gathered a save's page: the tier stores it (off the step)."""
        self.tier.put(op.block_hash, op.key, payload)
        self.stats.saves += 1

    def load_failed(self, ops: list[KVOp]) -> None:
        """Loads the runner did not carry out: their blocks hold nothing a hit may share."""
        for op in ops:
            if op.is_load:
                self.pool.uncache(op.block_id)

    def close(self) -> None:
        """Let the tier write what it has queued (clean shutdown)."""
        if self.tier is not None:
            self.tier.close()

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
                b = table[i]
                gh = self._group_hash(digest, g)
                published = b is not None and self.pool.cache(b, gh, key)
                if published and self.tier is not None and gh not in self.tier:
                    self.ops.append(KVOp("save", b.block_id, gh, key))
            hashes.append(digest)

    def record_lookup(self, num_prompt_tokens: int, hit: PrefixHit) -> None:
        self.stats.queries += num_prompt_tokens
        self.stats.hits += hit.num_tokens
        self.stats.tier_hits += hit.stored_tokens

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

    # -- sessions (kv_cache/sessions.py) ------------------------------------------------------
    def pin(self, session_id: str, request_id, tokens: list[int], expires: float) -> None:
        """Keep the request's published blocks for `session_id` until `expires` (call before
        `free`)."""
        blocks = [
            b for t in self.req_blocks.get(request_id, ()) for b in t
            if b is not None and b.block_hash is not None
        ]  # fmt: skip
        self.sessions.pin(session_id, blocks, tokens, expires)

    def expire_sessions(self, now: float) -> None:
        self.sessions.expire(now)

    @property
    def num_pinned(self) -> int:
        return self.sessions.num_pinned

    @property
    def num_resident(self) -> int:
        """Blocks holding a page someone can use: in use, or freed and still published."""
        return self.num_blocks - self.num_free_blocks + self.pool.num_free_cached

    def free(self, request_id: str) -> None:
        # Tail blocks first into the LRU list: a prefix's later blocks are the least likely to be
        # shared, so they are evicted before its head.
        tables = self.req_blocks.pop(request_id, [])
        self.req_hashes.pop(request_id, None)
        for t in tables:
            self.pool.free(b for b in reversed(t) if b is not None)
