"""The MdS's Prometheus metrics: nodes known and online per (architecture, lineage), the query
latency, and what it answered, refused or ignored.

The node counts and counters are read from the store and the service when Prometheus scrapes;
only the latency histogram is observed as queries are answered. The registry is the MdS's own
(`service.metrics`); the bus client's metrics come with it, prefixed ``clue_mds``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.metrics import BusClient, BusClientCollector

#: Seconds from a query's receipt to its answer sent: the histogram's buckets (a top-k over a few
#: thousand nodes takes well under a millisecond; a busy MdS queues).
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_QUERY_OUTCOMES = {"answered": "answered", "rejected": "rejected", "undecodable_queries": "undecodable", "unanswerable": "unanswerable"}
_META_OUTCOMES = {"meta_applied": "applied", "meta_future": "future", "meta_rejected": "rejected", "meta_removed": "removed"}


class MdsMetrics:
    """The MdS's registry: `query_seconds` to observe, the rest read at scrape time.

    `group_counts`: `mds.store.NodeStore.group_counts`; `stats`: `MetadataService.stats`.
    """

    def __init__(self, client: BusClient, group_counts: Callable[[], Mapping[tuple[str, str], tuple[int, int]]], stats: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.query_seconds = Histogram(
            "clue_mds_query_duration_seconds", "seconds from a helper query's receipt to its answer sent", buckets=QUERY_BUCKETS, registry=self.registry
        )
        self.registry.register(BusClientCollector(client, "clue_mds"))
        self.registry.register(_MdsState(group_counts, stats))


class _MdsState(Collector):
    def __init__(self, group_counts: Callable[[], Mapping[tuple[str, str], tuple[int, int]]], stats: Callable[[], Mapping[str, Any]]) -> None:
        self.group_counts = group_counts
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        known = GaugeMetricFamily("clue_mds_nodes", "nodes with metadata, per architecture and lineage", labels=["arch_id", "lineage"])
        online = GaugeMetricFamily("clue_mds_nodes_online", "nodes online (retained status), per architecture and lineage", labels=["arch_id", "lineage"])
        for (arch_id, lineage), (n, n_online) in sorted(self.group_counts().items()):
            known.add_metric([arch_id, lineage], n)
            online.add_metric([arch_id, lineage], n_online)
        yield known
        yield online
        stats = self.stats()
        queries = CounterMetricFamily("clue_mds_queries", "helper queries by outcome", labels=["outcome"])
        for key, outcome in _QUERY_OUTCOMES.items():
            queries.add_metric([outcome], stats[key])
        yield queries
        meta = CounterMetricFamily("clue_mds_meta_messages", "node metadata messages by outcome", labels=["outcome"])
        for key, outcome in _META_OUTCOMES.items():
            meta.add_metric([outcome], stats[key])
        yield meta
        yield CounterMetricFamily("clue_mds_bad_input", "messages refused as malformed (metadata, status)", value=stats["bad_input"])
        yield CounterMetricFamily("clue_mds_worker_errors", "messages whose handler raised", value=stats["worker_errors"])


__all__ = ["QUERY_BUCKETS", "MdsMetrics"]
