"""The FedAvg aggregator of the fleet simulator's baseline (ARCHITECTURE.md §7).

Every `every` batches, the round's participants (`agent.fl.participants`) publish a `ModelUpdate`
on `fl/{job}/update/{id}`; this service collects them and, once all `per_round` have come, or
`round_timeout` s after the first one came, publishes the sample-weighted average as a
`GlobalModel` on `fl/{job}/global`. Models of ~2 MB travel chunked; the client reassembles them.

Rounds:

- An update counts only if its topic, `node_id` and `job` agree and its sender is a participant
  of its round; anything else is ignored and counted (`stats()`): `non_participant`, `duplicate`
  (the sender already counted in that round: a QoS 1 redelivery), `stale` (a round at or below the
  last one published), `mismatch` (names, shapes or dtypes other than the first update accepted),
  `invalid` (not a `ModelUpdate`, or undecodable).
- Published rounds only go up: publishing round `r` drops any open round below `r` (its
  updates are superseded), so a node may simply adopt every global model it receives.
- At most `max_open_rounds` rounds collect at once; a new round beyond that drops the oldest.

The global model goes out at QoS 1, **not retained**: a retained message must fit in one MQTT
message and a model does not (the client refuses to chunk a retained payload). Nodes keep a
persistent session, so the broker queues a global model published while a node is briefly
disconnected; a node that joins later adopts the next round's model.

    python -m edge_sim.aggregator --broker mqtt://127.0.0.1:1883 --job demo --every 10 \\
        --members edge-0,edge-1,edge-2,edge-3 --per-round 3

Settings, as every daemon's (`service.settings`): a TOML file (`--config`), then
`CLUE_AGGREGATOR_*` environment variables (`CLUE_AGGREGATOR_MEMBERS=edge-0,edge-1`), then flags.
Exit codes (`service.exit_codes`): 0 after SIGTERM/SIGINT, 78 for a bad setting, 1 for a crash.
Logs go to stderr, or to the journal under systemd (`service.logs`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from agent.fl import FlConfig, FlRejected, fedavg, global_from_tensors, layout, participants
from broker import topics
from broker.client import ErrorEvent, InboxItem, MqttClient
from broker.errors import BusError
from broker.wire import ModelUpdate
from service.metrics import BusClientCollector, MetricsSettings, metrics_server
from service.runner import WorkerDaemon, serve
from service.settings import BrokerSettings, DaemonSettings
from service.worker import InboxWorker

log = logging.getLogger("clue.aggregator")

_IGNORED = ("non_participant", "duplicate", "stale", "mismatch", "invalid")


@dataclass
class _Round:
    number: int
    expected: frozenset[str]
    opened_at: float
    updates: dict[str, ModelUpdate] = field(default_factory=dict)


class FedAvgAggregator(InboxWorker[InboxItem]):
    """Averages each round's updates of one job and publishes the global model (module docstring).

    `start()` subscribes and starts the worker thread that takes the client's inbox; its `tick`
    averages the rounds whose time is up. The caller starts and stops the client.
    """

    def __init__(
        self,
        client: MqttClient,
        cfg: FlConfig,
        *,
        round_timeout: float = 30.0,
        max_open_rounds: int = 4,
    ) -> None:
        if not round_timeout > 0:
            raise ValueError("round_timeout must be > 0 s")
        if max_open_rounds < 1:
            raise ValueError("max_open_rounds must be >= 1")
        super().__init__(client, name=f"fedavg-{cfg.job}")
        self.client = client
        self.cfg = cfg
        self.round_timeout = round_timeout
        self.max_open_rounds = max_open_rounds
        self._topic = topics.fl_global(cfg.job)
        self._open: dict[int, _Round] = {}
        self._last_round = -1
        self._layout: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            (
                "rounds_published",
                "rounds_partial",
                "rounds_dropped",
                "updates_received",
                "updates_accepted",
                "updates_used",
                "publish_failed",
                "errors",
                *(f"ignored_{k}" for k in _IGNORED),
            ),
            0,
        )

    def start(self) -> "FedAvgAggregator":
        """Start the worker thread and subscribe to `fl/{job}/update/+`; stopping abandons open rounds."""
        super().start()
        self.client.subscribe(topics.fl_updates(self.cfg.job), 1)
        log.info(
            "aggregating job %s: %d of %d members per round, every %d batches",
            self.cfg.job, self.cfg.per_round, len(self.cfg.members), self.cfg.every,
        )
        return self

    def stats(self) -> dict[str, int]:
        """Counters (`errors` with the worker's), plus `updates_ignored` (their sum), `open_rounds`
        and `last_round` (-1: none)."""
        with self._lock:
            out = dict(self._stats, open_rounds=len(self._open), last_round=self._last_round)
        out["errors"] += self.errors
        out["updates_ignored"] = sum(out[f"ignored_{k}"] for k in _IGNORED)
        return out

    # --- the worker ----------------------------------------------------------------------

    def tick(self) -> None:
        """Average the rounds whose `round_timeout` has passed."""
        self._expire(time.monotonic())

    def handle(self, item: InboxItem) -> None:
        """Take one inbox item: an update joins its round (module docstring)."""
        if isinstance(item, ErrorEvent):
            if item.context in ("decode", "chunk", "size"):
                self._count("updates_received")
                self._ignore("invalid", f"{item.context} error on {item.topic}: {item.error}")
            else:
                log.warning("aggregator %s: %s error: %s", self.cfg.job, item.context, item.error)
            return
        self._count("updates_received")
        msg = item.message
        if not isinstance(msg, ModelUpdate) or msg.job != self.cfg.job or item.topic != _update_topic(msg):
            self._ignore("invalid", f"not a model update of job {self.cfg.job} on its own topic: {item.topic}")
            return
        if msg.round <= self._last_round:
            self._ignore("stale", f"{msg.node_id}: round {msg.round}, last published {self._last_round}")
            return
        if msg.node_id not in self.cfg.members or msg.node_id not in participants(self.cfg, msg.round):
            self._ignore("non_participant", f"{msg.node_id} is no participant of round {msg.round}")
            return
        rnd = self._open.get(msg.round)
        if rnd is not None and msg.node_id in rnd.updates:
            self._ignore("duplicate", f"{msg.node_id} already sent round {msg.round}")
            return
        shape = layout(msg)
        if self._layout is None:
            self._layout = shape
        elif shape != self._layout:
            self._ignore("mismatch", f"{msg.node_id}: tensors differ from the first update accepted")
            return
        if rnd is None:
            rnd = self._open_round(msg.round)
        rnd.updates[msg.node_id] = msg
        self._count("updates_accepted")
        if len(rnd.updates) == len(rnd.expected):
            self._close(rnd, partial=False)

    def _open_round(self, number: int) -> _Round:
        while len(self._open) >= self.max_open_rounds:
            oldest = self._open[min(self._open)]
            self._drop(oldest, f"more than {self.max_open_rounds} rounds open")
        rnd = _Round(number, frozenset(participants(self.cfg, number)), time.monotonic())
        with self._lock:
            self._open[number] = rnd
        return rnd

    def _expire(self, now: float) -> None:
        for number in sorted(self._open):
            rnd = self._open.get(number)
            if rnd is not None and now - rnd.opened_at >= self.round_timeout:
                missing = sorted(rnd.expected - rnd.updates.keys())
                log.warning(
                    "round %d of %s: %.1f s passed, averaging %d of %d updates (missing %s)",
                    number, self.cfg.job, self.round_timeout, len(rnd.updates), len(rnd.expected), missing,
                )
                self._close(rnd, partial=True)

    def _close(self, rnd: _Round, *, partial: bool) -> None:
        for number in [n for n in self._open if n < rnd.number]:
            self._drop(self._open[number], f"round {rnd.number} closed first")
        updates = [rnd.updates[m] for m in sorted(rnd.updates)]
        with self._lock:
            del self._open[rnd.number]
            self._last_round = rnd.number
        try:
            tensors = fedavg(updates)
        except FlRejected as exc:  # the layout check makes this a bug, not a node's fault
            self._count("errors")
            log.error("round %d of %s not averaged: %s", rnd.number, self.cfg.job, exc)
            return
        samples = sum(u.samples for u in updates)
        message = global_from_tensors(tensors, job=self.cfg.job, round=rnd.number, samples=samples)
        try:
            self.client.publish_message(self._topic, message, 1)
        except BusError as exc:
            self._count("publish_failed")
            log.error("round %d of %s: global model not published: %s", rnd.number, self.cfg.job, exc)
            return
        with self._lock:
            self._stats["rounds_published"] += 1
            self._stats["rounds_partial"] += partial
            self._stats["updates_used"] += len(updates)
        log.info(
            "round %d of %s: published the average of %d updates (%d samples)",
            rnd.number, self.cfg.job, len(updates), samples,
        )

    def _drop(self, rnd: _Round, why: str) -> None:
        with self._lock:
            del self._open[rnd.number]
            self._stats["rounds_dropped"] += 1
        log.warning("round %d of %s dropped with %d updates: %s", rnd.number, self.cfg.job, len(rnd.updates), why)

    def _ignore(self, reason: str, detail: str) -> None:
        self._count(f"ignored_{reason}")
        log.debug("aggregator %s: ignored (%s): %s", self.cfg.job, reason, detail)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


def _update_topic(msg: ModelUpdate) -> str:
    return topics.fl_update(msg.job, msg.node_id)


# --- the daemon ----------------------------------------------------------------------------


class AggregatorSettings(DaemonSettings, BrokerSettings, MetricsSettings, FlConfig):
    """`clue-aggregator` settings: the job (`FlConfig`), the rounds, the broker, logging."""

    # Members come as `a,b,c` from a flag or a variable, as an array from the file.
    model_config = SettingsConfigDict(env_prefix="CLUE_AGGREGATOR_", enable_decoding=False)

    program: ClassVar[str] = "clue-aggregator"
    description: ClassVar[str] = "FedAvg aggregator of the CLUE Edge baseline."

    round_timeout: float = Field(30.0, gt=0.0, description="s after a round's first update to average what came")
    max_open_rounds: int = Field(4, ge=1, description="rounds collected at once")
    client_id: str | None = Field(None, description="MQTT client id (default: aggregator-{job})")

    @field_validator("members", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [m.strip() for m in value.split(",") if m.strip()] if isinstance(value, str) else value


def build(settings: AggregatorSettings) -> WorkerDaemon:
    """The aggregator of `settings` and its client."""
    # All members may send at once (non-participants too): room to reassemble every transfer.
    client = MqttClient.from_url(
        settings.broker,
        client_id=settings.client_id or f"aggregator-{settings.job}",
        max_transfers=max(16, 2 * len(settings.members)),
        name=f"aggregator-{settings.job}",
        **settings.client_kwargs(),
    )
    job = FlConfig(**settings.model_dump(include=set(FlConfig.model_fields)))
    aggregator = FedAvgAggregator(
        client, job, round_timeout=settings.round_timeout, max_open_rounds=settings.max_open_rounds
    )
    registry = CollectorRegistry()
    registry.register(BusClientCollector(client, "clue_aggregator"))
    registry.register(_AggregatorCollector(aggregator.stats))
    return WorkerDaemon(client, aggregator, metrics=metrics_server(registry, settings))


class _AggregatorCollector(Collector):
    """The aggregator's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        rounds = CounterMetricFamily("clue_aggregator_rounds", "rounds by how they ended: full, partial (timed out), dropped", labels=["outcome"])
        rounds.add_metric(["full"], stats["rounds_published"] - stats["rounds_partial"])
        rounds.add_metric(["partial"], stats["rounds_partial"])
        rounds.add_metric(["dropped"], stats["rounds_dropped"])
        yield rounds
        updates = CounterMetricFamily("clue_aggregator_updates", "model updates by outcome: accepted, or ignored and why", labels=["outcome"])
        updates.add_metric(["accepted"], stats["updates_accepted"])
        for reason in _IGNORED:
            updates.add_metric([reason], stats[f"ignored_{reason}"])
        yield updates
        yield CounterMetricFamily("clue_aggregator_publish_failures", "global models that could not be published", value=stats["publish_failed"])
        yield GaugeMetricFamily("clue_aggregator_open_rounds", "rounds collecting updates now", value=stats["open_rounds"])
        yield GaugeMetricFamily("clue_aggregator_last_round", "the last round published (-1: none)", value=stats["last_round"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the aggregator until SIGTERM or SIGINT; return the exit code."""
    return serve(AggregatorSettings, build, argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AggregatorSettings", "FedAvgAggregator", "build", "main"]
