"""The agent's Prometheus metrics (issue 13/13): what a node is doing, for Prometheus and Grafana.

`AgentMetrics` owns the agent's own `CollectorRegistry`. The daemon tells it of each batch served
(`served`), hands it what each labelled batch taught (`learnt`) and each event it publishes (`event`): events already say everything that happens to
a node (a drift, a help request and its outcome, a helper installed or discarded, a refusal), so
the metrics follow from them and the daemon needs no increment of its own per metric. Counters
the daemon and its bus client keep anyway (operation timings, bytes, reconnects, the inbox) are
read when Prometheus scrapes, as is the checkpoint file's age.

Names follow Prometheus' conventions: units in the names, counters end in ``_total``, label sets
are bounded (no node id: Prometheus' ``instance`` label, or a relabelled ``node`` label on the
scrape target, tells the nodes apart). The operations manual lists them all.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from service.metrics import BusClient, BusClientCollector

#: Labelled batches the rolling served and target errors average over.
ROLLING_BATCHES = 10
#: Where a refused message came from (`AgentDaemon._reject`'s ``context``); anything else is ``other``.
REFUSAL_REASONS = ("batch", "labels", "reply_to", "kt_blob", "global_model", "decode", "chunk", "size", "topic", "handler")
#: Seconds from a drift to its helper serving: the drift-to-helper histogram's buckets.
DRIFT_TO_HELPER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Timing(Protocol):
    """A running count and sum of seconds (`agent.daemon.RunningMean`)."""

    count: int
    total: float


class BatchOutcome(Protocol):
    """What `AgentMetrics.batch` reads of a `agent.learner.BatchResult`."""

    served_error: float | None
    target_error: float | None

    @property
    def learnt(self) -> bool: ...


class AgentMetrics:
    """Every metric of one agent, in a registry of its own (module docstring).

    `client`: the agent's bus client; `timings`: the daemon's running sums of seconds per
    operation (``batch``, ``predict``, ``train``, ``pick``, ``install``), read at scrape time;
    `checkpoint_path`: the checkpoint file, whose age is reported; `pool_size`: helpers pooled now;
    `info`: labels of the constant ``clue_agent_info`` (the model's ``arch_id`` and ``lineage``).
    """

    def __init__(
        self,
        *,
        client: BusClient,
        timings: Mapping[str, Timing],
        checkpoint_path: Path,
        pool_size: Callable[[], int],
        info: Mapping[str, str],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches_served = Counter("clue_agent_batches_served", "request batches answered with a prediction", registry=r)
        self.batches_trained = Counter(
            "clue_agent_batches_trained", "training steps on labelled batches: one per batch, or per labels message when its labels come later in parts", registry=r
        )
        self.served_error = Gauge(
            "clue_agent_served_error_ratio", f"error of the served (ensemble) predictions over the last {ROLLING_BATCHES} labelled batches", registry=r
        )
        self.target_error = Gauge(
            "clue_agent_target_error_ratio", f"error of the target model alone over the last {ROLLING_BATCHES} labelled batches", registry=r
        )
        self.drifts = Counter("clue_agent_drift_detections", "drifts detected", registry=r)
        self.last_drift = Gauge("clue_agent_last_drift_timestamp_seconds", "Unix time of the last drift detected (0: none yet)", registry=r)
        self.unhelped = Gauge(
            "clue_agent_drift_unhelped_batches",
            "batches served since the last drift while no helper has been installed since it (0: none pending)", registry=r,
        )
        self.help_requests = Counter(
            "clue_agent_help_requests", "KT requests to a helper, by outcome: installed, failed (no or an error answer), refused (the blob)",
            ["outcome"], registry=r,
        )
        self.help_flows = Counter(
            "clue_agent_help_flows", "drifts that asked for help, by outcome: helped, no_candidates (the MdS named none), no_helper (none answered usably)",
            ["outcome"], registry=r,
        )
        self.installed = Counter("clue_agent_helpers_installed", "boosted helpers installed into the pool", registry=r)
        self.discarded = Counter("clue_agent_helpers_discarded", "helpers discarded from the pool", registry=r)
        self.promoted = Counter("clue_agent_helpers_promoted", "live helper branches promoted into the target", registry=r)
        self.kt_in = Counter("clue_agent_kt_received_bytes", "bytes of the KT blobs installed", registry=r)
        self.kt_out = Counter("clue_agent_kt_sent_bytes", "bytes of the KT blobs served as a helper", registry=r)
        self.kt_served = Counter("clue_agent_kt_served", "KT requests answered with a blob, as a helper", registry=r)
        self.drift_to_helper = Histogram(
            "clue_agent_drift_to_helper_seconds", "seconds from a drift to its helper installed (query, transfer and install)",
            buckets=DRIFT_TO_HELPER_BUCKETS, registry=r,
        )
        self.refused = Counter("clue_agent_messages_refused", "messages the agent refused, by where they came from", ["reason"], registry=r)
        self.info = Gauge("clue_agent_info", "the node's model: architecture and lineage (always 1)", list(info), registry=r)
        self.info.labels(**info).set(1)
        for outcome in ("installed", "failed", "refused"):
            self.help_requests.labels(outcome)
        for outcome in ("helped", "no_candidates", "no_helper"):
            self.help_flows.labels(outcome)
        for reason in (*REFUSAL_REASONS, "other"):
            self.refused.labels(reason)
        r.register(BusClientCollector(client, "clue_agent"))
        r.register(_ScrapeTime(timings, checkpoint_path, pool_size))
        self._lock = threading.Lock()
        self._served: deque[float] = deque(maxlen=ROLLING_BATCHES)
        self._target: deque[float] = deque(maxlen=ROLLING_BATCHES)
        self._unhelped: int | None = None

    def served(self) -> None:
        """One request batch answered (the worker thread)."""
        self.batches_served.inc()
        with self._lock:
            if self._unhelped is not None:
                self._unhelped += 1
                self.unhelped.set(self._unhelped)

    def learnt(self, result: BatchOutcome) -> None:
        """What a batch's labels showed, with the batch or later (the worker thread); nothing when
        the batch had none or its training step was rolled back."""
        if not result.learnt:
            return
        self.batches_trained.inc()
        with self._lock:
            if result.served_error is not None:
                self._served.append(result.served_error)
                self.served_error.set(sum(self._served) / len(self._served))
            if result.target_error is not None:
                self._target.append(result.target_error)
                self.target_error.set(sum(self._target) / len(self._target))

    def event(self, kind: str, detail: Mapping[str, Any]) -> None:
        """One event the agent published (`AgentDaemon._event`)."""
        if kind == "drift":
            self.drifts.inc()
            self.last_drift.set(time.time())
            with self._lock:
                self._unhelped = 0
                self.unhelped.set(0)
        elif kind == "helper_installed":
            self.installed.inc()
            self.help_requests.labels("installed").inc()
            self.kt_in.inc(detail.get("bytes", 0))
            self.drift_to_helper.observe(float(detail.get("ms", 0.0)) / 1000.0)
            with self._lock:
                self._unhelped = None
                self.unhelped.set(0)
        elif kind == "kt_failed":
            self.help_requests.labels("failed").inc()
        elif kind == "help_done":
            self.help_flows.labels("helped").inc()
        elif kind == "help_failed":
            self.help_flows.labels("no_candidates" if detail.get("stage") == "query" else "no_helper").inc()
        elif kind == "helper_discarded":
            self.discarded.inc()
        elif kind == "helper_promoted":
            self.promoted.inc()
        elif kind == "kt_served":
            self.kt_served.inc()
            self.kt_out.inc(detail.get("bytes", 0))
        elif kind == "rejected":
            reason = detail.get("context")
            self.refused.labels(reason if reason in REFUSAL_REASONS else "other").inc()
            if reason == "kt_blob":
                self.help_requests.labels("refused").inc()


class _ScrapeTime(Collector):
    """What the daemon counts anyway, read when Prometheus scrapes."""

    def __init__(self, timings: Mapping[str, Timing], checkpoint_path: Path, pool_size: Callable[[], int]) -> None:
        self.timings = timings
        self.checkpoint_path = checkpoint_path
        self.pool_size = pool_size
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        seconds = SummaryMetricFamily(
            "clue_agent_operation_seconds",
            "seconds spent per operation: batch (all of it), predict, train, pick (a helper's parameter picker), install (building a boosted helper)",
            labels=["operation"],
        )
        for name, timing in self.timings.items():
            seconds.add_metric([name], count_value=timing.count, sum_value=timing.total)
        yield seconds
        try:
            written = os.stat(self.checkpoint_path).st_mtime
        except OSError:
            written = self.started  # none yet: as old as this daemon, so a node that never writes one is noticed
        yield GaugeMetricFamily(
            "clue_agent_checkpoint_age_seconds", "seconds since the checkpoint file was written (since the daemon started, when there is none)",
            value=max(time.time() - written, 0.0),
        )
        yield GaugeMetricFamily("clue_agent_helpers_pooled", "helpers in the pool now", value=self.pool_size())


__all__ = ["DRIFT_TO_HELPER_BUCKETS", "REFUSAL_REASONS", "ROLLING_BATCHES", "AgentMetrics"]
