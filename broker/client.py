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

Example (a broker must be running; see `broker.launcher.PrivateMosquitto`):

>>> client = MqttClient(client_id="edge-1", port=1883, status_node_id="edge-1")   # doctest: +SKIP
>>> client.subscribe(topics.node_batch("edge-1"))                                 # doctest: +SKIP
>>> client.start(); client.wait_connected(5)                                      # doctest: +SKIP
>>> helpers = client.request(topics.mds_query(), HelpQuery(...), timeout=2)       # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker import topics
from broker.chunking import CHUNK_OVERHEAD, ChunkAssembler, split
from broker.errors import (
    BusError,
    ChunkError,
    ClientStopped,
    MessageTooLarge,
    NotConnected,
    RemoteError,
    RequestRejected,
    RequestTimeout,
    TopicError,
    UnknownMessageType,
    WireError,
)
from broker.wire import BlobChunk, Envelope, ErrorReply, decode, decode_config, encode, message_types

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_CHUNK_BYTES = 256 << 10
#: Bytes of an MQTT PUBLISH packet beyond payload and topic (header, packet id, properties).
PACKET_OVERHEAD = 1024

Decoding = Literal["auto", "msgpack", "config", "raw"]
MessageClasses = tuple[type[Envelope], ...]


# --- data carried by the client --------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    """The last-will message, registered with the broker before connecting."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    @classmethod
    def offline(cls, node_id: str) -> "Will":
        """`node/{id}/status` = `offline`, QoS 1, retained."""
        return cls(topics.node_status(node_id), topics.STATUS_OFFLINE, 1, True)


@dataclass(frozen=True)
class Inbound:
    """One received message, decoded and validated (or raw for raw subscriptions).

    `message` is the decoded envelope, or None for raw subscriptions, status topics, and empty
    payloads (an empty retained payload means "retained state cleared"). `payload` is the raw bytes
    (the reassembled payload for a chunked message).
    """

    topic: str
    message: Envelope | None
    payload: bytes
    properties: Properties | None
    received_at: float
    retained: bool = False
    qos: int = 0
    byte_class: str = "other"

    @property
    def reply_to(self) -> str | None:
        """Where to answer: the envelope's `reply_to`, else the v5 ResponseTopic."""
        value = getattr(self.message, "reply_to", None)
        if value:
            return value
        return getattr(self.properties, "ResponseTopic", None) or None

    @property
    def corr(self) -> str | None:
        """The correlation id: the envelope's `corr`, else the v5 CorrelationData."""
        value = getattr(self.message, "corr", None)
        if value:
            return value
        data = getattr(self.properties, "CorrelationData", None)
        if isinstance(data, (bytes, bytearray)):
            try:
                return bytes(data).decode("ascii")
            except UnicodeDecodeError:
                return None
        return None


@dataclass(frozen=True)
class ErrorEvent:
    """Something that went wrong inside the client, delivered through the inbox.

    `context`: `decode` (not a valid message, or a type the topic does not accept), `chunk`,
    `size` (above the topic's limit), `connect`, `subscribe`, `timeout`, `callback`, `overflow`.
    """

    error: BaseException
    context: str
    topic: str | None = None
    received_at: float = field(default_factory=time.time)
    corr: str | None = None


InboxItem = Inbound | ErrorEvent


@dataclass
class Published:
    """What `publish_message`/`publish_blob` handed to paho: one info per MQTT message."""

    infos: list[mqtt.MQTTMessageInfo]
    transfer: str | None = None

    def wait(self, timeout: float = 10.0) -> bool:
        """True once the broker acknowledged every message (QoS 1/2) or paho sent it (QoS 0)."""
        deadline = time.monotonic() + timeout
        for info in self.infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if not info.is_published():
                    return False
            except (RuntimeError, ValueError):  # a QoS 0 message dropped while disconnected
                return False
        return True


@dataclass
class _Subscription:
    filter: str
    qos: int
    decoding: Decoding
    accept: MessageClasses | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class _Rule:
    """How a message on one topic is taken: its decoding, the accepted types (the message must be
    an instance of every tuple in `accept`) and the largest whole message in bytes."""

    decoding: Decoding
    accept: tuple[MessageClasses, ...]
    max_bytes: int


@dataclass
class _Pending:
    corr: str
    future: concurrent.futures.Future
    topic: str
    data: bytes
    qos: int
    properties: Properties
    cls: str
    timeout: float
    retries: int
    deadline: float
    reply_topic: str
    expect: tuple[type[Envelope], ...]
    to_inbox: bool
    attempts: int = 1


