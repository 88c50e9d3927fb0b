"""The one owner of the paho client (STYLE.md ideas 3 and 4): connecting and reconnecting, the
will, what every connect redoes (subscriptions, retained state), and publishing one MQTT message
within the size limits. What each of these guarantees is listed in `broker.client`.

The connect callback holds one lock from its snapshot of the subscriptions and retained state
until the client counts as connected; `subscribe` and `set_retained` take it too, so neither is
lost to a connect in progress. Sizes are enforced here because paho ignores the broker's
MaximumPacketSize.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker import topics
from broker._accounting import Accounting
from broker._inbox import ErrorEvent, Inbox
from broker._receiving import Receiver
from broker._settings import ClientSettings, Will
from broker._subscriptions import Subscription, Subscriptions
from broker.chunking import CHUNK_OVERHEAD
from broker.errors import BusError, MessageTooLarge, NotConnected, TopicError

log = logging.getLogger("broker.client")  # one logger for the client, named after its public module
_paho_log = logging.getLogger("broker.client.paho")

#: Bytes of an MQTT PUBLISH packet beyond payload and topic (header, packet id, properties).
PACKET_OVERHEAD = 1024


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


class Connection:
    """The paho client of one `MqttClient`, its connection state and its retained state."""

    def __init__(
        self,
        settings: ClientSettings,
        subscriptions: Subscriptions,
        receiver: Receiver,
        accounting: Accounting,
        inbox: Inbox,
        *,
        name: str,
    ) -> None:
        self._settings = settings
        self._subscriptions = subscriptions
        self._receiver = receiver
        self._accounting = accounting
        self._inbox = inbox
        self._name = name
        node = settings.status_node_id
        self.will: Will | None = settings.will or (Will.offline(node) if node is not None else None)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._retained: dict[str, tuple[bytes, int, str | None]] = {}
        if node is not None:
            self._retained[topics.node_status(node)] = (topics.STATUS_ONLINE, 1, "status")
        self._suback_pending: set[int] = set()
        self._connected = threading.Event()
        self._ever_connected = False
        self.last_refusal: str | None = None
        self.server_max_packet: int | None = None
        self.started = False
        self.stopping = False
        self._paho: mqtt.Client | None = None

    # --- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def loop_alive(self) -> bool:
        thread = getattr(self._paho, "_thread", None) if self._paho is not None else None
        return thread is not None and thread.is_alive()

    def wait_connected(self, timeout: float | None) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._connected.is_set() and not self._suback_pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def where(self) -> str:
        s = self._settings
        return f"unix socket {s.unix_socket}" if s.unix_socket else f"{s.host}:{s.port}"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; paho's thread reconnects from then on."""
        s = self._settings
        with self._lock:
            if self.started:
                raise BusError("client already started (a stopped client cannot be restarted)")
            self.started = True
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5,
            transport="unix" if s.unix_socket else "tcp",
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
            min_delay=s.reconnect_min_delay * (1.0 + 0.5 * random.random()),  # type: ignore[arg-type]
            max_delay=s.reconnect_max_delay,  # type: ignore[arg-type]
        )
        client.max_queued_messages_set(s.max_offline_queue)
        if s.username is not None:
            password = s.password.get_secret_value() if s.password is not None else None
            if s.password_file is not None:
                password = s.password_file.read_text().rstrip("\r\n")
            client.username_pw_set(s.username, password)
        if s.uses_tls:
            key_password = None
            if s.tls_key_password_file is not None:
                key_password = s.tls_key_password_file.read_text().rstrip("\r\n")
            client.tls_set(
                ca_certs=str(s.tls_ca) if s.tls_ca else None,
                certfile=str(s.tls_cert) if s.tls_cert else None,
                keyfile=str(s.tls_key) if s.tls_key else None,
                keyfile_password=key_password,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if self.will is not None:  # before connecting, or the broker never learns it
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry
        props.MaximumPacketSize = min(s.max_blob_bytes, s.max_message_bytes + 64 * 1024)
        self._paho = client
        client.connect_async(
            s.unix_socket or s.host,
            s.port,
            keepalive=s.keepalive,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY if s.clean_start else False,
            properties=props,
        )
        client.loop_start()

    def stop(self, timeout: float) -> bool:
        """Publish `offline` (if it owns a status), disconnect, stop paho's thread; False if
        there was nothing to stop (never started, or stopped already)."""
        with self._lock:
            if not self.started or self.stopping:
                return False
            self.stopping = True
        client = self._paho
        assert client is not None
        node = self._settings.status_node_id
        try:
            if node is not None and self.connected:
                info = client.publish(topics.node_status(node), topics.STATUS_OFFLINE, 1, True)
                self._accounting.count_out("status", len(topics.STATUS_OFFLINE))
                Published([info]).wait(min(timeout, 2.0))
            client.disconnect()
        except Exception:  # noqa: BLE001 - stopping must not fail half-way
            log.exception("%s: error while disconnecting", self._name)
        client.loop_stop()
        self._connected.clear()
        return True

    def abort(self) -> None:
        """Close the socket without a DISCONNECT (see `MqttClient.abort_connection`)."""
        client = self._paho
        sock = client.socket() if client is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # --- what every connect redoes ---------------------------------------------------------

    def subscribe(self, sub: Subscription) -> None:
        """Remember `sub`, and send it now if connected."""
        # Under the lock `_on_connect` holds from its snapshot of the subscriptions until it marks
        # the client connected: a subscription added meanwhile is in the snapshot or sent here.
        with self._lock:
            self._subscriptions.put(sub)
            if self._connected.is_set():
                self._send_subscribe([sub], retain_handling=0)

    def unsubscribe(self, topic_filter: str) -> None:
        sub = self._subscriptions.remove(topic_filter)
        if sub is not None and self._paho is not None and self.connected:
            self._paho.unsubscribe(topic_filter)

    def set_retained(self, topic: str, data: bytes, qos: int, cls: str | None) -> None:
        """Remember retained state, and publish it now if connected."""
        self.check_size(topic, data)
        with self._lock:  # as in `subscribe`: never lost to a connect in progress
            self._retained[topic] = (data, qos, cls)
            if self._connected.is_set():
                self.publish(topic, data, qos, True, topic_class=cls)

    def forget_retained(self, topic: str) -> None:
        with self._lock:
            self._retained.pop(topic, None)

    # --- publishing --------------------------------------------------------------------------

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
        """`MqttClient.publish`: one MQTT message, within the size limits, counted."""
        topics.validate_publish_topic(topic)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        self.check_size(topic, data)
        if self._paho is None or self.stopping:
            raise NotConnected(f"client {self._name} is not started or already stopped")
        info = self._paho.publish(topic, data, qos, retain, properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise NotConnected(f"paho's outgoing queue is full ({self._settings.max_offline_queue} messages)")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                with self._accounting.counters() as c:
                    c.qos0_dropped += 1
                return info
            # QoS 1/2 while disconnected: paho keeps it and sends it after the next CONNACK. Say so,
            # or `is_published()`/`wait_for_publish()` would raise on a message that is on its way.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._accounting.count_out(topic_class or topics.topic_class(topic), len(data))
        return info

    def chunk_limit(self, topic: str) -> int:
        """The largest encoded message sent whole on `topic`; larger ones go as chunks."""
        s = self._settings
        limit = min(s.chunk_bytes, s.max_message_bytes)
        server = self.server_max_packet
        if server is not None:
            limit = min(limit, server - len(topic.encode()) - PACKET_OVERHEAD)
        return max(limit, CHUNK_OVERHEAD + 1)

    def check_size(self, topic: str, data: bytes) -> None:
        limit = self._settings.max_message_bytes
        if len(data) > limit:
            raise MessageTooLarge(
                f"payload of {len(data)} bytes exceeds max_message_bytes={limit}; "
                "use publish_message or publish_blob to send it in chunks"
            )
        server = self.server_max_packet
        if server is not None and len(data) + len(topic.encode()) + PACKET_OVERHEAD > server:
            raise MessageTooLarge(
                f"payload of {len(data)} bytes does not fit the broker's MaximumPacketSize {server}; "
                "use publish_message or publish_blob"
            )

    # --- paho callbacks (paho's thread: never block, never raise) ----------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        try:
            if reason_code.is_failure:
                self._connected.clear()
                with self._accounting.counters() as c:
                    c.connect_refused += 1
                self.last_refusal = str(reason_code)
                log.warning("%s: broker refused the connection: %s", self._name, reason_code)
                self._inbox.put(ErrorEvent(NotConnected(f"broker refused the connection: {reason_code}"), "connect"))
                return
            server_max = getattr(properties, "MaximumPacketSize", None)
            self.server_max_packet = int(server_max) if server_max else None
            resumed = bool(flags.session_present)
            # One critical section from the snapshot to "connected": a `subscribe` or
            # `set_retained` from another thread lands either in the snapshot or after it, when it
            # sees the client connected and sends for itself (otherwise it could miss both).
            with self._cond:
                subs = self._subscriptions.all()
                retained = list(self._retained.items())
                self._suback_pending.clear()
                with self._accounting.counters() as c:
                    c.connects += 1
                    c.session_present += int(resumed)
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
            log.info("%s: connected (session present: %s)", self._name, resumed)
        except Exception as exc:  # noqa: BLE001
            self._inbox.callback_error(exc, None)

    def _send_subscribe(self, subs: list[Subscription], *, retain_handling: int) -> None:
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
                    with self._accounting.counters() as c:
                        c.subscribe_refused += len(refused)
                self._cond.notify_all()
            if refused:
                self._inbox.put(ErrorEvent(BusError(f"subscription refused: {', '.join(refused)}"), "subscribe"))
        except Exception as exc:  # noqa: BLE001
            self._inbox.callback_error(exc, None)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        try:
            std = mqtt.LOGGING_LEVEL.get(level, logging.DEBUG)
            if self.stopping or not self.started or buf.startswith("Client is not connected"):
                std = logging.DEBUG  # paho's noise about the socket it is about to reopen (or we close)
            _paho_log.log(std, "%s: %s", self._name, buf)
        except Exception:  # noqa: BLE001
            pass

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            with self._accounting.counters() as c:
                c.connect_failures += 1
                failures = c.connect_failures
            # An operator reading the journal must see why nothing happens: the first failure and
            # then every tenth, so a long outage does not flood it.
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "%s: cannot connect to %s (%d attempts so far%s); retrying",
                    self._name, self.where(), failures, self._why_unreachable(),
                )
        except Exception as exc:  # noqa: BLE001
            self._inbox.callback_error(exc, None)

    def _why_unreachable(self) -> str:
        """paho does not pass the connect error on; a name that does not resolve is worth saying."""
        s = self._settings
        if s.unix_socket:
            return ""
        try:
            socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
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
                    with self._accounting.counters() as c:
                        c.disconnects += 1
                self._cond.notify_all()
            if was and not self.stopping:
                log.info("%s: disconnected (%s); reconnecting", self._name, reason_code)
        except Exception as exc:  # noqa: BLE001
            self._inbox.callback_error(exc, None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic: str | None = None
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                self._inbox.put(ErrorEvent(TopicError("topic is not valid UTF-8"), "decode"))
                return
            self._receiver.handle(topic, bytes(msg.payload), getattr(msg, "properties", None), bool(msg.retain), msg.qos)
        except Exception as exc:  # noqa: BLE001 - never raise into paho
            self._inbox.callback_error(exc, topic)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send small packets at once: without TCP_NODELAY every request/reply and PUBACK waits for
    the peer's delayed ACK (about 40 ms each way on Linux), which dominated every round trip."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # unix sockets and wrapped sockets without the option: nothing to tune
