"""The engine on its own thread, handing outputs to per-request asyncio queues.

The Engine is not thread-safe; a lock serialises `add_request`/`abort` (called from the event
loop) with `step` (called from the engine thread). A step takes tens of milliseconds on CPU, so
a caller waits at most one step. Outputs cross threads with `call_soon_threadsafe`.

The engine is built on its own thread too, so that one thread runs every torch op. When a
second thread has run OpenMP regions (loading the model in the main thread, say), PyTorch's
OpenMP runtime keeps two thread teams on two cores and every parallel op in the engine thread
got 2-4x slower: batch-1 decode took ~35 ms per token instead of ~20 (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from slimserve.engine.engine import Engine
from slimserve.errors import CapacityError
from slimserve.outputs import RequestOutput
from slimserve.sampling_params import SamplingParams

logger = logging.getLogger("slimserve")


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], Engine], max_queue: int | None = None):
        """`make_engine` runs on the engine thread; its exceptions re-raise here."""
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.errored: BaseException | None = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._loop, args=(make_engine,), name="slimserve-engine", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    def _loop(self, make_engine: Callable[[], Engine]) -> None:
        try:
            self.engine = make_engine()
        except BaseException as e:
            self._build_error = e
            return
        finally:
            self._built.set()
        while not self._stopped:
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except BaseException as e:  # a bug, not a bad request: fail every waiter loudly
                logger.exception("engine step failed")
                self.errored = e
                self._fail_all(e)
                return
            for out in outputs:
                target = self._queues.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
                    if out.finished:
                        self._queues.pop(out.request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        for loop, queue in self._queues.values():
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self._queues.clear()

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        queue: asyncio.Queue | None = None,
    ) -> RequestStream:
        """Queue a request now (bad input raises here, before any response starts) and return
        the stream of its outputs. Several requests may share one queue; outputs carry ids."""
        if self.errored is not None:
            raise RuntimeError("the engine has stopped after an internal error")
        queue = queue if queue is not None else asyncio.Queue()
        with self._lock:
            if self.max_queue is not None and len(self.engine.scheduler.waiting) >= self.max_queue:
                raise CapacityError(f"the queue is full ({self.max_queue} waiting); retry later")
            self.engine.add_request(prompt, params, request_id=request_id)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)
            self.engine.abort(request_id)

    def stats(self):
        with self._lock:
            return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)


class RequestStream:
    """Outputs of one request; `close()` aborts it unless it finished (call it in `finally`)."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine = engine
        self.request_id = request_id
        self.queue = queue
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"engine failed: {item}") from item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
