"""Agent sessions kept between turns (Continuum's time to live): a session holds one reference
to each published block of its last request, so they stay in RAM for the next turn, until its
time runs out or the pool runs short (oldest session first). A pinned block is an ordinary
shared block: nothing else in the pool or the manager knows of sessions."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from slimserve.kv_cache.block_pool import Block, BlockPool


@dataclass(slots=True)
class Session:
    """Its last request's published blocks (one reference each), held until `expires`, and
    that request's tokens (to say where a next prompt diverged)."""

    blocks: list[Block]
    tokens: list[int]
    expires: float


class Sessions(OrderedDict):
    """Session id -> Session, oldest pinned first, over `pool`."""

    def __init__(self, pool: BlockPool):
        super().__init__()
        self.pool = pool
        self.num_pinned = 0  # block references the sessions hold
        self.expired = 0  # sessions let go when their time to live ran out
        self.pressed = 0  # sessions let go early because the pool was short

    def pin(self, session_id: str, blocks: list[Block], tokens: list[int], expires: float):
        """Hold `blocks` for the session until `expires`; its earlier blocks are let go."""
        for b in blocks:
            self.pool.touch(b)
        self.release(session_id)
        self[session_id] = Session(blocks, list(tokens), expires)
        self.num_pinned += len(blocks)

    def release(self, session_id: str) -> None:
        session = self.pop(session_id, None)
        if session is not None:
            self.pool.free(reversed(session.blocks))
            self.num_pinned -= len(session.blocks)

    def give_way(self) -> None:
        """The pool is short: the oldest session lets its blocks go."""
        self.release(next(iter(self)))
        self.pressed += 1

    def expire(self, now: float) -> None:
        for sid in [sid for sid, s in self.items() if s.expires <= now]:
            self.release(sid)
            self.expired += 1

    def diverged_at(self, session_id: str, token_ids: list[int]) -> int | None:
        """The first position where `token_ids` differs from the tokens of the session's last
        request (prompt and output); None when the session holds nothing."""
        session = self.get(session_id)
        if session is None:
            return None
        n = 0
        for a, b in zip(session.tokens, token_ids):
            if a != b:
                break
            n += 1
        return n
