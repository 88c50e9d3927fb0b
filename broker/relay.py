"""The trusted relay (`clue-relay`): knowledge transfer in which target and helper never learn
each other's id.

One transfer (ARCHITECTURE.md §1, §4):

1. A target publishes a `KtRequest` without a helper id to `relay/kt` (the relay subscribes as
   `$share/relay/…`, so several relays split the load), with its own `reply_to`
   (`node/{target}/reply`) and `corr`.
2. The relay takes the target's id from `reply_to` (and from `target`, if set: both must agree)
   and its class histogram from its retained `node/{target}/meta`, and asks the MdS (`HelpQuery`
   on `mds/query`) for `candidates` helpers. The MdS never returns the asker.
3. It forwards a *fresh* `KtRequest` (new `corr`, `reply_to` = the relay's own
   `relay/{relay_id}/reply`, no `target`) to `node/{helper}/kt` and waits for the `KtBlob`
   (a chunked blob is reassembled by the client).
4. It answers the target with a new `KtBlob`: the helper's blob bytes, `helper` None, the target's
   `corr`. After an error reply or a timeout it tries the next candidate; when none is left, or
   the MdS fails, the target gets a typed `ErrorReply`.

No id crosses: the relay writes every field it forwards itself, and replaces the MdS's and the
helpers' error texts by its own (a helper could put its name in one). The ACL (`broker.topology`)
stops a node from reading any other node's topics.

Bounds: at most `max_transfers` transfers at once (one more gets `ErrorReply(code="busy")` at
once); a transfer stops when the target's request expires (its v5 MessageExpiryInterval, else
`transfer_timeout`); a repeated request (same reply topic and corr: a QoS 1 redelivery) is
dropped, since the answer goes out at QoS 1 to the target's session; replies that come after
their timeout are dropped by the client (`late_replies` in `stats()`); at most `max_nodes`
histograms are cached.

`clue-relay` runs it (`main`): settings from a TOML file (`--config`), then `CLUE_RELAY_*`
environment variables, then flags (`clue-relay --help`); signals, readiness, the watchdog and the
exit codes are the runner's (`service.runner`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from broker import topics
from broker.client import ErrorEvent, Inbound, InboxItem, MqttClient
from broker.errors import BusError, RemoteError, RequestTimeout, TopicError
from broker.wire import Envelope, ErrorReply, HelperList, HelpQuery, KtBlob, KtRequest, NodeId, NodeMeta
from service.metrics import BusClientCollector, MetricsSettings, metrics_server
from service.runner import WorkerDaemon, serve
from service.settings import BrokerSettings, DaemonSettings
from service.worker import InboxWorker

log = logging.getLogger("clue.relay")

_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class RelayConfig(BaseModel):
    """Settings of one relay instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relay_id: NodeId = Field("relay", description="instance id: reply topic relay/{id}/reply, MQTT client id")
    share_group: str = Field("relay", pattern=_ID, description="shared-subscription group over relay/kt")
    candidates: int = Field(3, ge=1, le=64, description="helpers asked of the MdS, tried best first")
    max_transfers: int = Field(8, ge=1, le=1024, description="transfers at once; more are answered busy")
    mds_timeout: float = Field(2.0, gt=0.0, le=600.0, description="seconds to wait for the MdS, per attempt")
    mds_retries: int = Field(1, ge=0, le=10, description="MdS query retries (same corr)")
    helper_timeout: float = Field(8.0, gt=0.0, le=600.0, description="seconds to wait for one helper's blob")
    transfer_timeout: float = Field(
        30.0, gt=0.0, le=3600.0, description="budget of a transfer whose request carries no expiry (a v3.1.1 bridge)"
    )
    max_nodes: int = Field(100_000, ge=1, le=10_000_000, description="node histograms cached")


