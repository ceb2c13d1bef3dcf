"""The RAM cache over an experts file (loader/experts.py) that MoE layers run their experts from.

An `ExpertStore` holds a fixed pool of slots (the cap divided by the largest record) and a map
(layer, expert) -> slot, evicting the least recently used unpinned slot on a miss. A slot's
module is the layer's template with its tensors pointed at views of the slot, built once per
(slot, format) and kept, so a miss costs one `preadv` into the slot and nothing else. Reads run
on a reader thread (the syscall releases the GIL): a layer's misses are queued in the order it
computes them, so reading expert j+1 overlaps computing expert j. With read-ahead on, the layer
before queues the experts the next layer's router picks on its own input (ExpertFlow's
observation that the residual stream changes little between layers); a layer's own misses go
first, and read-ahead it did not need is dropped when it runs.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict, deque

import torch
from torch import nn

from slimserve.errors import InvalidRequest, ModelLoadError
from slimserve.loader.experts import Layout, _like, _tensors

# Read-ahead judges itself every AHEAD_WINDOW reads: if fewer than AHEAD_MIN_USED of them were
# used, it stops for AHEAD_PAUSE layer passes (wrong reads take the device from needed ones).
AHEAD_WINDOW, AHEAD_MIN_USED, AHEAD_PAUSE = 128, 0.6, 2048


def _signature(layout: Layout, template: nn.Module) -> tuple:
    """What makes two layers' expert modules interchangeable: the record layout and every
    submodule's type and plain attributes (e.g. an int4 linear's 8-bit flag)."""
    return layout.fields, tuple(
        (name, type(m).__name__, tuple(sorted(
            (k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
        )))
        for name, m in template.named_modules()
    )  # fmt: skip


class _Slot:
    __slots__ = ("key", "pins", "ready", "error", "by_prefetch")

    def __init__(self):
        self.key = None  # (layer, expert) held, or None
        self.pins = 0  # users (a layer computing with it, a read in flight)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.by_prefetch = False  # read ahead and not yet used


class ExpertStore:
    """A RAM cache of `cap_bytes` over the experts file; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike,
        layers: list,
        cap_bytes: int,
        *,
        prefetch: bool = True,
        drop_page_cache: bool = False,
    ):
        """layers: the model's sparse layers (each with its `expert_layout`); `prefetch`: read the
        next layer's predicted experts ahead; `drop_page_cache`: tell the OS to drop each range
        after reading it, so every miss is a read from the device (for benchmarks: otherwise
        the OS page cache may hold the whole file and misses are memory copies)."""
        self.path = str(path)
        self.layouts = {m.layer: m.expert_layout for m in layers}
        self.templates = {m.layer: m._template[0] for m in layers}
        self.fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        need = max(lay.offset + lay.record * lay.num_experts for lay in self.layouts.values())
        if size < need:
            os.close(self.fd)
            raise ModelLoadError(f"experts file {self.path} is truncated: {size} < {need} bytes")
        self.slot_bytes = max(lay.record for lay in self.layouts.values())
        top_k = max(m.top_k for m in layers)
        self.num_slots = cap_bytes // self.slot_bytes
        least = 2 * top_k
        if self.num_slots < least:
            os.close(self.fd)
            raise InvalidRequest(
                f"expert cache memory {cap_bytes} B holds {self.num_slots} experts of "
                f"{self.slot_bytes} B; it needs at least {least} ({least * self.slot_bytes} B): "
                f"two layers' {top_k} experts",
                param="expert_cache_memory",
            )
        # Pages are touched only as slots fill, so resident memory grows to the cap, no further.
        self.memory = torch.empty(self.num_slots, self.slot_bytes, dtype=torch.uint8)
        self._np = self.memory.numpy()
        self.slots = [_Slot() for _ in range(self.num_slots)]
        self.where: dict[tuple[int, int], int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.num_slots))
        self.lock = threading.Lock()
        self.freed = threading.Condition(self.lock)
        # Reads waiting for the reader thread: a layer's own misses go before any read-ahead,
        # and read-ahead the layer did not need is dropped when the layer runs.
        self.demand: deque[int] = deque()
        self.ahead: deque[int] = deque()
        self.work = threading.Condition(self.lock)
        self._closed = False
        self.reader = threading.Thread(target=self._reader, name="slimserve-experts", daemon=True)
        self.reader.start()
        self.prefetch_enabled, self.drop_page_cache = prefetch, drop_page_cache
        self.native = True  # which kernels the slot modules run: set by the model's selection
        self._modules: dict[tuple[int, int], nn.Module] = {}
        self.stats = dict.fromkeys(
            ("hits", "prefetch_hits", "misses", "prefetch_reads", "prefetch_unused",
             "bytes_read", "waits", "prefetch_pauses"), 0,
        )  # fmt: skip
        self._judged, self._paused = (0, 0), 0
        # Layers whose experts pack alike share slot modules: layer -> format id.
        ids: dict[tuple, int] = {}
        self.formats = {
            layer: ids.setdefault(_signature(self.layouts[layer], t), len(ids))
            for layer, t in self.templates.items()
        }

    # -- slots -------------------------------------------------------------------------------
    def _claim(self, key, prefetch: bool, wait: bool) -> int | None:
        """Under the lock: a slot for `key`, pinned once for its read, or None when every slot
        is pinned (and not `wait`)."""
        while not self.lru:
            if not wait:
                return None
            self.freed.wait()
        s, _ = self.lru.popitem(last=False)
        slot = self.slots[s]
        if slot.key is not None:
            del self.where[slot.key]
            if slot.by_prefetch:
                self.stats["prefetch_unused"] += 1
        slot.key, slot.pins, slot.error, slot.by_prefetch = key, 1, None, prefetch
        slot.ready.clear()
        self.where[key] = s
        return s

    def _unpin(self, s: int) -> None:
        slot = self.slots[s]
        slot.pins -= 1
        if slot.pins == 0:
            if slot.error is not None:  # a failed read holds nothing
                del self.where[slot.key]
                slot.key = None
            self.lru[s] = None
            self.freed.notify_all()

    def _read(self, s: int) -> None:
        slot = self.slots[s]
        layer, expert = slot.key
        lay = self.layouts[layer]
        at = lay.offset + expert * lay.record
        try:
            n = os.preadv(self.fd, [self._np[s, : lay.record]], at)
            if n != lay.record:
                raise ModelLoadError(f"experts file {self.path}: short read at {at} ({n} B)")
            if self.drop_page_cache:
                os.posix_fadvise(self.fd, at, lay.record, os.POSIX_FADV_DONTNEED)
        except BaseException as e:  # the layer waiting on it re-raises it
            slot.error = e if isinstance(e, ModelLoadError) else ModelLoadError(
                f"cannot read layer {layer} expert {expert} from {self.path}: {e}"
            )
        with self.lock:
            self.stats["bytes_read"] += lay.record
        slot.ready.set()

    def _reader(self) -> None:
        while True:
            with self.lock:
                while not (self.demand or self.ahead or self._closed):
                    self.work.wait()
                if self._closed:
                    return
                s = (self.demand or self.ahead).popleft()
            self._read(s)
            with self.lock:
                self._unpin(s)

    def _queue(self, s: int, ahead: bool) -> None:
        (self.ahead if ahead else self.demand).append(s)
        self.work.notify()

    def _drop_ahead(self, layer: int, keep: set[int]) -> None:
        """Under the lock: unstarted reads ahead of `layer` that it does not need (or of a layer
        already past) give their slots back, first in line for reuse."""
        for s in list(self.ahead):
            slot = self.slots[s]
            lay, e = slot.key
            if slot.pins == 1 and (lay < layer or (lay == layer and e not in keep)):
                self.ahead.remove(s)
                del self.where[slot.key]
                slot.key, slot.pins, slot.by_prefetch = None, 0, False
                slot.ready.set()
                self.stats["prefetch_unused"] += 1
                self.lru[s] = None
                self.lru.move_to_end(s, last=False)
                self.freed.notify_all()

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Queue reads of `experts` of `layer` that are not cached, into free or unpinned slots;
        never waits."""
        if not self.prefetch_enabled or layer not in self.layouts:
            return
        if self._paused:  # read-ahead was mostly wrong lately: retry after a while
            self._paused -= 1
            return
        with self.lock:
            used, reads = self.stats["prefetch_hits"], self.stats["prefetch_reads"]
            if reads - self._judged[1] >= AHEAD_WINDOW:
                right = (used - self._judged[0]) / (reads - self._judged[1])
                self._judged = (used, reads)
                if right < AHEAD_MIN_USED:
                    self._paused = AHEAD_PAUSE
                    self.stats["prefetch_pauses"] += 1
                    return
            for e in experts:
                key = (layer, e)
                if key in self.where:
                    continue
                s = self._claim(key, prefetch=True, wait=False)
                if s is None:
                    return
                self.stats["prefetch_reads"] += 1
                self._queue(s, ahead=True)

    def fetch(self, layer: int, experts: list[int]) -> _Fetch:
        """Pin `experts` of `layer` for one pass (hits now, misses queued in order)."""
        return _Fetch(self, layer, experts)

    def _acquire(self, key, queue: bool) -> tuple[int | None, bool]:
        """Under the lock: pin `key`'s slot; returns (slot, whether it missed). A miss's read is
        queued (`queue`) or left to the caller; with `queue`, (None, False) when every slot is
        pinned."""
        s = self.where.get(key)
        if s is not None:
            slot = self.slots[s]
            if slot.pins == 0:
                del self.lru[s]
            slot.pins += 1
            if slot.by_prefetch:
                slot.by_prefetch = False
                self.stats["prefetch_hits"] += 1
            else:
                self.stats["hits"] += 1
            return s, False
        s = self._claim(key, prefetch=False, wait=not queue)
        if s is None:
            return None, False
        self.stats["misses"] += 1
        self.slots[s].pins += 1  # the pass's pin beside the read's
        if queue:
            self._queue(s, ahead=False)
        return s, True

    def module(self, s: int, layer: int) -> nn.Module:
        """The expert module whose tensors are views of slot `s`, in `layer`'s format."""
        fmt = self.formats[layer]
        mod = self._modules.get((s, fmt))
        if mod is None:
            from slimserve.kernels.select import chosen

            memo, row = {}, self.memory[s]
            template = self.templates[layer]
            fields = self.layouts[layer].fields
            for (_, dtype, shape, at), (_, t) in zip(fields, _tensors(template)):
                n = t.numel() * t.element_size()
                memo[id(t)] = _like(t, row[at : at + n].view(dtype).view(shape))
            mod = copy.deepcopy(template, memo)
            for m in mod.modules():
                names = getattr(type(m), "NATIVE", None)
                if names:
                    m.native = chosen(names, self.native)
            self._modules[(s, fmt)] = mod
        return mod

    def set_native(self, enabled: bool) -> None:
        self.native = enabled
        self._modules.clear()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.work.notify_all()
        self.reader.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __getstate__(self):
        raise TypeError("an ExpertStore is attached at load, never pickled")

    def summary(self) -> dict:
        s = dict(self.stats)
        used = s["hits"] + s["prefetch_hits"] + s["misses"]
        s.update(
            slots=self.num_slots,
            slot_bytes=self.slot_bytes,
            hit_rate=(s["hits"] + s["prefetch_hits"]) / used if used else 0.0,
        )
        return s


