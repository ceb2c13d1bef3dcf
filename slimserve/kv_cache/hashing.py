"""Block hashes as a pure function of the tokens: the same tokens give the same hashes in any
process on any machine, so a disk tier, a second replica or a router can compute them too.

A block's hash is a 16-byte blake2b digest of its parent block's hash and its token ids (int32,
little-endian), rooted in a salt for everything else that shapes the stored KV: the model file,
the KV dtype, the block size and the weight quantization. Python's `hash()` would not do: it is
salted per process for strings.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DIGEST = 16


def kv_salt(*parts: object) -> bytes:
    """The root of every chain: a digest of `parts` (strings and numbers, written as repr)."""
    return hashlib.blake2b(
        repr(parts).encode(), digest_size=DIGEST, person=b"slimserve-kv"
    ).digest()


def _int32_le(tokens: Sequence[int]) -> bytes:
    a = array("i", tokens)
    if a.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte C int
        raise RuntimeError("array('i') is not 32-bit here")
    if array("i", [1]).tobytes()[0] != 1:  # pragma: no cover - big-endian host
        a.byteswap()
    return a.tobytes()


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block holding `tokens`, after the block whose hash is `parent`."""
    return hashlib.blake2b(parent + _int32_le(tokens), digest_size=DIGEST).digest()


def partial_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block's first `tokens` (fewer than a block: a preempted request's last,
    partial block), after the block whose hash is `parent`. Never equal to a full block's: the
    digest is personalised apart."""
    return hashlib.blake2b(
        parent + _int32_le(tokens), digest_size=DIGEST, person=b"slimserve-part"
    ).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes) -> list[bytes]:
    """The chained hashes of every full block of `token_ids`."""
    out, parent = [], salt
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out
