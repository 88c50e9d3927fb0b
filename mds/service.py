"""The metadata service (MdS) on the bus: node metadata and liveness in, helper lists out.

`MetadataService` subscribes to every node's `meta` and `status` and to the helper queries
(`$share/{group}/clue/v1/mds/query` by default, so several MdS split the queries; each still sees
every `meta` and `status`). Its worker thread (`service.worker.InboxWorker`) takes the client's
inbox in arrival order:

- `node/{id}/meta`: a `NodeMeta` goes into the `NodeStore`, the last received in place of the one
  before: the sender's `ts` orders nothing, so a replayed or skewed message cannot pin or hide a
  node. One stamped more than `max_clock_skew` seconds after its receipt is refused (counted as
  `meta_future`; the node keeps its previous state), as is one naming another node than its
  topic. An empty payload (retained meta cleared) removes the node.
- `node/{id}/status`: `online` / `offline`; an empty payload (cleared) counts as offline. A node is
  a helper only after an `online` status: metadata alone does not make it one, and no sender's
  clock decides liveness.
- `mds/query`: a `HelpQuery` is answered on its envelope's `reply_to` with its `corr` (the v5
  properties are the fallback) by a `HelperList`, or by a typed `ErrorReply` (`arch_mismatch`,
  `lineage_mismatch`, `bad_request`; `unsupported` for another message type). Answers go through
  a `Responder`, so a retry with the same `corr` gets the cached answer. A query whose bytes do not
  decode is answered `bad_request` when its v5 properties say where to; retained queries are
  ignored (a stale retained query would be answered at every restart).

Undecodable input is logged and counted, never fatal; so is a handler that raises
(`worker_errors`). Rebuilding after a restart: an MdS with an
on-disk store answers from SQLite at once; the retained `meta`/`status` messages that arrive on
subscribing bring it up to date. `stop()` unsubscribes from the queries first, so the broker stops
routing shared-group queries to this instance before it disconnects.

The caller owns the client (constructs, starts and stops it) and the store.

>>> service = MetadataService(client, NodeStore("mds.db")).start()   # doctest: +SKIP
>>> client.start()                                                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import topics
from broker.client import ErrorEvent, Inbound, InboxItem, MqttClient, Responder
from broker.errors import RequestRejected, TopicError, UnknownMessageType, UnsupportedVersion, WireError
from broker.wire import Candidate, Envelope, ErrorReply, HelperList, HelpQuery, NodeMeta, decode
from mds.metrics import MdsMetrics
from mds.similarity import SIMILARITIES
from mds.store import NodeStore, QueryRejected
from service.worker import InboxWorker

log = logging.getLogger(__name__)

#: Latency samples kept for the percentiles in `stats()`.
LATENCY_WINDOW = 10_000
#: Largest `max_clock_skew` accepted (s): a day ahead is a broken clock, not skew.
MAX_CLOCK_SKEW = 86_400.0
#: Largest `max_k` accepted: the most candidates a `HelperList` carries.
MAX_K = 64
_DECODE_CONTEXTS = ("decode", "chunk", "size")
_COUNTERS = (
    "queries",
    "answered",
    "rejected",
    "undecodable_queries",
    "unanswerable",
    "retained_queries_ignored",
    "meta_applied",
    "meta_future",
    "meta_rejected",
    "meta_removed",
    "status_updates",
    "bad_input",
    "client_errors",
)


class MetadataService(InboxWorker[InboxItem]):
    """Answers helper queries from the node metadata it collects (see the module docstring).

    `similarity`: a name from `mds.similarity.SIMILARITIES`; `min_class_share`: the share of its
    histogram a helper must hold in each requested class; `shared_group`: the shared-subscription
    group, or None to read `mds/query` directly (then every MdS answers every query); `max_k`: the
    largest `k` served (a query asking more gets `bad_request`); `max_clock_skew`: how many seconds
    a `NodeMeta`'s `ts` may lie after its receipt (0..`MAX_CLOCK_SKEW`) before it is refused.

    Fleet size and the broker: on subscribing, the retained `meta` and `status` of every node (two
    messages per node) pass through the broker's outgoing queue for this client, and Mosquitto
    silently drops what exceeds `max_queued_messages` (at QoS 0 too; measured with 2.0.11). That limit must exceed twice
    the fleet, or be 0 (unlimited), for a new MdS to see every node.
    """

    def __init__(
        self,
        client: MqttClient,
        store: NodeStore,
        *,
        similarity: str = "cosine",
        min_class_share: float = 0.01,
        shared_group: str | None = "mds",
        max_k: int = 32,
        max_clock_skew: float = 300.0,
    ) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; known: {sorted(SIMILARITIES)}")
        if not 0.0 <= min_class_share <= 1.0:
            raise ValueError(f"min_class_share must be in [0, 1], got {min_class_share}")
        if isinstance(max_k, bool) or not isinstance(max_k, int) or not 1 <= max_k <= MAX_K:
            raise ValueError(f"max_k must be an int in [1, {MAX_K}], got {max_k!r}")
        if not 0.0 <= max_clock_skew <= MAX_CLOCK_SKEW:
            raise ValueError(f"max_clock_skew must be in [0, {MAX_CLOCK_SKEW:g}] s, got {max_clock_skew}")
        super().__init__(client, name=f"mds-{client.name}")
        self.client = client
        self.store = store
        self.similarity = similarity
        self.min_class_share = float(min_class_share)
        self.max_k = max_k
        self.max_clock_skew = float(max_clock_skew)
        self.shared_group = shared_group
        self.query_filter = topics.mds_query_shared(shared_group) if shared_group is not None else topics.mds_query()
        self._responder = Responder(client, self._answer)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter(dict.fromkeys(_COUNTERS, 0))
        self._rejected: Counter[str] = Counter()
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._compute_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.metrics = MdsMetrics(client, store.group_counts, self.stats)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "MetadataService":
        """Start the worker thread and subscribe (now or on the client's next connect)."""
        super().start()
        self.client.subscribe(topics.all_meta(), 1)
        self.client.subscribe(topics.all_status(), 1)
        # Raw: the service decodes queries itself so that one that fails to decode can still be
        # answered, on the v5 ResponseTopic it carries.
        self.client.subscribe(self.query_filter, 1, decoding="raw")
        log.info(
            "MdS %s: serving %s (similarity %s, max_k %d, max_clock_skew %g s)",
            self.client.name,
            self.query_filter,
            self.similarity,
            self.max_k,
            self.max_clock_skew,
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Leave the query subscription, then stop the worker (the client stays the caller's)."""
        if self.running:
            try:
                self.client.unsubscribe(self.query_filter)
            except Exception:  # noqa: BLE001 - a client already stopped is fine here
                log.debug("MdS %s: unsubscribe on stop failed", self.client.name, exc_info=True)
        super().stop(timeout)

    # --- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, node counts and latency percentiles (ms; `latency_ms` from receipt to reply
        sent, `query_ms` the store's top-k alone) over the last `LATENCY_WINDOW` queries."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["rejected_by_code"] = dict(self._rejected)
            latency = np.array(self._latency_ms)
            compute = np.array(self._compute_ms)
        out["worker_errors"] = self.errors
        out["duplicates"] = self._responder.duplicates
        out["unanswerable"] += self._responder.unanswerable + self._responder.bad_reply_to
        out["inbox_dropped"] = self.client.stats()["inbox_dropped"]
        out["nodes"] = self.store.count()
        out["online"] = self.store.count(online=True)
        out["latency_ms"] = _percentiles(latency)
        out["query_ms"] = _percentiles(compute)
        return out

    # --- worker --------------------------------------------------------------------------------

    def handle(self, item: InboxItem) -> None:
        """Take one inbox item (module docstring)."""
        if isinstance(item, ErrorEvent):
            if item.context in _DECODE_CONTEXTS:
                self._bad_input(item.topic, item.error)
            else:
                self._count("client_errors")
                log.warning("MdS %s: client %s error: %s", self.client.name, item.context, item.error)
            return
        if item.topic == topics.mds_query():
            self._serve(item)
            return
        try:
            node_id, leaf = topics.parse_node_topic(item.topic)
        except TopicError:
            return  # e.g. the client's own reply topic: nothing for the MdS
        if leaf == "meta":
            self._on_meta(node_id, item)
        elif leaf == "status":
            self._on_status(node_id, item)

    def _on_meta(self, node_id: str, item: Inbound) -> None:
        meta = item.message
        if meta is None:
            if self.store.remove(node_id):
                self._count("meta_removed")
            return
        if not isinstance(meta, NodeMeta):
            self._bad_input(item.topic, UnknownMessageType(f"{meta.type!r} on a meta topic"))
            return
        if meta.node_id != node_id:
            # The topic is the identity a broker ACL can enforce; the payload is not.
            self._bad_input(item.topic, ValueError(f"metadata of {meta.node_id!r} on {node_id!r}'s topic"))
            return
        ahead = meta.ts - item.received_at
        if ahead > self.max_clock_skew:
            # A forged or broken clock. Stored, the stamp would mislead its readers: an older MdS on
            # the same file would take every later message for older, an age from it is negative.
            self._count("meta_future")
            log.warning(
                "MdS %s: metadata of %s refused: ts %.6g is %.0f s ahead of this MdS's clock (allowed %g s)",
                self.client.name,
                node_id,
                meta.ts,
                ahead,
                self.max_clock_skew,
            )
            return
        try:
            self.store.upsert_meta(meta)
        except ValueError as exc:
            self._count("meta_rejected")
            log.warning("MdS %s: metadata of %s refused: %s", self.client.name, node_id, exc)
            return
        self._count("meta_applied")

    def _on_status(self, node_id: str, item: Inbound) -> None:
        if item.payload == topics.STATUS_ONLINE:
            online = True
        elif item.payload in (topics.STATUS_OFFLINE, b""):
            online = False
        else:
            self._bad_input(item.topic, ValueError(f"status {item.payload[:32]!r} is neither online nor offline"))
            return
        if self.store.set_online(node_id, online):
            self._count("status_updates")

    def _serve(self, item: Inbound) -> None:
        if item.retained:
            self._count("retained_queries_ignored")
            return
        try:
            query = decode(item.payload, expect=HelpQuery, max_bytes=self.client.max_message_bytes)
        except WireError as exc:
            self._reject_undecodable(item, exc)
            return
        request = dataclasses.replace(item, message=query)
        if not request.corr:
            self._count("unanswerable")  # no correlation id: nothing the asker could match an answer to
            return
        self._responder.handle(request)
        seconds = time.time() - item.received_at
        self._sample(self._latency_ms, seconds * 1e3)
        self.metrics.query_seconds.observe(seconds)

    def _answer(self, request: HelpQuery, item: Inbound) -> Envelope:
        """The `Responder`'s handler (`_serve` decoded a `HelpQuery`): run once per correlation id."""
        self._count("queries")
        try:
            if request.k > self.max_k:
                raise QueryRejected("bad_request", f"k={request.k} exceeds this MdS's max_k={self.max_k}")
            started = time.perf_counter()
            found = self.store.query(
                request.node_id,
                request.arch_id,
                request.lineage,
                request.classes,
                request.hist,
                request.k,
                metric=self.similarity,
                min_class_share=self.min_class_share,
                cover=request.cover,
                rank=request.rank,
            )
            self._sample(self._compute_ms, (time.perf_counter() - started) * 1e3)
        except QueryRejected as exc:
            self._count("rejected")
            with self._lock:
                self._rejected[exc.code] += 1
            raise RequestRejected(exc.code, exc.message) from exc
        self._count("answered")
        return HelperList(corr=item.corr, candidates=[Candidate(node_id=m.node_id, score=m.score, classes=list(m.classes)) for m in found])

    def _reject_undecodable(self, item: Inbound, exc: WireError) -> None:
        self._count("undecodable_queries")
        log.warning("MdS %s: undecodable query: %s", self.client.name, exc)
        reply_to = getattr(item.properties, "ResponseTopic", None)
        # Only a node's or the relay's reply topic: never reflect onto a topic others read.
        if not isinstance(reply_to, str) or not topics.is_reply_topic(reply_to):
            return
        code = "unsupported" if isinstance(exc, (UnknownMessageType, UnsupportedVersion)) else "bad_request"
        corr = item.corr
        try:
            reply = ErrorReply(corr=corr, code=code, message=str(exc)[:1000])
        except ValueError:  # a correlation id the envelope cannot carry: the v5 property still can
            reply = ErrorReply(corr=None, code=code, message=str(exc)[:1000])
        props = Properties(PacketTypes.PUBLISH)
        if corr:
            props.CorrelationData = corr.encode("ascii", "replace")
        self.client.publish_message(reply_to, reply, 1, topic_class="query", properties=props)

    # --- helpers -------------------------------------------------------------------------------

    def _bad_input(self, topic: str | None, error: BaseException) -> None:
        self._count("bad_input")
        log.warning("MdS %s: bad input on %s: %s", self.client.name, topic, error)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _sample(self, samples: deque[float], value: float) -> None:
        with self._lock:
            samples.append(value)


def _percentiles(samples: np.ndarray) -> dict[str, float]:
    if samples.size == 0:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    p50, p99 = np.percentile(samples, [50, 99])
    return {"count": int(samples.size), "p50": float(p50), "p99": float(p99), "max": float(samples.max())}


__all__ = ["LATENCY_WINDOW", "MAX_CLOCK_SKEW", "MAX_K", "MetadataService"]
