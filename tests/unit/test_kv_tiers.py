"""The disk tier on its own, and the KV manager over it (no model): records verify, the bound
holds, a restart finds the pages, faults read as misses, and loads put the right pages back."""

import errno
import logging
import os
import struct

import pytest

from slimserve.errors import InvalidRequest
from slimserve.kv_cache.hashing import block_hashes
from slimserve.kv_cache.manager import KVCacheManager
from slimserve.kv_cache.tiers import DiskTier, decode_record, encode_record

BS = 4
PAGE = 4 * BS  # the fake runner's page: the block's tokens as int32


def page_of(tokens):
    return struct.pack(f"<{BS}i", *tokens)


class FakeRunner:
    """Pages as the runner would hold them: a block's page is its tokens (once computed)."""

    def __init__(self):
        self.pages: dict[int, bytes] = {}

    def execute_kv_ops(self, ops, on_saved):
        for op in ops:
            if op.is_load:
                self.pages[op.block_id] = bytes(op.payload)
            elif op.kind == "copy":
                self.pages[op.block_id] = self.pages[op.src]
            else:
                on_saved(op, self.pages[op.block_id])

    def compute(self, kv, rid, tokens, start, stop):
        """The forward of rows start..stop-1: it fills their blocks' pages."""
        table = kv.block_ids(rid)
        for i in range(start // BS, -(-stop // BS)):
            chunk = tokens[i * BS : (i + 1) * BS]
            self.pages[table[i]] = page_of(chunk + [0] * (BS - len(chunk)))


def test_record_round_trip_and_every_flipped_byte_is_refused():
    h, key, payload = b"h" * 16, (b"p" * 16, (1, 2, 3, 4)), bytes(range(40))
    rec = encode_record(h, key, payload)
    assert decode_record(rec, h) == (key, payload)
    assert decode_record(rec, b"x" * 16) is None  # another block's record
    for i in range(len(rec)):
        bad = bytearray(rec)
        bad[i] ^= 0x40
        assert decode_record(bytes(bad), h) is None, i
    for n in range(len(rec)):
        assert decode_record(rec[:n], h) is None
    assert decode_record(bytes(len(rec)), h) is None


def test_put_get_restart_and_bound(tmp_path):
    tier = DiskTier(tmp_path, 10 * (PAGE + 200), PAGE)
    keys = [(bytes(16), (i, i, i, i)) for i in range(30)]
    for i, key in enumerate(keys):
        tier.put(bytes([i]) * 16, key, page_of(key[1]))
    tier.flush()
    assert tier.stats.bytes <= tier.max_bytes and 0 < len(tier) < 30
    assert tier.get(bytes([29]) * 16, keys[29]) == page_of(keys[29][1])  # newest kept
    assert tier.get(bytes([0]) * 16, keys[0]) is None  # oldest evicted
    assert tier.get(bytes([29]) * 16, (bytes(16), (9, 9, 9, 9))) is None  # another key
    tier.close()
    again = DiskTier(tmp_path, 10 * (PAGE + 200), PAGE)  # a restart
    assert len(again) == len(tier)
    assert again.get(bytes([29]) * 16, keys[29]) == page_of(keys[29][1])
    again.close()


def test_size_below_one_page_and_unwritable_directory(tmp_path, caplog):
    with pytest.raises(InvalidRequest, match="below one page"):
        DiskTier(tmp_path, 10, PAGE)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="slimserve"):
        assert DiskTier.open(blocked / "sub", 1 << 20, PAGE) is None
    assert "KV disk cache off" in caplog.text


def test_a_full_disk_turns_saving_off_and_serving_goes_on(tmp_path, monkeypatch, caplog):
    tier = DiskTier(tmp_path, 1 << 20, PAGE)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="slimserve"):
        for i in range(5):
            tier.put(bytes([i]) * 16, (bytes(16), (i,) * 4), page_of([i] * 4))
        tier.flush()
    assert not tier.saving and len(tier) == 0
    assert caplog.text.count("saving off") == 1
    assert not list(tmp_path.glob("*/*.tmp.*"))  # nothing half-written left behind
    tier.close()


