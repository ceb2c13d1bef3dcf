"""One /metrics for a router over several engine replicas: each replica's Prometheus text,
every series labelled with its replica, merged into one exposition. A scrape through the
router otherwise reached whichever replica it was routed to, so counters jumped between
replicas' values from one scrape to the next."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class _Merged:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_metrics(texts: dict[int, str | None]) -> bytes:
    """Replica index -> its /metrics text (None: it did not answer) to one exposition in which
    every sample carries `replica="<index>"`, plus `slimserve_replica_up` per replica."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "slimserve_replica_up", "Whether the replica answered this scrape", labels=["replica"]
    )
    for index, text in sorted(texts.items()):
        up.add_metric([str(index)], 0 if text is None else 1)
        for fam in text_string_to_metric_families(text or ""):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            merged.samples.extend(
                Sample(s.name, {**s.labels, "replica": str(index)}, s.value, s.timestamp,
                       s.exemplar)  # fmt: skip
                for s in fam.samples
            )
    return generate_latest(_Merged([*families.values(), up]))
