"""Run an app (server/api.py) under uvicorn until SIGINT or SIGTERM, draining first.

The first signal starts a drain: new requests get 503 with Retry-After and /health turns 503
(a load balancer moves traffic away), requests in flight run to their end for up to
`drain_timeout` seconds, then whatever is left ends with an error event (streams) or a 503
(waiting non-streamed requests), and the process exits 0. A second signal stops at once.
When the engine cannot go on (AsyncEngine.on_fatal), the server stops and the process exits 1,
so that a supervisor restarts it rather than keeping a process that fails every request.
"""

from __future__ import annotations

import signal
import sys
import time

import uvicorn
from fastapi import FastAPI

from slimserve.errors import CapacityError

DRAIN_TIMEOUT_S = 30.0  # default time in-flight requests get to finish at shutdown
CLOSE_TIMEOUT_S = 5  # then, for connections to close


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self.app, self.drain_timeout = app, drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self.app.state.draining = True
        else:  # a second signal: stop now
            super().handle_exit(sig, frame)
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            engine = self.app.state.server.engine
            if not engine.in_flight():
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                engine.fail_all(CapacityError("the server is shutting down; retry elsewhere"))
                self.should_exit = True
        return await super().on_tick(counter)


def run(app: FastAPI, host: str, port: int, drain_timeout: float = DRAIN_TIMEOUT_S) -> int:
    """Serve until stopped; 0 after a clean shutdown, 1 when the server never started or the
    engine failed for good."""
    server = _DrainingServer(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning",
            timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
        ),
        app,
        drain_timeout,
    )  # fmt: skip
    engine = app.state.server.engine

    def fatal(error: BaseException) -> None:
        print(f"[slimserve] stopping: the engine cannot go on ({error})", file=sys.stderr)
        server.should_exit = True

    engine.on_fatal = fatal
    # uvicorn re-raises the signal that stopped it once it has shut down (restoring these
    # handlers first); absorb it so that SIGINT/SIGTERM end the process with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started and engine.errored is None else 1