def parse_broker_url(url: str) -> dict[str, Any]:
    """`mqtt://host:port`, `mqtts://host:port`, `tcp://…`, `unix:///path` -> client keyword args."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"no socket path in {url!r}")
        return {"unix_socket": path}
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported broker URL scheme in {url!r} (mqtt, mqtts, unix)")
    tls = scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    out: dict[str, Any] = {"host": parts.hostname, "port": port}
    if tls:
        out["tls"] = True
    return out


# --- the client ------------------------------------------------------------------------------


class MqttClient:
    """A paho-mqtt 2.x client with reconnects, request/response, chunking and byte accounting.

    All settings are keyword-only and checked at once. Lifecycle: construct, `subscribe(...)` and
    `set_retained(...)` (remembered, redone on every connect), `start()`, work, `stop()`. A stopped
    client is not restarted: make a new one (same `client_id` resumes the session).

    Key settings: `client_id` (fixed; the session key), `host`/`port` or `unix_socket`,
    `session_expiry` (s, > 0 keeps queued QoS 1 messages while offline), `clean_start` (False:
    always resume the session; True: start clean once, then resume on reconnects),
    `status_node_id` (sets the will `node/{id}/status` = `offline` and retained `online` state),
    `max_message_bytes`, `chunk_bytes`, `max_blob_bytes`, `inbox_size`,
    `reconnect_min_delay`/`reconnect_max_delay` (s), TLS (`tls_ca`, `tls_cert`, `tls_key`,
    `tls_key_password_file`), `username` + `password_file`.
    """

    def __init__(
        self,
        *,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        unix_socket: str | None = None,
        session_expiry: int = 3600,
        clean_start: bool = False,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_key_password_file: str | Path | None = None,
        will: Will | None = None,
        status_node_id: str | None = None,
        reply_topic: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_blob_bytes: int = 64 << 20,
        max_transfers: int = 16,
        transfer_deadline: float = 60.0,
        inbox_size: int = 1000,
        max_offline_queue: int = 10_000,
        reconnect_min_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        request_timeout: float = 10.0,
        request_retries: int = 2,
        name: str | None = None,
    ) -> None:
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= 128 or any(c.isspace() for c in client_id):
            raise ValueError("client_id must be 1-128 characters without whitespace")
        if not 0 < session_expiry < 0x100000000:
            raise ValueError("session_expiry must be in [1, 2**32) s: the session must outlive a reconnect")
        if max_message_bytes <= CHUNK_OVERHEAD * 2:
            raise ValueError("max_message_bytes too small")
        if not CHUNK_OVERHEAD < chunk_bytes <= max_message_bytes:
            raise ValueError(f"chunk_bytes must be in ({CHUNK_OVERHEAD}, max_message_bytes]")
        if inbox_size < 1 or max_transfers < 1 or max_blob_bytes < chunk_bytes:
            raise ValueError("inbox_size and max_transfers must be >= 1, max_blob_bytes >= chunk_bytes")
        if not 0 < reconnect_min_delay <= reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if password is not None and password_file is not None:
            raise ValueError("give password or password_file, not both")
        if status_node_id is not None:
            topics.validate_node_id(status_node_id)
            if will is None:
                will = Will.offline(status_node_id)
        if will is not None:
            topics.validate_publish_topic(will.topic)
        if reply_topic is None and topics.is_valid_node_id(client_id):
            reply_topic = topics.node_reply(client_id)
        if reply_topic is not None and not topics.is_reply_topic(reply_topic):
            raise ValueError(f"reply_topic {reply_topic!r} is not node/{{id}}/reply or relay/{{id}}/reply")

        self.client_id = client_id
        self.name = name or client_id
        self.host = host
        self.port = port
        self.unix_socket = unix_socket
        self.session_expiry = int(session_expiry)
        self.clean_start = clean_start
        self.keepalive = keepalive
        self._username = username
        self._password = password
        self._password_file = password_file
        self._tls = tls or any(x is not None for x in (tls_ca, tls_cert, tls_key))
        self._tls_ca, self._tls_cert, self._tls_key = tls_ca, tls_cert, tls_key
        self._tls_key_password_file = tls_key_password_file
        self.will = will
        self.status_node_id = status_node_id
        self.reply_topic = reply_topic
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes
        self.max_blob_bytes = max_blob_bytes
        self.max_offline_queue = max_offline_queue
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.request_timeout = request_timeout
        self.request_retries = request_retries

        self._inbox: queue.Queue[InboxItem] = queue.Queue(maxsize=inbox_size)
        self._assembler = ChunkAssembler(
            max_bytes=max_blob_bytes,
            max_transfers=max_transfers,
            max_buffered_bytes=max_blob_bytes * 2,
            deadline_s=transfer_deadline,
        )
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._subs: dict[str, _Subscription] = {}
        self._retained: dict[str, tuple[bytes, int, str | None]] = {}
        if status_node_id is not None:
            self._retained[topics.node_status(status_node_id)] = (topics.STATUS_ONLINE, 1, "status")
        self._reply_topics: set[str] = {reply_topic} if reply_topic else set()
        self._pending: dict[str, _Pending] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._suback_pending: set[int] = set()
        self._bytes: dict[str, list[int]] = {c: [0, 0] for c in topics.TOPIC_CLASSES}
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "connects",
                "connect_failures",
                "connect_refused",
                "disconnects",
                "session_present",
                "requests",
                "retries",
                "replies",
                "remote_errors",
                "duplicate_replies",
                "late_replies",
                "timeouts",
                "received",
                "inbox_dropped",
                "decode_errors",
                "type_refused",
                "too_large",
                "chunk_errors",
                "chunks_discarded",
                "qos0_dropped",
                "callback_errors",
                "subscribe_refused",
            ),
            0,
        )
        self.last_refusal: str | None = None
        self._connected = threading.Event()
        self._server_max_packet: int | None = None
        self._ever_connected = False
        self._started = False
        self._stopping = False
        self._paho: mqtt.Client | None = None
        self._wake = threading.Event()
        self._housekeeper: threading.Thread | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "MqttClient":
        """Build from `mqtt://host:port`, `mqtts://host:port` or `unix:///path` plus settings."""
        return cls(**parse_broker_url(url), **kwargs)

    # --- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    @property
    def loop_alive(self) -> bool:
        """paho's network thread is running (for a watchdog: connected or reconnecting, not dead)."""
        thread = getattr(self._paho, "_thread", None) if self._paho is not None else None
        return thread is not None and thread.is_alive()

    @property
    def inbox(self) -> "queue.Queue[InboxItem]":
        """The bounded queue of `Inbound` and `ErrorEvent` items."""
        return self._inbox

    def get(self, timeout: float | None = None) -> InboxItem | None:
        """Next inbox item, or None after `timeout` s."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def byte_counts(self) -> dict[str, dict[str, int]]:
        """Payload bytes per class: `{class: {"out": n, "in": n}}` (every class present)."""
        with self._lock:
            return {c: {"out": v[0], "in": v[1]} for c, v in self._bytes.items()}

    def stats(self) -> dict[str, int]:
        """Counters: connects, refusals, retries, late/duplicate replies, drops, errors, …"""
        with self._lock:
            out = dict(self._stats)
        out["chunk_duplicates"] = self._assembler.duplicates
        out["chunks_refused"] = self._assembler.refused_chunks
        out["transfers_pending"] = self._assembler.pending
        return out

    @property
    def server_max_packet(self) -> int | None:
        """MaximumPacketSize from the broker's last CONNACK (None: not announced)."""
        return self._server_max_packet

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "MqttClient":
        """Begin connecting in the background and return at once (the broker may be down)."""
        with self._lock:
            if self._started:
                raise BusError("client already started (a stopped client cannot be restarted)")
            self._started = True
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            transport="unix" if self.unix_socket else "tcp",
            reconnect_on_failure=True,
        )
        client.suppress_exceptions = True
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_socket_open = _no_delay
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        # Capped exponential backoff; the floor jittered so a fleet does not reconnect in lockstep.
        client.reconnect_delay_set(
            min_delay=self.reconnect_min_delay * (1.0 + 0.5 * random.random()),  # type: ignore[arg-type]
            max_delay=self.reconnect_max_delay,  # type: ignore[arg-type]
        )
        client.max_queued_messages_set(self.max_offline_queue)
        if self._username is not None:
            password = self._password
            if self._password_file is not None:
                password = Path(self._password_file).read_text().rstrip("\r\n")
            client.username_pw_set(self._username, password)
        if self._tls:
            key_password = None
            if self._tls_key_password_file is not None:
                key_password = Path(self._tls_key_password_file).read_text().rstrip("\r\n")
            client.tls_set(
                ca_certs=str(self._tls_ca) if self._tls_ca else None,
                certfile=str(self._tls_cert) if self._tls_cert else None,
                keyfile=str(self._tls_key) if self._tls_key else None,
                keyfile_password=key_password,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if self.will is not None:  # before connecting, or the broker never learns it
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.MaximumPacketSize = min(self.max_blob_bytes, self.max_message_bytes + 64 * 1024)
        self._paho = client
        client.connect_async(
            self.unix_socket or self.host,
            self.port,
            keepalive=self.keepalive,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY if self.clean_start else False,
            properties=props,
        )
        if self.reply_topic is not None and self.reply_topic not in self._subs:
            self._subs[self.reply_topic] = _Subscription(self.reply_topic, 1, "auto")
        client.loop_start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name=f"mqtt-house-{self.name}", daemon=True)
        self._housekeeper.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (successful CONNACK); False after `timeout` s."""
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Block until connected and every subscription of this connection is acknowledged."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._connected.is_set() and not self._suback_pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline` (if it owns a status), disconnect cleanly, stop the threads.

        Pending requests fail with `ClientStopped`. The session stays on the broker for
        `session_expiry` seconds (queued QoS 1 messages wait there for the next start).
        """
        with self._lock:
            if not self._started or self._stopping:
                return
            self._stopping = True
        client = self._paho
        assert client is not None
        try:
            if self.status_node_id is not None and self.connected:
                info = client.publish(topics.node_status(self.status_node_id), topics.STATUS_OFFLINE, 1, True)
                self._count("status", 0, len(topics.STATUS_OFFLINE))
                Published([info]).wait(min(timeout, 2.0))
            client.disconnect()
        except Exception:  # noqa: BLE001 - stopping must not fail half-way
            log.exception("%s: error while disconnecting", self.name)
        client.loop_stop()
        self._connected.clear()
        self._wake.set()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout)
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            if not p.future.done():
                p.future.set_exception(ClientStopped(f"client {self.name} stopped before a reply to {p.corr}"))

    def abort_connection(self) -> None:
        """Close the socket without a DISCONNECT, as a crash or a cut cable would: the broker
        publishes the will; the client then reconnects. For tests and fault drills."""
        client = self._paho
        sock = client.socket() if client is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
        accept: MessageClasses | None = None,
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
        topics.validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if accept is not None:
            accept = (accept,) if isinstance(accept, type) else tuple(accept)
            if not accept or not all(isinstance(c, type) and issubclass(c, Envelope) for c in accept):
                raise ValueError("accept must be a non-empty tuple of message classes")
        if max_bytes is not None and not 0 < max_bytes <= self.max_blob_bytes:
            raise ValueError(f"max_bytes must be in [1, max_blob_bytes={self.max_blob_bytes}]")
        # Under the lock `_on_connect` holds from its snapshot of the subscriptions until it marks
        # the client connected: a subscription added meanwhile is in the snapshot or sent here.
        with self._lock:
            self._subs[topic_filter] = _Subscription(topic_filter, qos, decoding, accept, max_bytes)
            if self._connected.is_set():
                self._send_subscribe([self._subs[topic_filter]], retain_handling=0)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            sub = self._subs.pop(topic_filter, None)
        if sub is not None and self._paho is not None and self.connected:
            self._paho.unsubscribe(topic_filter)

    def set_retained(self, topic: str, payload: bytes | Envelope, qos: int = 1, *, topic_class: str | None = None) -> None:
        """Retained state: published now (if connected) and again on every connect."""
        topics.validate_publish_topic(topic)
        data = encode(payload) if isinstance(payload, Envelope) else bytes(payload)
        cls = topic_class or (payload.byte_class if isinstance(payload, Envelope) else None)
        self._check_size(topic, data)
        with self._lock:  # as in `subscribe`: never lost to a connect in progress
            self._retained[topic] = (data, qos, cls)
            if self._connected.is_set():
                self.publish(topic, data, qos, True, topic_class=cls)

    def clear_retained(self, topic: str) -> None:
        """Forget retained state and delete it on the broker (empty retained payload)."""
        with self._lock:
            self._retained.pop(topic, None)
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
        topics.validate_publish_topic(topic)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        self._check_size(topic, data)
        client = self._require_client()
        info = client.publish(topic, data, qos, retain, properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise NotConnected(f"paho's outgoing queue is full ({self.max_offline_queue} messages)")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                with self._lock:
                    self._stats["qos0_dropped"] += 1
                return info
            # QoS 1/2 while disconnected: paho keeps it and sends it after the next CONNACK. Say so,
            # or `is_published()`/`wait_for_publish()` would raise on a message that is on its way.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._count(topic_class or topics.topic_class(topic), 0, len(data))
        return info

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
        if len(data) <= self._chunk_limit(topic):
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
        chunks = split(bytes(payload), chunk_bytes=self._chunk_limit(topic), cls=cls)  # type: ignore[arg-type]
        infos = [self.publish(topic, encode(c), qos, False, topic_class=cls, properties=properties) for c in chunks]
        return Published(infos, transfer=chunks[0].transfer)

    def _chunk_limit(self, topic: str) -> int:
        limit = min(self.chunk_bytes, self.max_message_bytes)
        server = self._server_max_packet
        if server is not None:
            limit = min(limit, server - len(topic.encode()) - PACKET_OVERHEAD)
        return max(limit, CHUNK_OVERHEAD + 1)

    def _check_size(self, topic: str, data: bytes) -> None:
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(
                f"payload of {len(data)} bytes exceeds max_message_bytes={self.max_message_bytes}; "
                "use publish_message or publish_blob to send it in chunks"
            )
        server = self._server_max_packet
        if server is not None and len(data) + len(topic.encode()) + PACKET_OVERHEAD > server:
            raise MessageTooLarge(
                f"payload of {len(data)} bytes does not fit the broker's MaximumPacketSize {server}; "
                "use publish_message or publish_blob"
            )

    def _require_client(self) -> mqtt.Client:
        if self._paho is None or self._stopping:
            raise NotConnected(f"client {self.name} is not started or already stopped")
        return self._paho

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
        timeout = self.request_timeout if timeout is None else timeout
        retries = self.request_retries if retries is None else retries
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        reply_topic = reply_topic or self.reply_topic
        if reply_topic is None:
            raise ValueError("no reply topic: pass reply_topic= or use a client id that is a node id")
        if not topics.is_reply_topic(reply_topic):
            raise ValueError(f"reply_topic {reply_topic!r} is not node/{{id}}/reply or relay/{{id}}/reply")
        with self._lock:
            new_reply_topic = reply_topic not in self._reply_topics
            self._reply_topics.add(reply_topic)
        if new_reply_topic or reply_topic not in self._subs:
            self.subscribe(reply_topic, 1)
        corr = getattr(msg, "corr", None) or uuid.uuid4().hex
        msg = msg.evolve(reply_to=reply_topic, corr=corr)
        data = encode(msg)
        if len(data) > self._chunk_limit(topic):
            raise MessageTooLarge(f"request of {len(data)} bytes is larger than one chunk")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = corr.encode("ascii")
        # A request nobody can still be waiting for should not be served: let the broker drop it.
        props.MessageExpiryInterval = int(math.ceil(timeout * (retries + 1))) + 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        pending = _Pending(
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
        with self._lock:
            if corr in self._pending:
                raise ValueError(f"a request with corr {corr} is already pending")
            self._pending[corr] = pending
            self._stats["requests"] += 1
        try:
            self.publish(topic, data, qos, False, topic_class=pending.cls, properties=props)
        except BaseException:
            with self._lock:
                self._pending.pop(corr, None)
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
        timeout = self.request_timeout if timeout is None else timeout
        retries = self.request_retries if retries is None else retries
        future = self.send_request(
            topic, msg, timeout=timeout, retries=retries, reply_topic=reply_topic, qos=qos, topic_class=topic_class
        )
        done, _ = concurrent.futures.wait([future], timeout=timeout * (retries + 1) + 5.0)
        if not done:  # the housekeeper normally fails it long before
            raise RequestTimeout("no reply (client housekeeping stalled)")
        return future.result()

    # --- paho callbacks (paho's thread: never block, never raise) ----------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self._connected.clear()
                with self._lock:
                    self._stats["connect_refused"] += 1
                    self.last_refusal = str(reason_code)
                log.warning("%s: broker refused the connection: %s", self.name, reason_code)
                self._emit(ErrorEvent(NotConnected(f"broker refused the connection: {reason_code}"), "connect"))
                return
            server_max = getattr(properties, "MaximumPacketSize", None)
            self._server_max_packet = int(server_max) if server_max else None
            resumed = bool(flags.session_present)
            # One critical section from the snapshot to "connected": a `subscribe` or
            # `set_retained` from another thread lands either in the snapshot or after it, when it
            # sees the client connected and sends for itself (otherwise it could miss both).
            with self._cond:
                subs = list(self._subs.values())
                retained = list(self._retained.items())
                self._suback_pending.clear()
                self._stats["connects"] += 1
                self._stats["session_present"] += int(resumed)
                # On a resumed session the broker still has the subscriptions: re-subscribing is
                # then harmless with retain handling 1 (no second copy of retained messages). A new
                # process (not yet connected once) wants the retained state, whatever the session says.
                retain_handling = 1 if (resumed and self._ever_connected) else 0
                if subs:
                    self._send_subscribe(subs, retain_handling=retain_handling)
                for topic, (data, qos, cls) in retained:
                    self.publish(topic, data, qos, True, topic_class=cls)
                self._ever_connected = True
                self._connected.set()
                self._cond.notify_all()
            log.info("%s: connected (session present: %s)", self.name, resumed)
        except Exception as exc:  # noqa: BLE001
            self._callback_error(exc, None)

    def _send_subscribe(self, subs: list[_Subscription], *, retain_handling: int) -> None:
        client = self._paho
        if client is None:
            return
        request = [(s.filter, SubscribeOptions(qos=s.qos, retainHandling=retain_handling)) for s in subs]
        with self._cond:
            rc, mid = client.subscribe(request)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._suback_pending.add(mid)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        try:
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            with self._cond:
                self._suback_pending.discard(mid)
                if refused:
                    self._stats["subscribe_refused"] += len(refused)
                self._cond.notify_all()
            if refused:
                self._emit(ErrorEvent(BusError(f"subscription refused: {', '.join(refused)}"), "subscribe"))
        except Exception as exc:  # noqa: BLE001
            self._callback_error(exc, None)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        try:
            std = mqtt.LOGGING_LEVEL.get(level, logging.DEBUG)
            if self._stopping or not self._started or buf.startswith("Client is not connected"):
                std = logging.DEBUG  # paho's noise about the socket it is about to reopen (or we close)
            _paho_log.log(std, "%s: %s", self.name, buf)
        except Exception:  # noqa: BLE001
            pass

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            with self._lock:
                self._stats["connect_failures"] += 1
                failures = self._stats["connect_failures"]
            # An operator reading the journal must see why nothing happens: the first failure and
            # then every tenth, so a long outage does not flood it.
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "%s: cannot connect to %s (%d attempts so far%s); retrying",
                    self.name, self._where(), failures, self._why_unreachable(),
                )
        except Exception as exc:  # noqa: BLE001
            self._callback_error(exc, None)

    def _where(self) -> str:
        return f"unix socket {self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"

    def _why_unreachable(self) -> str:
        """paho does not pass the connect error on; a name that does not resolve is worth saying."""
        if self.unix_socket:
            return ""
        try:
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return f": the host name does not resolve ({exc})"
        return ": refused, unreachable or not answering"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            with self._cond:
                was = self._connected.is_set()
                self._connected.clear()
                self._suback_pending.clear()
                if was:
                    self._stats["disconnects"] += 1
                self._cond.notify_all()
            if was and not self._stopping:
                log.info("%s: disconnected (%s); reconnecting", self.name, reason_code)
        except Exception as exc:  # noqa: BLE001
            self._callback_error(exc, None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic: str | None = None
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                self._emit(ErrorEvent(TopicError("topic is not valid UTF-8"), "decode"))
                return
            self._handle_message(topic, bytes(msg.payload), getattr(msg, "properties", None), bool(msg.retain), msg.qos)
        except Exception as exc:  # noqa: BLE001 - never raise into paho
            self._callback_error(exc, topic)

    def _handle_message(self, topic: str, payload: bytes, props: Properties | None, retained: bool, qos: int) -> None:
        now = time.time()
        with self._lock:
            self._stats["received"] += 1
        tcls = topics.topic_class(topic)
        rule = self._rule_for(topic, tcls)
        if rule.decoding == "raw" or not payload:
            self._count(tcls, 1, len(payload))
            self._emit(Inbound(topic, None, payload, props, now, retained, qos, tcls))
            return
        try:  # the size is checked before anything is parsed
            message = self._decode(payload, rule.decoding, min(rule.max_bytes, self.max_message_bytes))
        except WireError as exc:
            self._count(tcls, 1, len(payload))
            self._refuse(exc, topic)
            return
        if not isinstance(message, BlobChunk):
            self._dispatch(topic, message, payload, props, now, retained, qos, rule.accept, counted_as=None)
            return
        chunk_cls = message.cls
        self._count(chunk_cls, 1, len(payload))
        try:
            whole = self._assembler.add(message, max_bytes=rule.max_bytes, source=topic)
            if whole is None:
                return
            message = self._decode(whole, rule.decoding, rule.max_bytes)
            if isinstance(message, BlobChunk):
                raise WireError("a chunked payload may not be a chunk itself")
        except WireError as exc:  # ChunkError included
            self._refuse(exc, topic)
            return
        self._dispatch(topic, message, whole, props, now, retained, qos, rule.accept, counted_as=chunk_cls)

    def _dispatch(
        self,
        topic: str,
        message: Envelope,
        payload: bytes,
        props: Properties | None,
        now: float,
        retained: bool,
        qos: int,
        accept: tuple[MessageClasses, ...],
        counted_as: str | None,
    ) -> None:
        tcls = topics.topic_class(topic)
        if not all(isinstance(message, classes) for classes in accept):
            if counted_as is None:
                self._count(tcls, 1, len(payload))
            taken = sorted(set.intersection(*(set(_type_names(classes)) for classes in accept)))
            with self._lock:
                self._stats["type_refused"] += 1
            error = UnknownMessageType(f"a {message.type!r} message is not accepted on {topic} (it takes {taken})")
            self._emit(ErrorEvent(error, "decode", topic))
            return
        if message.is_reply:
            corr = getattr(message, "corr", None)
            if not corr and props is not None:
                data = getattr(props, "CorrelationData", None)
                corr = bytes(data).decode("ascii", "replace") if isinstance(data, (bytes, bytearray)) else None
            with self._lock:
                pending = self._pending.get(corr) if corr else None
                if pending is not None and pending.reply_topic != topic:
                    pending = None  # a reply counts only on the topic its request named
                if pending is not None:
                    del self._pending[pending.corr]
                    self._remember_finished(pending.corr, "answered")
                ours = topic in self._reply_topics
                finished = self._finished.get(corr) if corr else None
            if pending is not None:
                cls = counted_as or message.byte_class or pending.cls
                if counted_as is None:
                    self._count(cls, 1, len(payload))
                self._resolve(pending, message, Inbound(topic, message, payload, props, now, retained, qos, cls))
                return
            if ours:
                if counted_as is None:
                    self._count(message.byte_class or tcls, 1, len(payload))
                with self._lock:
                    key = "duplicate_replies" if finished == "answered" else "late_replies"
                    self._stats[key] += 1
                log.debug("%s: dropped a %s reply (corr %s)", self.name, finished or "late", corr)
                return
        cls = counted_as or message.byte_class or tcls
        if counted_as is None:
            self._count(cls, 1, len(payload))
        self._emit(Inbound(topic, message, payload, props, now, retained, qos, cls))

    def _resolve(self, pending: _Pending, message: Envelope, item: Inbound) -> None:
        with self._lock:
            self._stats["replies"] += 1
        if isinstance(message, ErrorReply):
            with self._lock:
                self._stats["remote_errors"] += 1
            error: BaseException | None = RemoteError(message)
        elif not isinstance(message, pending.expect):
            error = UnknownMessageType(f"reply of type {message.type!r} to a request expecting {pending.expect}")
        else:
            error = None
        if error is None:
            pending.future.set_result(message)
        else:
            pending.future.set_exception(error)
        if pending.to_inbox:
            self._emit(item)

    def _rule_for(self, topic: str, tcls: str) -> _Rule:
        """The subscriptions' settings for `topic`, else its kind's defaults (also for a message
        that no subscription of this process matches, from a session an earlier one left)."""
        with self._lock:
            subs = [s for s in self._subs.values() if topics.matches(s.filter, topic)]
        explicit = [s.decoding for s in subs if s.decoding != "auto"]
        if explicit:
            decoding = explicit[0]
        elif tcls == "status":
            decoding = "raw"
        elif tcls == "config":
            decoding = "config"
        else:
            decoding = "msgpack"
        default = topics.topic_rule(topic)
        accept = tuple(s.accept for s in subs if s.accept is not None)
        if not accept and default.accepts is not None:
            accept = (_classes(default.accepts),)
        limits = [s.max_bytes for s in subs if s.max_bytes is not None]
        max_bytes = min(limits) if limits else (default.max_bytes or self.max_blob_bytes)
        return _Rule(decoding, accept, min(max_bytes, self.max_blob_bytes))

    @staticmethod
    def _decode(data: bytes, decoding: Decoding, max_bytes: int) -> Envelope:
        if decoding == "config":
            return decode_config(data, expect=None, max_bytes=max_bytes)
        return decode(data, max_bytes=max_bytes)

    # --- housekeeping thread: retries, timeouts, chunk deadlines ------------------------------

    def _housekeeping(self) -> None:
        while not self._stopping:
            try:
                next_wake = self._housekeeping_once()
            except Exception as exc:  # noqa: BLE001 - keep the thread alive
                self._callback_error(exc, None)
                next_wake = 0.5
            self._wake.wait(max(0.005, min(next_wake, 1.0)))
            self._wake.clear()

    def _housekeeping_once(self) -> float:
        now = time.monotonic()
        resend: list[_Pending] = []
        expired: list[_Pending] = []
        with self._lock:
            for p in list(self._pending.values()):
                if p.deadline > now:
                    continue
                if p.attempts <= p.retries:
                    p.attempts += 1
                    p.deadline = now + p.timeout
                    self._stats["retries"] += 1
                    resend.append(p)
                else:
                    del self._pending[p.corr]
                    self._remember_finished(p.corr, "timeout")
                    self._stats["timeouts"] += 1
                    expired.append(p)
            deadlines = [p.deadline for p in self._pending.values()]
        for p in resend:
            try:
                self.publish(p.topic, p.data, p.qos, False, topic_class=p.cls, properties=p.properties)
            except BusError as exc:
                log.warning("%s: retry of %s not sent: %s", self.name, p.corr, exc)
        for p in expired:
            err = RequestTimeout(
                f"no reply to {p.corr} on {p.topic} after {p.attempts} attempts of {p.timeout} s",
                corr=p.corr,
                attempts=p.attempts,
            )
            if not p.future.done():
                p.future.set_exception(err)
            if p.to_inbox:
                self._emit(ErrorEvent(err, "timeout", p.topic, corr=p.corr))
        for d in self._assembler.expire():
            with self._lock:
                self._stats["chunks_discarded"] += 1
            self._emit(
                ErrorEvent(
                    ChunkError(
                        f"transfer {d.transfer} ({d.cls}) incomplete after {d.age_s:.1f} s: "
                        f"{d.received_chunks}/{d.count} chunks; discarded"
                    ),
                    "chunk",
                    d.source or None,
                )
            )
        chunk_deadline = self._assembler.next_deadline()
        if chunk_deadline is not None:
            deadlines.append(chunk_deadline)
        return (min(deadlines) - time.monotonic()) if deadlines else 1.0

    # --- helpers -----------------------------------------------------------------------------

    def _remember_finished(self, corr: str, how: str) -> None:
        self._finished[corr] = how
        while len(self._finished) > 4096:
            self._finished.popitem(last=False)

    def _count(self, cls: str, direction: int, n: int) -> None:
        with self._lock:
            self._bytes.setdefault(cls if cls in self._bytes else "other", [0, 0])[direction] += n

    def _emit(self, item: InboxItem) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._stats["inbox_dropped"] += 1
                dropped = self._stats["inbox_dropped"]
            if dropped & (dropped - 1) == 0:  # log at 1, 2, 4, 8, … drops
                log.warning("%s: inbox full, %d items dropped so far", self.name, dropped)

    def _refuse(self, exc: WireError, topic: str) -> None:
        """Count a refused message and report it: `size` above the limit, `chunk` for a transfer
        that cannot be reassembled, `decode` for the rest."""
        if isinstance(exc, MessageTooLarge):
            key, context = "too_large", "size"
        elif isinstance(exc, ChunkError):
            key, context = "chunk_errors", "chunk"
        else:
            key, context = "decode_errors", "decode"
        with self._lock:
            self._stats[key] += 1
        self._emit(ErrorEvent(exc, context, topic))

    def _callback_error(self, exc: BaseException, topic: str | None) -> None:
        try:
            with self._lock:
                self._stats["callback_errors"] += 1
            log.error("%s: unexpected error in a callback: %r", self.name, exc, exc_info=exc)
            self._emit(ErrorEvent(exc, "callback", topic))
        except Exception:  # noqa: BLE001 - the last line of defence
            pass

    def __repr__(self) -> str:
        where = f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"
        return f"MqttClient({self.client_id!r} @ {where}, connected={self.connected})"


@functools.lru_cache(maxsize=None)
def _classes(names: tuple[str, ...]) -> MessageClasses:
    """Message classes of registered `type` names (a topic kind's default)."""
    registry = message_types()
    return tuple(registry[name] for name in names)


def _type_names(classes: MessageClasses) -> list[str]:
    """The registered `type` names of `classes` and their subclasses, for error messages."""
    return [name for name, cls in message_types().items() if issubclass(cls, classes)]


# --- serving requests ------------------------------------------------------------------------


Handler = Callable[[Envelope, Inbound], Envelope]


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send small packets at once: without TCP_NODELAY every request/reply and PUBACK waits for
    the peer's delayed ACK (about 40 ms each way on Linux), which dominated every round trip."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # unix sockets and wrapped sockets without the option: nothing to tune


def _reply_size(reply: Envelope) -> int:
    """Bytes a cached reply holds: its bytes fields (a KT blob) and a bound on the rest."""
    return 1024 + sum(len(v) for v in reply.__dict__.values() if isinstance(v, (bytes, bytearray)))


class Responder:
    """Answer requests idempotently by correlation id.

    `handle(item)` runs `handler(request, item)` once per `corr` and publishes its reply to the
    request's `reply_to` (envelope first, v5 ResponseTopic as fallback) with `CorrelationData`; a
    repeated request (a retry, a redelivery after a reconnect) gets the cached reply again without
    running the handler. `RequestRejected(code, message)` from the handler becomes an
    `ErrorReply` with that code; any other exception an `ErrorReply` with code `internal`.

    It answers only on a reply topic (`node/{id}/reply`, `relay/{id}/reply`): a request naming any
    other topic is refused before the handler runs (counted in `bad_reply_to`, logged), or whoever
    may write a request could have the responder publish (a whole model, say) on a topic they read.

    The cache holds at most `cache_size` replies and `cache_bytes` of encoded replies, oldest out
    first: a helper's replies are whole KT blobs (0.5 MB for the MLP, far more for larger models).
    A reply larger than `cache_bytes` is not cached; a retry of its request runs the handler again.

    `start()` runs a thread that takes items from the client's inbox and serves the requests
    (other items go to `on_other`, if given): enough for tests and simple services.
    """

    def __init__(
        self,
        client: MqttClient,
        handler: Handler,
        *,
        cache_size: int = 1024,
        cache_bytes: int = 16 << 20,
        qos: int = 1,
        on_other: Callable[[InboxItem], None] | None = None,
    ) -> None:
        self.client = client
        self.handler = handler
        self.qos = qos
        self.on_other = on_other
        self._cache: OrderedDict[tuple[str, str], tuple[Envelope, int]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_limit = cache_bytes
        self.cached_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.handled = 0
        self.duplicates = 0
        self.unanswerable = 0
        self.bad_reply_to = 0

    def handle(self, item: Inbound) -> Envelope | None:
        """Serve one inbound request; return the reply sent (None if it was not a request)."""
        request = item.message
        if request is None or not request.is_request:
            return None
        reply_to = item.reply_to
        corr = item.corr
        if not reply_to:
            self.unanswerable += 1
            log.warning("request %s on %s has no reply topic; dropped", corr, item.topic)
            return None
        if not topics.is_reply_topic(reply_to):
            self.bad_reply_to += 1
            log.warning(
                "request %s on %s names %r to answer on, not a reply topic; refused", corr, item.topic, reply_to[:200]
            )
            return None
        # Keyed by reply topic too: a cached reply goes only where its request asked for it.
        key = (reply_to, corr)
        with self._lock:
            entry = self._cache.get(key) if corr else None
        if entry is not None:
            self.duplicates += 1
            self._send(reply_to, entry[0], corr, request)
            return entry[0]
        try:
            reply = self.handler(request, item)
            if not isinstance(reply, Envelope):
                raise TypeError(f"handler returned {type(reply).__name__}, not a message")
        except RequestRejected as exc:
            reply = ErrorReply(corr=corr, code=exc.code if exc.code in _ERROR_CODES else "rejected", message=exc.message[:1000])
        except Exception as exc:  # noqa: BLE001 - a failing handler still answers, typed
            log.exception("handler failed on %s", corr)
            reply = ErrorReply(corr=corr, code="internal", message=f"{type(exc).__name__}: {exc}"[:1000])
        if corr and getattr(reply, "corr", corr) != corr and "corr" in type(reply).model_fields:
            reply = reply.evolve(corr=corr)
        self.handled += 1
        if corr:
            self._remember(key, reply)
        self._send(reply_to, reply, corr, request)
        return reply

    def _remember(self, key: tuple[str, str], reply: Envelope) -> None:
        size = _reply_size(reply)
        if size > self._cache_limit:
            return
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self.cached_bytes -= old[1]
            self._cache[key] = (reply, size)
            self.cached_bytes += size
            while len(self._cache) > self._cache_size or self.cached_bytes > self._cache_limit:
                _, (_, dropped) = self._cache.popitem(last=False)
                self.cached_bytes -= dropped

    def _send(self, reply_to: str, reply: Envelope, corr: str | None, request: Envelope) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if corr:
            props.CorrelationData = corr.encode("ascii", "replace")
        self.client.publish_message(
            reply_to, reply, self.qos, topic_class=reply.byte_class or request.byte_class, properties=props
        )

    def start(self) -> "Responder":
        self._thread = threading.Thread(target=self._run, name=f"responder-{self.client.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.client.get(timeout=0.1)
            if item is None:
                continue
            try:
                if isinstance(item, Inbound) and item.message is not None and item.message.is_request:
                    self.handle(item)
                elif self.on_other is not None:
                    self.on_other(item)
            except Exception:  # noqa: BLE001 - keep serving
                log.exception("responder %s: error serving an item", self.client.name)


_ERROR_CODES = frozenset(ErrorReply.model_fields["code"].annotation.__args__)  # type: ignore[union-attr]


def drain(client: MqttClient) -> list[InboxItem]:
    """Everything currently in the inbox (for tests and shutdown)."""
    items: list[InboxItem] = []
    while True:
        try:
            items.append(client.inbox.get_nowait())
        except queue.Empty:
            return items


def iter_inbox(client: MqttClient, timeout: float) -> Iterable[InboxItem]:
    """Yield inbox items until none arrives for `timeout` s."""
    while True:
        item = client.get(timeout)
        if item is None:
            return
        yield item


__all__ = [
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
