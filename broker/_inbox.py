"""What the client hands its caller: `Inbound` messages and `ErrorEvent`s, through a bounded inbox.

paho's callbacks must never block, so the inbox never does either: a full inbox drops the item,
counts it and logs (at the 1st, 2nd, 4th, … drop, so a stalled consumer does not flood the
journal). Failures inside the client come out the same way, as `ErrorEvent`s, rather than as
exceptions in a thread nobody reads.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paho.mqtt.properties import Properties

from broker._accounting import Accounting
from broker.wire import Envelope

if TYPE_CHECKING:
    from broker.client import MqttClient

log = logging.getLogger("broker.client")  # one logger for the client, named after its public module


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


class Inbox:
    """The bounded queue of `InboxItem`s; `put` never blocks."""

    def __init__(self, size: int, accounting: Accounting, name: str) -> None:
        self.queue: queue.Queue[InboxItem] = queue.Queue(maxsize=size)
        self._accounting = accounting
        self._name = name

    def put(self, item: InboxItem) -> None:
        """Queue `item`, or drop it (counted) if the inbox is full."""
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            with self._accounting.counters() as c:
                c.inbox_dropped += 1
                dropped = c.inbox_dropped
            if dropped & (dropped - 1) == 0:  # log at 1, 2, 4, 8, … drops
                log.warning("%s: inbox full, %d items dropped so far", self._name, dropped)

    def callback_error(self, exc: BaseException, topic: str | None) -> None:
        """Report an unexpected error in a callback or thread of the client, which must go on."""
        try:
            with self._accounting.counters() as c:
                c.callback_errors += 1
            log.error("%s: unexpected error in a callback: %r", self._name, exc, exc_info=exc)
            self.put(ErrorEvent(exc, "callback", topic))
        except Exception:  # noqa: BLE001 - the last line of defence
            pass


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