def test_corrupt_records_are_misses_and_counted(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, PAGE)
    hashes = [bytes([i]) * 16 for i in range(3)]
    for i, h in enumerate(hashes):
        tier.put(h, (bytes(16), (i,) * 4), page_of([i] * 4))
    tier.flush()
    files = [tier._path(h) for h in hashes]
    data = files[0].read_bytes()
    files[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # flipped
    files[1].write_bytes(files[1].read_bytes()[:20])  # truncated
    files[2].write_bytes(bytes(len(data)))  # zeroed
    for i, h in enumerate(hashes):
        assert tier.get(h, (bytes(16), (i,) * 4)) is None
        assert h not in tier
    assert tier.stats.corrupt == 3
    tier.close()


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    (tmp_path / "ab").mkdir()
    stale = tmp_path / "ab" / "abcd.kv.tmp.999999999"
    stale.write_bytes(b"half a record")
    DiskTier(tmp_path, 1 << 20, PAGE).close()
    assert not stale.exists()


def run(kv, runner, rid, tokens):
    """Admit `tokens` as a new request, compute it, publish its blocks and carry out the ops as
    the engine does; returns the tokens the prefix hit covered."""
    hit = kv.find_prefix(tokens)
    assert kv.allocate_slots(rid, len(tokens), hit)
    runner.execute_kv_ops(kv.take_ops(), kv.saved)  # loads, before the forward
    runner.compute(kv, rid, tokens, hit.num_tokens, len(tokens))
    kv.cache_full_blocks(rid, tokens, len(tokens))
    runner.execute_kv_ops(kv.take_ops(), kv.saved)  # saves, after it
    return hit


def check_pages(kv, runner, rid, tokens):
    table = kv.block_ids(rid)
    for i in range(len(tokens) // BS):
        assert runner.pages[table[i]] == page_of(tokens[i * BS : (i + 1) * BS]), i


def test_evicted_prefix_comes_back_from_disk_with_its_pages(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, PAGE)
    kv = KVCacheManager(8, BS, salt=b"s" * 16, tier=tier)
    runner = FakeRunner()
    a = list(range(1, 22))  # 5 full blocks and one token
    run(kv, runner, "a", a)
    kv.free("a")
    tier.flush()
    run(kv, runner, "b", list(range(100, 130)))  # evicts a's blocks from RAM
    kv.free("b")
    tier.flush()
    assert all(kv.pool.lookup(h) is None for h in block_hashes(a, BS, b"s" * 16))
    hit = run(kv, runner, "a2", a)
    assert hit.num_tokens == 20 and hit.stored_tokens == 20
    check_pages(kv, runner, "a2", a)
    # A second request with the same prefix now shares the loaded blocks: loaded once.
    loads = kv.stats.loads
    hit = run(kv, runner, "a3", a + [5])
    assert hit.num_tokens == 20 and hit.stored_tokens == 0 and kv.stats.loads == loads
    assert kv.block_ids("a3")[:5] == kv.block_ids("a2")[:5]
    tier.close()


def test_a_corrupt_page_in_the_middle_ends_the_hit_there(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, PAGE)
    kv = KVCacheManager(8, BS, salt=b"s" * 16, tier=tier)
    runner = FakeRunner()
    a = list(range(1, 22))
    run(kv, runner, "a", a)
    kv.free("a")
    tier.flush()
    kv.reset_prefix_cache()  # RAM forgets: only the disk has them
    third = block_hashes(a, BS, b"s" * 16)[2]
    path = tier._path(third)
    path.write_bytes(path.read_bytes()[:-3])
    hit = run(kv, runner, "a2", a)
    assert hit.num_tokens == 2 * BS  # blocks 0 and 1; 2 onwards recomputed
    check_pages(kv, runner, "a2", a)
    assert tier.stats.corrupt == 1
    tier.close()


def test_a_short_pool_keeps_the_read_pages_for_the_next_try(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, PAGE)
    kv = KVCacheManager(6, BS, salt=b"s" * 16, tier=tier)
    runner = FakeRunner()
    a = list(range(1, 18))  # 4 full blocks and one token: 5 blocks
    run(kv, runner, "a", a)
    kv.free("a")
    tier.flush()
    kv.reset_prefix_cache()
    assert kv.allocate_slots("x", 2 * BS)  # leaves 4 free: too few for a's 5
    hit = kv.find_prefix(a)
    assert hit.stored_tokens == 16
    assert not kv.allocate_slots("a2", len(a), hit)
    assert not kv.take_ops()
    kv.free("x")
    reads = tier.stats.hits
    assert run(kv, runner, "a2", a).stored_tokens == 16
    assert tier.stats.hits == reads + 4
    check_pages(kv, runner, "a2", a)
    tier.close()


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_a_preempted_requests_partial_block_comes_back(tmp_path, where):
    tier = DiskTier(tmp_path, 1 << 20, PAGE)
    kv = KVCacheManager(8, BS, salt=b"s" * 16, tier=tier)
    runner = FakeRunner()
    a = list(range(1, 24))  # 23 tokens: computed 22 of them, 5 full blocks and 2 tokens more
    assert kv.allocate_slots("a", 22)
    runner.compute(kv, "a", a, 0, 22)
    kv.cache_full_blocks("a", a, 22)
    kv.keep_partial("a", a, 22)  # the preemption
    kv.free("a")
    runner.execute_kv_ops(kv.take_ops(), kv.saved)  # the saves, the partial page's too
    tier.flush()
    if where == "disk":
        kv.reset_prefix_cache()
    hit = kv.find_prefix(a)
    assert hit.num_tokens == 22 and hit.partial is not None
    assert hit.stored_tokens == (22 if where == "disk" else 0)
    assert kv.allocate_slots("a2", len(a), hit)
    table = kv.block_ids("a2")
    assert kv.pool.blocks[table[5] - 1].block_hash is None  # a block of its own, unpublished
    runner.pages[table[5]] = b"garbage!" * 2  # whatever the block held before
    runner.execute_kv_ops(kv.take_ops(), kv.saved)  # the copy (RAM) or load (disk), pre-forward
    assert runner.pages[table[5]][:8] == page_of([21, 22, 23, 0])[:8]  # its 2 computed tokens
    runner.compute(kv, "a2", a, 22, len(a))
    check_pages(kv, runner, "a2", a)
    # A second request with the same tokens takes a copy too: the partial is never shared.
    kv.cache_full_blocks("a2", a, len(a))
    hit = run(kv, runner, "a3", a[:22] + [99])
    assert hit.num_tokens == 22 and kv.block_ids("a3")[5] != table[5]
    tier.close()
