"""Prometheus metrics: request-level histograms we observe, engine state read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class EngineCollector:
    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        s = self.async_engine.stats()
        yield GaugeMetricFamily(
            "slimserve_num_requests_running", "Requests in the batch", value=s.running
        )
        yield GaugeMetricFamily(
            "slimserve_num_requests_waiting", "Requests queued", value=s.waiting
        )
        used = s.kv_blocks_total - s.kv_blocks_free
        yield GaugeMetricFamily(
            "slimserve_kv_cache_usage_ratio",
            "KV blocks in use / total",
            value=used / max(s.kv_blocks_total, 1),
        )
        yield GaugeMetricFamily("slimserve_kv_cache_blocks_used", "KV blocks in use", value=used)
        for name, doc, value in (
            ("slimserve_prefix_cache_queries", "Prompt tokens looked up", s.prefix_cache_queries),
            ("slimserve_prefix_cache_hits", "Prompt tokens found cached", s.prefix_cache_hits),
            ("slimserve_engine_steps", "Engine steps run", s.steps),
            ("slimserve_tokens_computed", "Tokens the model ran", s.tokens_computed),
            ("slimserve_spec_decode_draft_tokens", "Draft tokens verified", s.spec_draft_tokens),
            (
                "slimserve_spec_decode_accepted_tokens",
                "Draft tokens accepted",
                s.spec_accepted_tokens,
            ),
            ("slimserve_spec_decode_verifies", "Request-steps with drafts", s.spec_verifies),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "slimserve_recomputed_tokens",
            "Tokens run again whose KV the request had computed before (after a preemption)",
            value=s.recomputed_tokens,
        )
        yield _labelled(
            CounterMetricFamily, "slimserve_preemptions",
            "Requests preempted: swap (a tier kept their published blocks) or recompute", "mode",
            {"swap": s.preemptions_swap, "recompute": s.preemptions - s.preemptions_swap},
        )  # fmt: skip
        yield from _tier_metrics(s)
        yield GaugeMetricFamily(
            "slimserve_spec_decode_mean_accepted_length",
            "Tokens a verify yields on average (accepted drafts + 1)",
            value=1 + s.spec_accepted_tokens / max(s.spec_verifies, 1),
        )
        yield _labelled(
            CounterMetricFamily, "slimserve_admission_rejections",
            "Requests refused before they queued, by reason", "reason",
            {reason: getattr(self.async_engine, "rejections", {}).get(reason, 0)
             for reason in ADMISSION_REASONS},
        )  # fmt: skip
        engine = getattr(self.async_engine, "engine", None)
        if engine is not None:
            parts = GaugeMetricFamily(
                "slimserve_memory_bytes",
                "Bytes of each part --memory-budget covers, and the resident set",
                labels=["part"],
            )
            for part, value in engine.memory().items():
                parts.add_metric([part], value)
            if engine.config.memory_budget is not None:
                parts.add_metric(["budget"], engine.config.memory_budget)
            yield parts
        store = getattr(getattr(engine, "model", None), "expert_store", None)
        if store is not None:  # experts on disk (loader/experts.py)
            st = dict(store.stats)
            for key, doc in (
                ("hits", "Expert uses found in the RAM cache"),
                ("prefetch_hits", "Expert uses found there because they were read ahead"),
                ("misses", "Expert uses read from the experts file when needed"),
                ("prefetch_reads", "Experts read ahead"),
                ("bytes_read", "Bytes read from the experts file"),
            ):
                yield CounterMetricFamily(f"slimserve_expert_cache_{key}", doc, value=st[key])
            yield GaugeMetricFamily(
                "slimserve_expert_cache_bytes",
                "Expert cache capacity",
                value=store.num_slots * store.slot_bytes,
            )


def _labelled(family, name: str, doc: str, label: str, values: dict):
    """One metric family with a series per value of `label`."""
    metric = family(name, doc, labels=[label])
    for key, value in values.items():
        metric.add_metric([key], value)
    return metric


def _tier_metrics(s):
    """The KV tiers: RAM (the block pool) and, when configured, disk (kv_cache/tiers.py)."""
    yield _labelled(
        CounterMetricFamily, "slimserve_kv_tier_hits", "Prompt tokens served from each KV tier",
        "tier", {"ram": s.prefix_cache_hits - s.tier_hits, "disk": s.tier_hits},
    )  # fmt: skip
    yield _labelled(
        GaugeMetricFamily, "slimserve_kv_tier_bytes", "Bytes each KV tier holds", "tier",
        {"ram": s.kv_ram_bytes, "disk": s.tier_bytes},
    )  # fmt: skip
    yield GaugeMetricFamily("slimserve_kv_sessions", "Agent sessions kept", value=s.sessions)
    yield GaugeMetricFamily(
        "slimserve_kv_session_pinned_blocks",
        "KV block references kept sessions hold",
        value=s.session_pinned_blocks,
    )
    yield _labelled(
        CounterMetricFamily, "slimserve_kv_session_releases",
        "Sessions let go: their time to live ran out, or the pool was short", "reason",
        {"expired": s.sessions_expired, "pressure": s.sessions_pressed},
    )  # fmt: skip
    for name, doc, value in (
        ("slimserve_kv_tier_loads", "KV pages loaded from the disk tier", s.tier_loads),
        ("slimserve_kv_tier_saves", "KV pages written to the disk tier", s.tier_saves),
        (
            "slimserve_kv_tier_corrupt_records",
            "Disk tier records that failed verification (recomputed, never served)",
            s.tier_corrupt,
        ),
    ):
        yield CounterMetricFamily(name, doc, value=value)


# Why a request was refused before it queued (engine/async_engine.py counts them).
ADMISSION_REASONS = ("queue_full", "invalid", "context_length", "kv_capacity", "sessions_full")


def priority_class(priority: int) -> str:
    return "high" if priority < 0 else "low" if priority > 0 else "normal"


class Metrics:
    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "slimserve_requests", "Finished requests by status", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "slimserve_prompt_tokens", "Prompt tokens received", registry=r
        )
        self.generation_tokens = Counter(
            "slimserve_generation_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            "slimserve_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "slimserve_time_per_output_token_seconds",
            "Mean time per output token after the first",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "slimserve_e2e_request_latency_seconds",
            "Request latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_by_priority = Histogram(
            "slimserve_time_to_first_token_by_priority_seconds",
            "Time to first token by the request's priority: high (< 0), normal (0), low (> 0)",
            ["priority"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "slimserve_request_queue_time_seconds",
            "Time from arrival to the first step a request ran in",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(async_engine))

    def observe(
        self,
        status: str,
        prompt_tokens: int,
        output_tokens: int,
        start: float,
        first: float | None,
        end: float,
        priority: int = 0,
        queued: float | None = None,
    ) -> None:
        self.requests.labels(status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e.observe(end - start)
        if queued is not None:
            self.queue_time.observe(queued)
        if first is not None:
            self.ttft.observe(first - start)
            self.ttft_by_priority.labels(priority_class(priority)).observe(first - start)
            if output_tokens > 1:
                self.tpot.observe((end - first) / (output_tokens - 1))