class Relay(InboxWorker[InboxItem]):
    """Serves `KtRequest`s on `relay/kt` through `client` (see the module docstring).

    `start()` subscribes and starts the dispatch thread that takes the client's inbox; transfers
    run on a pool of `max_transfers` threads. The caller starts and stops the client. Build the
    client with `reply_topic=relay_reply(relay_id)`.
    """

    def __init__(self, client: MqttClient, config: RelayConfig | None = None) -> None:
        super().__init__(client, name="relay-dispatch")
        self.client = client
        self.config = config or RelayConfig()
        self.reply_topic = topics.relay_reply(self.config.relay_id)
        self._meta: OrderedDict[str, NodeMeta] = OrderedDict()
        self._active: set[tuple[str, str]] = set()
        self._finished: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stats = dict.fromkeys(
            ("requests", "forwarded", "failed", "busy", "duplicates", "unanswerable", "expired", "errors"), 0
        )

    def start(self) -> "Relay":
        """Start serving and subscribe (`$share/{group}/relay/kt`, every node's meta)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.max_transfers, thread_name_prefix="relay-kt")
        super().start()
        self.client.subscribe(f"$share/{self.config.share_group}/{topics.relay_kt()}", 1)
        self.client.subscribe(topics.all_meta(), 1)
        log.info("relay %s serving %s", self.config.relay_id, topics.relay_kt())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; transfers in flight end when the client stops."""
        super().stop(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, int]:
        """Counters (`errors` with the dispatch thread's), plus `active` transfers, cached `nodes`
        and the client's `late_replies`."""
        with self._lock:
            out = dict(self._stats, active=len(self._active), nodes=len(self._meta))
        out["errors"] += self.errors
        out["late_replies"] = self.client.stats()["late_replies"]
        return out

    # --- dispatch (the worker thread) --------------------------------------------------------

    def handle(self, item: InboxItem) -> None:
        """Take one inbox item: node metadata is cached, a KT request starts a transfer."""
        if isinstance(item, ErrorEvent):
            log.debug("relay: %s error: %s", item.context, item.error)
            return
        message = item.message
        if topics.topic_class(item.topic) == "meta":
            self._remember(item)
        elif isinstance(message, KtRequest) and item.topic == topics.relay_kt():
            self._admit(message, item)

    def _remember(self, item: Inbound) -> None:
        try:
            node_id, _ = topics.parse_node_topic(item.topic)
        except TopicError:
            return
        with self._lock:
            if item.message is None:  # a cleared retained meta: the node is gone
                self._meta.pop(node_id, None)
                return
            if not isinstance(item.message, NodeMeta) or item.message.node_id != node_id:
                return
            self._meta[node_id] = item.message
            self._meta.move_to_end(node_id)
            while len(self._meta) > self.config.max_nodes:
                self._meta.popitem(last=False)

    def _admit(self, request: KtRequest, item: Inbound) -> None:
        self._count("requests")
        reply_to, corr = item.reply_to, item.corr
        asker = _asker(reply_to)
        if asker is None or not corr:
            self._count("unanswerable")
            log.warning("relay: KT request without a node reply topic or corr; dropped")
            return
        assert reply_to is not None
        if request.target is not None and request.target != asker:
            self._count("failed")
            self._answer(reply_to, corr, ErrorReply(corr=corr, code="bad_request", message="target does not match reply_to"))
            return
        key = (reply_to, corr)
        with self._lock:
            if key in self._active or key in self._finished:
                self._stats["duplicates"] += 1
                return
            busy = len(self._active) >= self.config.max_transfers
            if not busy:
                self._active.add(key)
        if busy:
            self._count("busy")
            self._answer(reply_to, corr, ErrorReply(corr=corr, code="busy", message="the relay is at capacity"))
            return
        # The target stops waiting when its request expires (`MqttClient` sets the expiry 1 s past
        # its own wait): answering later would only be dropped there as a late reply.
        expiry = getattr(item.properties, "MessageExpiryInterval", None)
        budget = float(expiry) - 1.0 if expiry else self.config.transfer_timeout
        deadline = time.monotonic() + budget
        assert self._pool is not None
        self._pool.submit(self._serve, request, key, asker, deadline)

    # --- one transfer (a pool thread) --------------------------------------------------------

    def _serve(self, request: KtRequest, key: tuple[str, str], asker: str, deadline: float) -> None:
        try:
            reply = self._transfer(request, key[1], asker, deadline)
        except Exception:  # noqa: BLE001 - a bug here still answers the target, typed
            self._count("errors")
            log.exception("relay: transfer failed")
            reply = ErrorReply(corr=key[1], code="internal", message="the relay failed")
        self._finish(key, reply)

    def _transfer(self, request: KtRequest, corr: str, asker: str, deadline: float) -> Envelope | None:
        with self._lock:
            meta = self._meta.get(asker)
        if meta is None:
            return ErrorReply(corr=corr, code="not_found", message="the relay has no metadata from this node yet")
        query = HelpQuery(
            node_id=asker,
            arch_id=request.arch_id,
            lineage=request.lineage,
            classes=request.classes,
            hist=meta.hist,
            k=self.config.candidates,
        )
        wait = min(self.config.mds_timeout, (deadline - time.monotonic()) / (self.config.mds_retries + 1))
        if wait <= 0:
            return None
        try:
            listing = self.client.request(
                topics.mds_query(), query, timeout=wait, retries=self.config.mds_retries, reply_topic=self.reply_topic
            )
        except RemoteError as exc:
            return ErrorReply(corr=corr, code=exc.code, message="the MdS refused the query")
        except RequestTimeout:
            return ErrorReply(corr=corr, code="timeout", message="the MdS did not answer")
        assert isinstance(listing, HelperList)
        helpers = [c.node_id for c in listing.candidates if c.node_id != asker]
        if not helpers:
            return ErrorReply(corr=corr, code="no_helpers", message="no eligible helper is online")
        codes: list[str] = []
        for helper in helpers:
            wait = min(self.config.helper_timeout, deadline - time.monotonic())
            if wait <= 0:
                return None
            forward = KtRequest(
                classes=request.classes,
                z=request.z,
                arch_id=request.arch_id,
                lineage=request.lineage,
                value_codec=request.value_codec,
            )
            try:
                blob = self.client.request(
                    topics.node_kt(helper), forward, timeout=wait, retries=0, reply_topic=self.reply_topic
                )
            except RemoteError as exc:
                codes.append(exc.code)
                continue
            except RequestTimeout:
                codes.append("timeout")
                continue
            assert isinstance(blob, KtBlob)
            return KtBlob(corr=corr, blob=blob.blob, count=blob.count)
        code = codes[0] if len(set(codes)) == 1 else "rejected"
        return ErrorReply(
            corr=corr, code=code, message=f"{len(codes)} helper(s) tried, none delivered ({', '.join(codes)})"
        )

    def _finish(self, key: tuple[str, str], reply: Envelope | None) -> None:
        if reply is None:
            self._count("expired")
        else:
            self._count("forwarded" if isinstance(reply, KtBlob) else "failed")
            self._answer(key[0], key[1], reply)
        with self._lock:
            self._active.discard(key)
            self._finished[key] = None
            while len(self._finished) > 4096:
                self._finished.popitem(last=False)

    def _answer(self, reply_to: str, corr: str, reply: Envelope) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = corr.encode("ascii")
        try:
            self.client.publish_message(reply_to, reply, 1, properties=props)
        except BusError as exc:
            self._count("errors")
            log.warning("relay: answer not sent: %s", exc)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


