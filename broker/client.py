"""The one owner of paho-mqtt 2.x in CLUE Edge: `MqttClient`, plus the `Responder` helper.

What it guarantees (ARCHITECTURE.md §3-§5, STYLE.md ideas 3-5):

- **Connection.** MQTT v5, `CallbackAPIVersion.VERSION2`, a fixed client id and
  `SessionExpiryInterval > 0`. `start()` is `connect_async` + `loop_start`, so it returns at once
  even while the broker is down; paho then reconnects with capped exponential backoff (the lower
  bound jittered per client so a fleet does not reconnect in lockstep). `connected` is driven only
  by a *successful* CONNACK and by disconnects: a refused CONNACK (bad credentials, ACL) is counted
  and reported as an `ErrorEvent`, never taken as connected. The will (`node/{id}/status` =
  `offline`, retained) is set before connecting. On every successful CONNACK the client
  re-subscribes everything it was asked to subscribe (retain handling 1 on a resumed session: no
  duplicate retained messages) and re-publishes its retained state (`set_retained`).
- **Callbacks never block and never raise into paho.** They decode, validate, and hand items to a
  bounded `inbox` queue; a full inbox drops (counted). Anything unexpected becomes an `ErrorEvent`.
- **Requests.** `request()`/`send_request()` set `ResponseTopic` + `CorrelationData` *and* the
  envelope's `reply_to`/`corr` (authoritative: a bridge at `mqttv311` strips v5 properties). Each
  attempt has a timeout; a retry re-sends the same correlation id, so a `Responder` answers it
  from its cache instead of running the handler again. Replies are matched by the envelope's
  `corr`; late and duplicate replies on our reply topic are dropped and counted.
- **Sizes.** `max_message_bytes` is enforced here (paho ignores the broker's MaximumPacketSize;
  the broker's CONNACK value is honoured too). Payloads above `chunk_bytes` (256 KiB default, so a
  broker capped at 1 MB such as EMQX's default works) travel as `BlobChunk`s and are reassembled
  inside the receiving client (out of order, duplicated, sha256-checked, bounded, deadline).
- **What a topic takes** (ARCHITECTURE.md §4). Each subscription has accepted message types and
  a size limit: its own (`subscribe(..., accept=, max_bytes=)`) or the default of the topic's
  kind (`broker.topics.topic_rule`: a batch topic takes `RequestBatch`, a KT topic `KtRequest`,
  config topics `ConfigPatch` of at most 64 KiB, reply topics the reply types, …). The limit is
  the receiver's and applies to the whole message: a single message, and a chunked one before
  reassembly starts (the first chunk's declared total, not the sender's `cls`) and when it is
  decoded. A message of another type becomes an `ErrorEvent` (`decode`, `UnknownMessageType`),
  one too large an `ErrorEvent` (`size`, `MessageTooLarge`); neither reaches the inbox as
  `Inbound`, and a reply counts only on the reply topic its request named.
- **Byte accounting.** `byte_counts()` gives `{class: {"out": n, "in": n}}` over real payload
  sizes. The class of a message is, in order: the class of its message type (`KtRequest`/`KtBlob`
  -> `kt`, `HelpQuery`/`HelperList` -> `query`, `NodeMeta` -> `meta`, FL models -> `fl`, …), an
  explicit `topic_class=` on publish, the class of the pending request an untyped reply (an
  `ErrorReply`) answers, then the topic's class (`broker.topics.topic_class`). Chunks carry the
  sender's class, so both ends count a chunked KT blob as `kt`.

This module is the public face; each job lives in a private module of its own, composed here:
`_settings` (`ClientSettings`, `Will`, broker URLs), `_connection` (the paho client, reconnects,
retained state, raw publishing), `_subscriptions` (what each topic takes), `_receiving` (decoding,
reassembly, dispatch), `_requests` (pending requests, retries, timeouts), `_accounting` (counters
and bytes), `_inbox` (inbox items) and `_responder` (`Responder`). Import from here.

Example (a broker must be running; see `broker.launcher.PrivateMosquitto`):

>>> client = MqttClient.from_url("mqtt://127.0.0.1:1883", client_id="edge-1", status_node_id="edge-1")  # doctest: +SKIP
>>> client.subscribe(topics.node_batch("edge-1"))                                 # doctest: +SKIP
>>> client.start(); client.wait_connected(5)                                      # doctest: +SKIP
>>> helpers = client.request(topics.mds_query(), HelpQuery(...), timeout=2)       # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import topics
from broker._accounting import Accounting
from broker._connection import Connection, Published
from broker._inbox import ErrorEvent, Inbound, Inbox, InboxItem, drain, iter_inbox
from broker._receiving import Receiver
from broker._requests import Pending, Requests
from broker._responder import Responder
from broker._settings import ClientSettings, Will, parse_broker_url
from broker._subscriptions import Decoding, Subscriptions
from broker.chunking import split
from broker.errors import MessageTooLarge, RequestTimeout
from broker.wire import Envelope, MessageClasses, encode


class MqttClient:
    """A paho-mqtt 2.x client with reconnects, request/response, chunking and byte accounting.

    Made from a `ClientSettings` (every setting checked there, at once), or from a broker URL
    with `from_url`. Lifecycle: construct, `subscribe(...)` and `set_retained(...)` (remembered,
    redone on every connect), `start()`, work, `stop()`. A stopped client is not restarted: make a
    new one (same `client_id` resumes the session).
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        cid = settings.client_id
        self.name = settings.name or cid
        self.reply_topic = settings.reply_topic or (topics.node_reply(cid) if topics.is_valid_node_id(cid) else None)
        self._accounting = Accounting()
        self._inbox = Inbox(settings.inbox_size, self._accounting, self.name)
        self._subscriptions = Subscriptions(settings.max_blob_bytes)
        self._requests = Requests(self._accounting, self._inbox, name=self.name, publish=self.publish)
        if self.reply_topic is not None:
            self._requests.add_reply_topic(self.reply_topic)
        self._receiver = Receiver(settings, self._subscriptions, self._requests, self._accounting, self._inbox, name=self.name)
        self._connection = Connection(settings, self._subscriptions, self._receiver, self._accounting, self._inbox, name=self.name)
        self._wake = threading.Event()
        self._housekeeper: threading.Thread | None = None

    @classmethod
    def from_url(cls, url: str, **fields: Any) -> "MqttClient":
        """Build from `mqtt://host:port`, `mqtts://host:port` or `unix:///path` plus settings."""
        return cls(ClientSettings(**parse_broker_url(url), **fields))

    # --- state ---------------------------------------------------------------------------

    # The settings that callers read off the client; the rest are in `settings`.

    @property
    def client_id(self) -> str:
        return self.settings.client_id

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def unix_socket(self) -> str | None:
        return self.settings.unix_socket

    @property
    def max_message_bytes(self) -> int:
        return self.settings.max_message_bytes

    @property
    def max_blob_bytes(self) -> int:
        return self.settings.max_blob_bytes

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connection.connected

    @property
    def loop_alive(self) -> bool:
        """paho's network thread is running (for a watchdog: connected or reconnecting, not dead)."""
        return self._connection.loop_alive

    @property
    def last_refusal(self) -> str | None:
        """The reason code of the broker's last refused CONNACK (None: never refused)."""
        return self._connection.last_refusal

    @property
    def server_max_packet(self) -> int | None:
        """MaximumPacketSize from the broker's last CONNACK (None: not announced)."""
        return self._connection.server_max_packet

    @property
    def inbox(self) -> "queue.Queue[InboxItem]":
        """The bounded queue of `Inbound` and `ErrorEvent` items."""
        return self._inbox.queue

    def get(self, timeout: float | None = None) -> InboxItem | None:
        """Next inbox item, or None after `timeout` s."""
        try:
            return self._inbox.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def byte_counts(self) -> dict[str, dict[str, int]]:
        """Payload bytes per class: `{class: {"out": n, "in": n}}` (every class present)."""
        return self._accounting.byte_counts()

    def stats(self) -> dict[str, int]:
        """Counters: connects, refusals, retries, late/duplicate replies, drops, errors, …"""
        return {**self._accounting.snapshot(), **self._receiver.transfer_stats()}

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "MqttClient":
        """Begin connecting in the background and return at once (the broker may be down)."""
        if self.reply_topic is not None:  # before paho's thread runs: in the first connect's snapshot
            self._subscriptions.put_default(self.reply_topic)
        self._connection.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name=f"mqtt-house-{self.name}", daemon=True)
        self._housekeeper.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (successful CONNACK); False after `timeout` s."""
        return self._connection.wait_connected(timeout)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Block until connected and every subscription of this connection is acknowledged."""
        return self._connection.wait_subscribed(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline` (if it owns a status), disconnect cleanly, stop the threads.

        Pending requests fail with `ClientStopped`. The session stays on the broker for
        `session_expiry` seconds (queued QoS 1 messages wait there for the next start).
        """
        if not self._connection.stop(timeout):
            return
        self._wake.set()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout)
        self._requests.fail_all()

    def abort_connection(self) -> None:
        """Close the socket without a DISCONNECT, as a crash or a cut cable would: the broker
        publishes the will; the client then reconnects. For tests and fault drills."""
        self._connection.abort()

    def __enter__(self) -> "MqttClient":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- subscriptions and retained state ---------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        decoding: Decoding = "auto",
        accept: type[Envelope] | MessageClasses | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """Subscribe now (if connected) and on every future connect.

        `decoding`: `auto` (status topics raw, config topics `decode_config`, the rest msgpack),
        `msgpack`, `config`, or `raw` (no decoding: `Inbound.message` is None).
        `accept`: the message classes taken on the topics this filter matches (subclasses count);
        any other type becomes an `ErrorEvent` (`decode`). `max_bytes`: the largest message, whole
        (after chunk reassembly); above it an `ErrorEvent` (`size`), at most `max_blob_bytes`.
        Left None, each comes from the topic's kind (`broker.topics.topic_rule`). Where several
        subscriptions match a topic, a message must pass every `accept` given and the smallest
        `max_bytes`.
        """
        self._connection.subscribe(self._subscriptions.check(topic_filter, qos, decoding, accept, max_bytes))

    def unsubscribe(self, topic_filter: str) -> None:
        self._connection.unsubscribe(topic_filter)

    def set_retained(self, topic: str, payload: bytes | Envelope, qos: int = 1, *, topic_class: str | None = None) -> None:
        """Retained state: published now (if connected) and again on every connect."""
        topics.validate_publish_topic(topic)
        data = encode(payload) if isinstance(payload, Envelope) else bytes(payload)
        cls = topic_class or (payload.byte_class if isinstance(payload, Envelope) else None)
        self._connection.set_retained(topic, data, qos, cls)

    def clear_retained(self, topic: str) -> None:
        """Forget retained state and delete it on the broker (empty retained payload)."""
        self._connection.forget_retained(topic)
        self.publish(topic, b"", 1, True)

    # --- publishing ------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        topic_class: str | None = None,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish raw bytes (at most `max_message_bytes`; use `publish_message`/`publish_blob` for
        more). QoS 1/2 messages published while disconnected are queued and sent on reconnect."""
        return self._connection.publish(topic, payload, qos, retain, topic_class=topic_class, properties=properties)

    def publish_message(
        self,
        topic: str,
        msg: Envelope,
        qos: int = 1,
        retain: bool = False,
        *,
        topic_class: str | None = None,
        properties: Properties | None = None,
    ) -> Published:
        """Encode and publish a message; above the chunk size it goes as chunks (not retained)."""
        data = encode(msg)
        cls = msg.byte_class or topic_class or topics.topic_class(topic)
        if len(data) <= self._connection.chunk_limit(topic):
            return Published([self.publish(topic, data, qos, retain, topic_class=cls, properties=properties)])
        if retain:
            raise MessageTooLarge(f"a retained message must fit in one chunk ({len(data)} bytes)")
        return self.publish_blob(topic, data, qos, topic_class=cls, properties=properties)

    def publish_blob(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        *,
        topic_class: str | None = None,
        properties: Properties | None = None,
    ) -> Published:
        """Publish `payload` as `BlobChunk` messages of at most the chunk size each.

        The receiving `MqttClient` reassembles them and delivers the payload as if it had come in
        one message (decoded as a message on that topic).
        """
        if len(payload) > self.max_blob_bytes:
            raise MessageTooLarge(f"blob of {len(payload)} bytes exceeds max_blob_bytes={self.max_blob_bytes}")
        cls = topic_class or topics.topic_class(topic)
        if cls not in topics.TOPIC_CLASSES:
            raise ValueError(f"unknown topic class {cls!r}")
        chunks = split(bytes(payload), chunk_bytes=self._connection.chunk_limit(topic), cls=cls)  # type: ignore[arg-type]
        infos = [self.publish(topic, encode(c), qos, False, topic_class=cls, properties=properties) for c in chunks]
        return Published(infos, transfer=chunks[0].transfer)

    # --- requests --------------------------------------------------------------------------

    def send_request(
        self,
        topic: str,
        msg: Envelope,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        reply_topic: str | None = None,
        qos: int = 1,
        to_inbox: bool = False,
        topic_class: str | None = None,
    ) -> concurrent.futures.Future:
        """Send a request; return a Future of the reply envelope.

        Each attempt waits `timeout` s; then the request is re-sent with the *same* correlation id,
        up to `retries` times, then the Future fails with `RequestTimeout`. An `ErrorReply` fails
        it with `RemoteError`. With `to_inbox=True` the reply (or the timeout, as an `ErrorEvent`)
        is also put in the inbox, so a single worker thread can handle replies in arrival order.
        """
        if not isinstance(msg, Envelope) or not msg.is_request:
            raise TypeError(f"{type(msg).__name__} is not a request message")
        timeout = self.settings.request_timeout if timeout is None else timeout
        retries = self.settings.request_retries if retries is None else retries
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        reply_topic = reply_topic or self.reply_topic
        if reply_topic is None:
            raise ValueError("no reply topic: pass reply_topic= or use a client id that is a node id")
        if not topics.is_reply_topic(reply_topic):
            raise ValueError(f"reply_topic {reply_topic!r} is not node/{{id}}/reply or relay/{{id}}/reply")
        if self._requests.add_reply_topic(reply_topic) or reply_topic not in self._subscriptions:
            self.subscribe(reply_topic, 1)
        corr = getattr(msg, "corr", None) or uuid.uuid4().hex
        msg = msg.evolve(reply_to=reply_topic, corr=corr)
        data = encode(msg)
        if len(data) > self._connection.chunk_limit(topic):
            raise MessageTooLarge(f"request of {len(data)} bytes is larger than one chunk")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = corr.encode("ascii")
        # A request nobody can still be waiting for should not be served: let the broker drop it.
        props.MessageExpiryInterval = int(math.ceil(timeout * (retries + 1))) + 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        pending = Pending(
            corr=corr,
            future=future,
            topic=topic,
            data=data,
            qos=qos,
            properties=props,
            cls=topic_class or msg.byte_class or topics.topic_class(topic),
            timeout=timeout,
            retries=retries,
            deadline=time.monotonic() + timeout,
            reply_topic=reply_topic,
            expect=msg.reply_types,
            to_inbox=to_inbox,
        )
        self._requests.add(pending)
        try:
            self.publish(topic, data, qos, False, topic_class=pending.cls, properties=props)
        except BaseException:
            self._requests.discard(corr)
            raise
        self._wake.set()
        return future

    def request(
        self,
        topic: str,
        msg: Envelope,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        reply_topic: str | None = None,
        qos: int = 1,
        topic_class: str | None = None,
    ) -> Envelope:
        """Send a request and block for its reply (see `send_request`). Raises `RequestTimeout`,
        `RemoteError` (typed error reply), `ClientStopped`."""
        timeout = self.settings.request_timeout if timeout is None else timeout
        retries = self.settings.request_retries if retries is None else retries
        future = self.send_request(
            topic, msg, timeout=timeout, retries=retries, reply_topic=reply_topic, qos=qos, topic_class=topic_class
        )
        done, _ = concurrent.futures.wait([future], timeout=timeout * (retries + 1) + 5.0)
        if not done:  # the housekeeper normally fails it long before
            raise RequestTimeout("no reply (client housekeeping stalled)")
        return future.result()

    # --- housekeeping thread: retries, timeouts, chunk deadlines ------------------------------

    def _housekeeping(self) -> None:
        while not self._connection.stopping:
            try:
                deadlines = [d for d in (self._requests.tick(), self._receiver.expire()) if d is not None]
                next_wake = (min(deadlines) - time.monotonic()) if deadlines else 1.0
            except Exception as exc:  # noqa: BLE001 - keep the thread alive
                self._inbox.callback_error(exc, None)
                next_wake = 0.5
            self._wake.wait(max(0.005, min(next_wake, 1.0)))
            self._wake.clear()

    def __repr__(self) -> str:
        s = self.settings
        where = f"unix:{s.unix_socket}" if s.unix_socket else f"{s.host}:{s.port}"
        return f"MqttClient({s.client_id!r} @ {where}, connected={self.connected})"


__all__ = [
    "ClientSettings",
    "ErrorEvent",
    "Inbound",
    "InboxItem",
    "MqttClient",
    "Published",
    "Responder",
    "Will",
    "drain",
    "iter_inbox",
    "parse_broker_url",
]
