"""Serving metrics with vLLM's definitions, computed from per-request timelines.

TTFT: send -> first chunk carrying content. ITL: gaps between content chunks.
TPOT: (E2E - TTFT) / (output tokens - 1). E2E: send -> last byte.
Goodput: completed requests per second that meet every SLO given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0  # seconds, any monotonic clock
    ttft: float | None = None  # seconds after start
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def as_dict(self) -> dict:
        return asdict(self) | {"tpot": self.tpot}


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    """mean/median/p90/p99 (in ms by default); None when there are no values."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values) * scale
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(
    records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None
) -> dict:
    """Aggregate figures for one run of `duration` seconds. SLOs in ms: ttft_ms, tpot_ms, e2e_ms."""
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    result = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + in_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats([g for r in done for g in r.itl]),
        "e2e_ms": _stats([r.e2e for r in done]),
    }
    if slos:

        def meets(r: RequestRecord) -> bool:
            checks = {"ttft_ms": r.ttft, "tpot_ms": r.tpot, "e2e_ms": r.e2e}
            return all(checks[k] is not None and checks[k] * 1000 <= v for k, v in slos.items())

        result["goodput"] = sum(1 for r in done if meets(r)) / duration
        result["slos"] = dict(slos)
    return result


def parse_slos(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}."""
    if not text:
        return {}
    slos = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("ttft_ms", "tpot_ms", "e2e_ms"):
            raise ValueError(f"unknown SLO {key!r} (ttft_ms, tpot_ms, e2e_ms)")
        slos[key.strip()] = float(value)
    return slos
