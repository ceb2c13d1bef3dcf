"""Run an app from the factory (server/api.py) under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import signal

import uvicorn
from fastapi import FastAPI

GRACEFUL_SHUTDOWN_S = 30  # how long in-flight requests may take to finish at shutdown


def run(app: FastAPI, host: str, port: int) -> int:
    """Serve until stopped; 0 after a clean shutdown, 1 when the server never started."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )  # fmt: skip
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; absorb it
    # so that SIGINT/SIGTERM end the process with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
