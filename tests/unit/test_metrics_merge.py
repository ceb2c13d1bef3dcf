"""The router's /metrics: replicas' expositions (real prometheus_client output) merged, each
series labelled with its replica, and a replica that did not answer marked down."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from slimserve.distributed.metrics import merge_metrics


def _replica_text(i: int) -> str:
    r = CollectorRegistry()
    Counter("slimserve_requests", "Finished", ["status"], registry=r).labels("ok").inc(3 + i)
    Histogram("slimserve_ttft_seconds", "TTFT", registry=r, buckets=(0.1, 1)).observe(0.5 * (i + 1))
    Gauge("slimserve_kv_cache_blocks_used", "Used", registry=r).set(7 * i)
    return generate_latest(r).decode()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_replica_keeps_its_series_under_its_label():
    merged = merge_metrics({0: _replica_text(0), 1: _replica_text(1), 2: None}).decode()
    fams = _families(merged)
    done = {(s.labels["replica"], s.labels["status"]): s.value
            for s in fams["slimserve_requests"].samples if s.name.endswith("_total")}  # fmt: skip
    assert done == {("0", "ok"): 3.0, ("1", "ok"): 4.0}
    assert fams["slimserve_requests"].type == "counter"
    used = {s.labels["replica"]: s.value for s in fams["slimserve_kv_cache_blocks_used"].samples}
    assert used == {"0": 0.0, "1": 7.0}
    hist = fams["slimserve_ttft_seconds"]
    assert hist.type == "histogram"
    sums = {s.labels["replica"]: s.value for s in hist.samples if s.name.endswith("_sum")}
    assert sums == {"0": 0.5, "1": 1.0}
    up = {s.labels["replica"]: s.value for s in fams["slimserve_replica_up"].samples}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
    # one HELP and TYPE per family, not one per replica
    assert merged.count("# TYPE slimserve_requests_total counter") == 1


def test_no_replica_answering_still_gives_a_valid_exposition():
    fams = _families(merge_metrics({0: None, 1: None}).decode())
    assert set(fams) == {"slimserve_replica_up"}
    assert [s.value for s in fams["slimserve_replica_up"].samples] == [0.0, 0.0]