def _asker(reply_to: str | None) -> str | None:
    """The node id of a `node/{id}/reply` topic, else None."""
    try:
        node_id, leaf = topics.parse_node_topic(reply_to or "")
    except TopicError:
        return None
    return node_id if leaf == "reply" else None


class RelaySettings(DaemonSettings, BrokerSettings, MetricsSettings, RelayConfig):
    """`clue-relay` settings: the relay's own (`RelayConfig`), how it reaches the broker, logging."""

    model_config = SettingsConfigDict(env_prefix="CLUE_RELAY_")

    program: ClassVar[str] = "clue-relay"
    description: ClassVar[str] = "The trusted KT relay of CLUE Edge."


def build(settings: RelaySettings) -> WorkerDaemon:
    """The relay of `settings` and its client (reply topic `relay/{relay_id}/reply`)."""
    client = MqttClient.from_url(
        settings.broker,
        client_id=settings.relay_id,
        reply_topic=topics.relay_reply(settings.relay_id),
        name=f"relay-{settings.relay_id}",
        **settings.client_kwargs(),
    )
    relay = Relay(client, settings)
    registry = CollectorRegistry()
    registry.register(BusClientCollector(client, "clue_relay"))
    registry.register(_RelayCollector(relay.stats))
    return WorkerDaemon(
        client, relay, status=lambda: _status_line(settings.relay_id, relay.stats()), metrics=metrics_server(registry, settings)
    )


class _RelayCollector(Collector):
    """The relay's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        transfers = CounterMetricFamily(
            "clue_relay_transfers", "KT requests by how they ended: forwarded (a blob relayed), failed, expired, busy (refused at the limit)", labels=["outcome"]
        )
        for outcome in ("forwarded", "failed", "expired", "busy"):
            transfers.add_metric([outcome], stats[outcome])
        yield transfers
        yield CounterMetricFamily("clue_relay_requests", "KT requests received", value=stats["requests"])
        yield CounterMetricFamily("clue_relay_errors", "transfers or dispatches that raised", value=stats["errors"])
        yield GaugeMetricFamily("clue_relay_transfers_active", "transfers in flight", value=stats["active"])


def main(argv: Sequence[str] | None = None) -> int:
    """`clue-relay --broker mqtts://host:8883 --tls-ca ca.crt --tls-cert relay.crt --tls-key relay.key`.

    Exits 0 after SIGTERM or SIGINT, 78 for a bad setting, 1 for a crash (`service.exit_codes`).
    """
    return serve(RelaySettings, build, argv)


def _status_line(relay_id: str, stats: dict[str, Any]) -> str:
    """The one line `systemctl status` shows."""
    return f"relay {relay_id} serving {topics.relay_kt()}: {stats['active']} transfers, {stats['forwarded']} forwarded"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["Relay", "RelayConfig", "RelaySettings", "build", "main"]
