"""A ref-counted pool of KV blocks with an O(1) LRU free list.

Freed blocks keep their contents (and, with prefix caching, their hash) until the pool hands them
out again, oldest-freed first; so a block can be revived by a later cache hit for free. A freed
block with no hash (prefix caching off, or a request's partial last block) holds nothing a hit
could use, so it goes to the front and is handed out before any cached block is evicted: the
pool then reuses the same, already resident blocks instead of walking through pages it has never
touched (the KV cache's pages become resident as they are first written).

Block ids run from 1 to num_blocks: id 0 is the null block (NULL_BLOCK), which the cache tensors
hold but the pool never hands out; block tables are padded with it.
"""

from __future__ import annotations


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "key", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.key: tuple | None = None  # (parent hash, token ids): verifies a hash hit
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self):
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the front (LRU), remove anywhere in O(1)."""

    def __init__(self, blocks: list[Block]):
        self.head = Block(-1)  # sentinels
        self.tail = Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, b: Block) -> None:
        last = self.tail.prev
        last.next, b.prev, b.next, self.tail.prev = b, last, self.tail, b
        self.size += 1

    def appendleft(self, b: Block) -> None:
        first = self.head.next
        self.head.next, b.prev, b.next, first.prev = b, self.head, first, b
        self.size += 1

    def remove(self, b: Block) -> None:
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.size -= 1

    def popleft(self) -> Block:
        b = self.head.next
        if b is self.tail:
            raise IndexError("no free blocks")
        self.remove(b)
        return b

    def __iter__(self):
        b = self.head.next
        while b is not self.tail:
            yield b
            b = b.next


NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(NULL_BLOCK + 1, NULL_BLOCK + 1 + num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}  # block hash -> block holding those tokens
        self.num_free_cached = 0  # free blocks that still hold a published page

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return self.free_queue.size

    def allocate(self, n: int) -> list[Block]:
        """n blocks with ref_cnt 1; the caller checked num_free >= n."""
        out = []
        for _ in range(n):
            b = self.free_queue.popleft()
            if b.block_hash is not None:  # evict its cached identity
                self.num_free_cached -= 1
                if self.cached.get(b.block_hash) is b:
                    del self.cached[b.block_hash]
                b.block_hash = b.key = None
            b.ref_cnt = 1
            out.append(b)
        return out

    def touch(self, b: Block) -> None:
        """Take another reference (a prefix-cache hit); revives a freed block."""
        if b.ref_cnt == 0:
            self.free_queue.remove(b)
            self.num_free_cached -= b.block_hash is not None
        b.ref_cnt += 1

    def free(self, blocks) -> None:
        """Drop one reference from each; blocks reaching 0 join the LRU tail in the given order
        (the front, those with no hash: nothing to keep)."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"double free of {b}")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    self.free_queue.appendleft(b)
                else:
                    self.free_queue.append(b)
                    self.num_free_cached += 1

    def cache(self, b: Block, block_hash: bytes, key: tuple) -> bool:
        """Publish `b` under `block_hash`; False when it already was (e.g. it came from a hit)."""
        if b.block_hash is not None:
            return False
        b.block_hash, b.key = block_hash, key
        self.cached.setdefault(block_hash, b)
        return True

    def uncache(self, block_id: int) -> None:
        """Withdraw a block's published identity (a page that never arrived)."""
        b = self.blocks[block_id - NULL_BLOCK - 1]
        if b.block_hash is not None and self.cached.get(b.block_hash) is b:
            del self.cached[b.block_hash]
        self.num_free_cached -= b.block_hash is not None and b.ref_cnt == 0
        b.block_hash = b.key = None

    def lookup(self, block_hash: bytes) -> Block | None:
        return self.cached.get(block_hash)

    def forget_cached(self) -> None:
        """Drop every cached identity (blocks keep their contents and references)."""
        for b in self.blocks:
            b.block_hash = b.key = None
        self.cached.clear()
        self.num_free_cached = 0
