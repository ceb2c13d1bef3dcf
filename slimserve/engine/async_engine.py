"""The engine on its own thread, fed by a command queue, handing outputs to asyncio queues.

The Engine is not thread-safe, and a step takes tens to hundreds of milliseconds, so nothing on
the event loop ever waits for one: `submit` tokenizes and validates on a worker thread
(Engine.make_request reads only immutable state), then puts an "add" command on a queue; `abort`
puts an "abort"; the engine thread drains every command before each step. `stats()` returns the
snapshot the engine thread publishes after each step. Outputs cross back with
`call_soon_threadsafe`. The only lock guards the map of request ids to their asyncio queues, and
is held for a dict operation, never across a step.

The engine is built on its own thread too, so that one thread runs every torch op. When a
second thread has run OpenMP regions (loading the model in the main thread, say), PyTorch's
OpenMP runtime keeps two thread teams on two cores and every parallel op in the engine thread
gets several times slower (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from slimserve.engine.engine import Engine
from slimserve.errors import CapacityError, EngineDead, RequestFailed, SlimserveError
from slimserve.outputs import RequestOutput
from slimserve.sampling_params import SamplingParams

logger = logging.getLogger("slimserve")

IDLE_WAIT_S = 0.5
# Admission rejection reasons by error class (the rest: "invalid").
_REASONS = {
    "ContextLengthExceeded": "context_length",
    "CapacityError": "kv_capacity",
}  # how long an idle engine thread sleeps between checks for shutdown


class AsyncEngine:
    def __init__(
        self,
        make_engine: Callable[[], Engine],
        max_queue: int | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        """`make_engine` runs on the engine thread; its exceptions re-raise here. `on_fatal` is
        called (on the engine thread) once the engine cannot go on: every waiter has had an error
        by then, and the process should exit so that a supervisor restarts it."""
        self.max_queue = max_queue
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()  # guards _queues and _pending, never held across a step
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # adds reserved (_admissible) and not yet drained (for max_queue)
        self.rejections: dict[str, int] = {}  # requests refused at admission, by reason
        self.errored: BaseException | None = None
        self._stats = None
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._loop, args=(make_engine,), name="slimserve-engine", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self, make_engine: Callable[[], Engine]) -> None:
        try:
            self.engine = make_engine()
            try:
                self.engine.warm_up()  # on this thread: the one that runs every step
            except Exception as e:  # the first request meets it, through the usual containment
                logger.warning("warming the engine up failed: %r", e)
            self._stats = self.engine.stats()
        except BaseException as e:
            self._build_error = e
            return
        finally:
            self._built.set()
        while not self._stopped:
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                if self.engine.idle():  # kept sessions expire while nothing runs too
                    self._stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # the engine is broken: fail every waiter loudly
                logger.error("the engine cannot go on: %r", e)
                self._fail_all(e, fatal=True)
                if self.on_fatal is not None:
                    self.on_fatal(e)
                return
            self._stats = self.engine.stats()
            for out in outputs:
                self._post(out.request_id, out, out.finished)
        self.engine.close()  # a clean stop: the disk tier writes what it has queued

    def _drain(self) -> None:
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd == "add":
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.enqueue(arg)
                except Exception as e:  # e.g. a duplicate id: that request alone fails
                    self._post(arg.request_id, e, True)
            else:
                self.engine.abort(arg)
        self._stats = self.engine.stats()

    def _post(self, request_id: str, item, last: bool) -> None:
        with self._lock:
            target = self._queues.pop(request_id, None) if last else self._queues.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, error: BaseException, fatal: bool = False) -> None:
        with self._lock:  # with submit's check of `errored`: no waiter registers after this
            if fatal:
                self.errored = error
            targets, self._queues = list(self._queues.values()), {}
        for loop, q in targets:
            loop.call_soon_threadsafe(q.put_nowait, error)

    # -- any thread -------------------------------------------------------------------------
    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        queue: asyncio.Queue | None = None,
        priority: int = 0,
    ) -> RequestStream:
        """Queue a request (bad input raises here, before any response starts) and return the
        stream of its outputs; several requests may share one queue, outputs carry ids. Its CPU
        work (tokenizing a text prompt, compiling its grammar) runs on a worker thread, so the
        event loop serves other streams meanwhile."""
        self._admissible(params)
        try:
            req = await asyncio.to_thread(
                self.engine.make_request, prompt, params, request_id, priority
            )
        except BaseException as e:
            self._unreserve()
            if isinstance(e, SlimserveError):
                self._reject(_REASONS.get(type(e).__name__, "invalid"))
            raise
        return self._queue(req, queue)

    def _unreserve(self) -> None:
        with self._lock:
            self._pending -= 1

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _admissible(self, params: SamplingParams) -> None:
        """Refuse now (a dead engine, a full queue, too many sessions) or reserve the request's
        place in the queue: counted from here, while its CPU work runs on a worker thread, so
        that requests arriving together cannot all pass the queue's bound."""
        if self.errored is not None:
            raise EngineDead("the engine has stopped after an internal error")
        try:
            self.engine.check_session(params.session_id)  # a 400 before the response starts
        except SlimserveError:
            self._reject("sessions_full")
            raise
        with self._lock:
            waiting = self._stats.waiting + self._pending if self._stats else self._pending
            if self.max_queue is not None and waiting >= self.max_queue:
                self._reject("queue_full")
                raise CapacityError(f"the queue is full ({self.max_queue} waiting); retry later")
            self._pending += 1

    def _queue(self, req, queue: asyncio.Queue | None) -> RequestStream:
        request_id = req.request_id
        q = queue if queue is not None else asyncio.Queue()
        with self._lock:
            if self.errored is not None:
                self._pending -= 1
                raise EngineDead("the engine has stopped after an internal error")
            self._queues[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", req))
        self._wake.set()
        return RequestStream(self, request_id, q)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wake.set()

    def in_flight(self) -> int:
        """Requests submitted whose outputs someone still waits for."""
        with self._lock:
            return len(self._queues)

    def fail_all(self, error: BaseException) -> None:
        """End every request in flight with `error` (a drain past its deadline) and abort them."""
        with self._lock:
            ids = list(self._queues)
        self._fail_all(error)
        for request_id in ids:
            self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self):
        """The engine's stats as of its last step (or drained command)."""
        return self._stats

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
        if isinstance(item, SlimserveError):
            raise item
        if isinstance(item, BaseException):
            raise EngineDead(f"the engine stopped: {item}") from item
        self.finished = item.finished
        if item.error is not None:
            raise RequestFailed(item.error)
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
