"""Which replica a request goes to: prefix-aware, least-loaded or round-robin.

The prefix-aware policy keeps, per replica, the block hashes (kv_cache/hashing.py, the engine's
own stable chain) of the prompts it was sent lately, as an LRU bounded in blocks: an estimate of
what its prefix cache holds (SGLang's router keeps an approximate radix tree for the same
purpose). It sends a request where it expects it to be done soonest: the replica minimizing
the work already queued there (prompt tokens it must still compute for its requests in flight,
plus `decode_cost` tokens for each of them) plus this prompt's tokens that replica does not
hold. A cached prefix is worth exactly the prefill it saves, so a hot prefix keeps to its
replica until that replica's queue costs more than computing the prefix again elsewhere.
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
        decode_cost: int = 128,
        blocks_per_replica: int = 65536,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; supported: {', '.join(POLICIES)}")
        self.n, self.policy, self.block_size = num_replicas, policy, block_size
        self.decode_cost, self.capacity = decode_cost, blocks_per_replica
        self.queued = [0] * num_replicas  # prompt tokens still to compute, by estimate
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
        if self.policy == "round-robin":
            return up[next(self._turn) % len(up)], 0
        if self.policy == "least-loaded" or not token_ids:
            return min(up, key=lambda i: (self.in_flight[i], self.sent[i])), 0
        hashes = block_hashes(token_ids, self.block_size, self.salt)
        best = None
        for i in up:
            seen, n = self.seen[i], 0
            for h in hashes:
                if h not in seen:
                    break
                n += 1
            cost = self.queued[i] + self.decode_cost * self.in_flight[i]
            cost += len(token_ids) - n * self.block_size
            if best is None or (cost, self.in_flight[i]) < best[0]:
                best = ((cost, self.in_flight[i]), i, n)
        return best[1], best[2]

    def started(self, replica: int, token_ids: Sequence[int] | None, matched: int) -> int:
        """Count a request sent; returns its ticket for `finished` (its queued prompt tokens)."""
        self.in_flight[replica] += 1
        self.sent[replica] += 1
        self.matched_blocks[replica] += matched
        ticket = max(0, len(token_ids or ()) - matched * self.block_size)
        self.queued[replica] += ticket
        if self.policy != "prefix" or not token_ids:
            return ticket
        seen = self.seen[replica]
        for h in block_hashes(token_ids, self.block_size, self.salt):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        return ticket

    def finished(self, replica: int, ticket: int = 0, failed: bool = False) -> None:
        self.in_flight[replica] -= 1
        self.queued[replica] -= ticket
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
            "queued_tokens": list(self.queued),
            "matched_blocks": list(self.matched_blocks),
            "down": sorted(self.down),
        }
