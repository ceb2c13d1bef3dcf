"""KV tiers below the RAM pool, keyed by the stable block hashes (kv_cache/hashing.py).

A tier stores pages (one block of one KV group: the bytes the attention backend gathers) under
the block's group hash, with the (parent hash, tokens) key that verifies a hit. The manager asks
a tier when its RAM lookup misses, and hands it every block it publishes (write-through), so a
page is on disk from the step after it was computed: a restart, or a `kill -9` (only the writes
then in flight are lost), finds it there.

The disk tier (`DiskTier`): one file a page, `DIR/<2 hex>/<hash hex>.kv`, written to a temporary
name and renamed, by a writer thread (the step never waits for a write; a full queue drops the
page and counts it). Each record carries its hash, key, length and a CRC-32, so a torn,
truncated, zeroed or flipped record reads as a miss (counted, and the file removed), never as
KV. Reads ahead (`prefetch`) run on a reader thread, so a waiting request's prefix is in RAM by
the time the scheduler admits it. The directory is bounded by `max_bytes`, least recently used
out first. The salt at the root of every hash covers the model file, the KV dtype, the block
size and the quantization, so two models sharing a directory never read each other's pages.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from slimserve.errors import InvalidRequest

logger = logging.getLogger("slimserve")

MAGIC = b"SLIMKV01"
_HEAD = struct.Struct("<8sB17s16sIQ")  # magic, hash length, hash (padded), parent, ntok, nbytes
WRITE_QUEUE_BYTES = 64 << 20  # pages waiting for the writer; more are dropped (counted)
STAGE_BYTES = 64 << 20  # pages read ahead and not yet taken
BUFFER_BYTES = WRITE_QUEUE_BYTES + STAGE_BYTES  # the most RAM the tier holds in pages


def encode_record(block_hash: bytes, key: tuple, payload: bytes) -> bytes:
    parent, tokens = key
    tok = struct.pack(f"<{len(tokens)}i", *tokens)
    head = _HEAD.pack(MAGIC, len(block_hash), block_hash, parent, len(tokens), len(payload))
    body = head + tok + payload
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(data: bytes | bytearray, block_hash: bytes) -> tuple[tuple, memoryview] | None:
    """(key, payload) of a record of `block_hash`, or None if it is not one, whole and intact.
    The payload is a view of `data` (no copy: a page is hundreds of KB)."""
    if len(data) < _HEAD.size + 4:
        return None
    magic, hlen, h, parent, ntok, nbytes = _HEAD.unpack_from(data)
    if magic != MAGIC or h[:hlen] != block_hash or hlen != len(block_hash):
        return None
    view = memoryview(data)
    end = _HEAD.size + 4 * ntok + nbytes
    if len(data) != end + 4 or struct.unpack_from("<I", data, end)[0] != zlib.crc32(view[:end]):
        return None
    tokens = struct.unpack_from(f"<{ntok}i", data, _HEAD.size)
    return (parent, tokens), view[_HEAD.size + 4 * ntok : end]


@dataclass
class TierStats:
    hits: int = 0  # pages served to the pool
    saves: int = 0  # pages written
    dropped: int = 0  # pages not written: the writer's queue was full, or saving is off
    corrupt: int = 0  # records that failed verification (read as a miss)
    bytes: int = 0  # bytes the tier holds now


class DiskTier:
    """Pages on a local disk, bounded by `max_bytes`, surviving restarts (see the module doc)."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike, max_bytes: int, page_bytes: int):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.page_bytes = page_bytes
        self.record_bytes = page_bytes + _HEAD.size + 4  # tokens come on top: a lower bound
        if max_bytes < self.record_bytes:
            raise InvalidRequest(
                f"--kv-disk-cache-size {max_bytes} bytes is below one page "
                f"({self.record_bytes} bytes)", param="kv_disk_cache_size",
            )  # fmt: skip
        self.stats = TierStats()
        self._lock = threading.Lock()  # guards the index, staged and in-flight reads, bytes
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, LRU first
        self._staged: dict[bytes, tuple[tuple, bytes]] = {}
        self._staged_bytes = 0
        self._inflight: dict[bytes, threading.Event] = {}  # queued or being read ahead
        self._started: set[bytes] = set()  # of those, the one the reader is reading
        self._writes: queue.Queue = queue.Queue()
        self._write_bytes = 0
        self._reads: queue.Queue = queue.Queue()
        self.saving = True
        self._closed = False
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="kv-disk-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    @classmethod
    def open(cls, directory, max_bytes: int, page_bytes: int) -> DiskTier | None:
        """The tier, or None with one log line when the directory cannot be written."""
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            probe = Path(directory) / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            logger.warning("KV disk cache off: cannot write to %s (%s)", directory, e)
            return None
        return cls(directory, max_bytes, page_bytes)

    # -- index ------------------------------------------------------------------------------
    def _path(self, block_hash: bytes) -> Path:
        h = block_hash.hex()
        return self.dir / h[:2] / f"{h}.kv"

    def _scan(self) -> None:
        """Index what the directory holds, oldest first; drop temporary files of writers that
        are gone (a process killed mid-write)."""
        found = []
        for p in self.dir.glob("*/*"):
            name = p.name
            try:
                if ".tmp." in name:
                    pid = int(name.rsplit(".", 1)[1])
                    if pid == os.getpid() or not _alive(pid):
                        p.unlink()
                    continue
                if not name.endswith(".kv"):
                    continue
                st = p.stat()
                found.append((st.st_mtime, bytes.fromhex(name[:-3]), st.st_size))
            except (OSError, ValueError):
                continue
        for _, h, size in sorted(found):
            self._index[h] = size
            self.stats.bytes += size
        self._evict_over(0)

    def _evict_over(self, incoming: int) -> None:
        """Remove least recently used pages until `incoming` more bytes fit (lock held)."""
        while self._index and self.stats.bytes + incoming > self.max_bytes:
            h, size = self._index.popitem(last=False)
            self.stats.bytes -= size
            try:
                self._path(h).unlink()
            except OSError:
                pass

    def _forget(self, block_hash: bytes, corrupt: bool) -> None:
        with self._lock:
            size = self._index.pop(block_hash, None)
            if size is not None:
                self.stats.bytes -= size
            if corrupt:
                self.stats.corrupt += 1
        try:
            self._path(block_hash).unlink()
        except OSError:
            pass

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    # -- reads ------------------------------------------------------------------------------
    def _read(self, block_hash: bytes) -> tuple[tuple, memoryview] | None:
        try:
            with open(self._path(block_hash), "rb", buffering=0) as f:
                data = bytearray(os.fstat(f.fileno()).st_size)  # writable: torch reads it in place
                f.readinto(data)
        except FileNotFoundError:
            self._forget(block_hash, corrupt=False)
            return None
        except OSError as e:
            logger.warning("KV disk cache: cannot read a page (%s); it is recomputed", e)
            return None
        record = decode_record(data, block_hash)
        if record is None or len(record[1]) != self.page_bytes:
            logger.warning("KV disk cache: a corrupt record %s; it is recomputed", block_hash.hex())
            self._forget(block_hash, corrupt=True)
            return None
        with self._lock:
            if block_hash in self._index:
                self._index.move_to_end(block_hash)
        return record

    def get(self, block_hash: bytes, key: tuple) -> memoryview | None:
        """The page stored under `block_hash` if its record is intact and its key is `key`.

        A page the reader has queued but not started is read here instead (the lookup walks a
        prefix from its start while the reader takes it from its end: two cores read)."""
        with self._lock:
            staged = self._take_staged(block_hash)
            event = self._inflight.get(block_hash) if staged is None else None
            stolen = event is not None and block_hash not in self._started
            if stolen:
                del self._inflight[block_hash]
        if stolen:
            record = self._read(block_hash)
            event.set()
        else:
            if event is not None:  # being read ahead: wait for it rather than read twice
                event.wait(timeout=5)
                with self._lock:
                    staged = self._take_staged(block_hash)
            record = staged if staged is not None else self._read(block_hash)
        if record is None or record[0] != key:
            return None
        self.stats.hits += 1
        return record[1]

    def _take_staged(self, block_hash: bytes):
        staged = self._staged.pop(block_hash, None)
        if staged is not None:
            self._staged_bytes -= len(staged[1])
        return staged

    def restage(self, block_hash: bytes, key: tuple, payload: bytes) -> None:
        """Keep a page a lookup read but could not use (the pool was short) for the next one."""
        with self._lock:
            if block_hash not in self._staged and self._staged_bytes + len(payload) <= STAGE_BYTES:
                self._staged[block_hash] = (key, payload)
                self._staged_bytes += len(payload)
        self.stats.hits -= 1  # counted when it is taken again

    def prefetch(self, hashes) -> None:
        """Read these pages ahead, those the tier holds and has not staged or queued."""
        if self._closed:
            return
        todo = []
        with self._lock:
            for h in hashes:
                if h in self._index and h not in self._staged and h not in self._inflight:
                    self._inflight[h] = threading.Event()
                    todo.append(h)
        if todo:
            self._reads.put(todo)

    def _read_loop(self) -> None:
        while True:
            todo = self._reads.get()
            if todo is None:
                return
            for h in reversed(todo):  # from the end: a lookup reads from the start (get)
                with self._lock:
                    if h not in self._inflight:
                        continue  # a lookup read it itself
                    self._started.add(h)
                    room = self._staged_bytes + self.page_bytes <= STAGE_BYTES
                record = self._read(h) if room and not self._closed else None
                with self._lock:
                    if record is not None:
                        self._staged[h] = record
                        self._staged_bytes += len(record[1])
                    event = self._inflight.pop(h, None)
                    self._started.discard(h)
                if event is not None:
                    event.set()

    # -- writes -----------------------------------------------------------------------------
    def put(self, block_hash: bytes, key: tuple, payload: bytes) -> None:
        """Queue a page for writing; never blocks (a full queue drops it)."""
        if not self.saving or self._closed or block_hash in self._index:
            return
        with self._lock:
            if self._write_bytes + len(payload) > WRITE_QUEUE_BYTES:
                self.stats.dropped += 1
                return
            self._write_bytes += len(payload)
        self._writes.put((block_hash, key, payload))

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                self._writes.task_done()
                return
            block_hash, key, payload = item
            try:
                if self.saving:
                    self._write(block_hash, key, payload)
                else:
                    self.stats.dropped += 1
            finally:
                with self._lock:
                    self._write_bytes -= len(payload)
                self._writes.task_done()

    def _write(self, block_hash: bytes, key: tuple, payload: bytes) -> None:
        record = encode_record(block_hash, key, payload)
        path = self._path(block_hash)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        with self._lock:
            if block_hash in self._index:
                return
            self._evict_over(len(record))
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(record)
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            self.saving = False
            self.stats.dropped += 1
            why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            logger.warning("KV disk cache: saving off (%s); serving goes on", why)
            return
        with self._lock:
            self._index[block_hash] = len(record)
            self.stats.bytes += len(record)
            self.stats.saves += 1

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued page is written (clean shutdown, tests)."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Write what is queued, then stop the threads."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._writes.put(None)
        self._reads.put(None)
        self._writer.join(timeout=5)
        self._reader.join(timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
