"""Which replica a request goes to: prefix-aware, least-loaded or round-robin.

The prefix-aware policy keeps, per replica, the block hashes (kv_cache/hashing.py, the engine's
own stable chain) of the prompts it was sent lately, as an LRU bounded in blocks, an estimate
of what its prefix cache holds (SGLang's router keeps an approximate radix tree for the same
purpose). A request goes to the replica holding the longest run of its leading blocks, unless
that replica has `imbalance` more requests in flight than the least loaded one: then load wins,
so one hot prefix cannot pile onto one replica while another idles.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

from slimserve.kv_cache.hashing import block_hashes, kv_salt

POLICIES = ("prefix", "least-loaded", "round-robin")


class Router:
    def __init__(
        self,
        num_replicas: int,
        policy: str = "prefix",
        block_size: int = 16,
        imbalance: int = 4,
        blocks_per_replica: int = 65536,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; supported: {', '.join(POLICIES)}")
        self.n, self.policy, self.block_size = num_replicas, policy, block_size
        self.imbalance, self.capacity = imbalance, blocks_per_replica
        self.salt = kv_salt("router")
        self.seen: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.in_flight = [0] * num_replicas
        self.sent = [0] * num_replicas
        self.matched_blocks = [0] * num_replicas
        self.down: set[int] = set()  # replicas that failed and are not yet back
        self._turn = itertools.count()

    def _up(self) -> list[int]:
        up = [i for i in range(self.n) if i not in self.down]
        return up or list(range(self.n))  # all down: try anyway (one may be back)

    def choose(self, token_ids: Sequence[int] | None) -> tuple[int, int]:
        """(replica, leading blocks it is thought to hold) for a prompt's tokens."""
        up = self._up()
        least = min(up, key=lambda i: (self.in_flight[i], self.sent[i]))
        if self.policy == "round-robin":
            return up[next(self._turn) % len(up)], 0
        if self.policy == "least-loaded" or not token_ids:
            return least, 0
        hashes = block_hashes(token_ids, self.block_size, self.salt)
        best, best_len = least, 0
        for i in up:
            seen, n = self.seen[i], 0
            for h in hashes:
                if h not in seen:
                    break
                n += 1
            if n > best_len:
                best, best_len = i, n
        if self.in_flight[best] - self.in_flight[least] >= self.imbalance:
            best, best_len = least, 0
        return best, best_len

    def started(self, replica: int, token_ids: Sequence[int] | None, matched: int) -> None:
        self.in_flight[replica] += 1
        self.sent[replica] += 1
        self.matched_blocks[replica] += matched
        if self.policy != "prefix" or not token_ids:
            return
        seen = self.seen[replica]
        for h in block_hashes(token_ids, self.block_size, self.salt):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def finished(self, replica: int, failed: bool = False) -> None:
        self.in_flight[replica] -= 1
        if failed:
            self.down.add(replica)
            self.seen[replica].clear()  # a restarted replica starts with an empty cache
        else:
            self.down.discard(replica)

    def summary(self) -> dict:
        return {
            "policy": self.policy,
            "sent": list(self.sent),
            "in_flight": list(self.in_flight),
            "matched_blocks": list(self.matched_blocks),
            "down": sorted(self.down),
        }