class _Fetch:
    """One sparse layer's pass over its active experts: `run(j, x)` computes with the j-th."""

    def __init__(self, store: ExpertStore, layer: int, experts: list[int]):
        self.store, self.layer, self.experts = store, layer, experts
        self.pinned: list[int | None] = []
        with store.lock:
            store._drop_ahead(layer, set(experts))
            for e in experts:  # claim what fits; the rest waits for slots this pass frees
                s, _ = store._acquire((layer, e), queue=True)
                if s is None:
                    break
                self.pinned.append(s)
        self.done = 0

    def run(self, j: int, x: torch.Tensor) -> torch.Tensor:
        store = self.store
        if j >= len(self.pinned):  # more experts than free slots: reuse the ones computed
            with store.lock:
                for k in range(self.done):
                    if self.pinned[k] is not None:
                        store._unpin(self.pinned[k])
                        self.pinned[k] = None
                s, unread = store._acquire((self.layer, self.experts[j]), queue=False)
            while len(self.pinned) < j:
                self.pinned.append(None)
            self.pinned.append(s)
            if unread:
                store._read(s)
                with store.lock:
                    store._unpin(s)
        s = self.pinned[j]
        slot = store.slots[s]
        if not slot.ready.is_set():
            store.stats["waits"] += 1
            slot.ready.wait()
        if slot.error is not None:
            raise slot.error
        self.done = j + 1
        return store.module(s, self.layer)(x)

    def close(self) -> None:
        with self.store.lock:
            for s in self.pinned:
                if s is not None:
                    self.store._unpin(s)
        self.pinned = []
