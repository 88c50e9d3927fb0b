"""The way in: each MQTT message received, from bytes to an inbox item or to the request it
answers (the rules are in `broker.client`: "What a topic takes", "Byte accounting").

`Receiver.handle` runs on paho's thread for every MQTT message, a chunk or a whole message: it
checks the size before parsing, decodes and reassembles. `deliver` then takes each whole message,
so a chunked one is type-checked and dispatched exactly like a single one. A message refused on
the way becomes a counted `ErrorEvent` (`size`, `chunk`, `decode`), never an exception.
"""

from __future__ import annotations

import logging
import time

from paho.mqtt.properties import Properties

from broker import topics
from broker._accounting import Accounting
from broker._inbox import ErrorEvent, Inbound, Inbox
from broker._requests import Requests
from broker._settings import ClientSettings
from broker._subscriptions import Decoding, Subscriptions, type_names
from broker.chunking import ChunkAssembler
from broker.errors import ChunkError, MessageTooLarge, UnknownMessageType, WireError
from broker.wire import BlobChunk, Envelope, MessageClasses, decode, decode_app, decode_config

log = logging.getLogger("broker.client")  # one logger for the client, named after its public module


class Receiver:
    """Takes each received MQTT message through its topic's rule to the inbox or its request."""

    def __init__(
        self,
        settings: ClientSettings,
        subscriptions: Subscriptions,
        requests: Requests,
        accounting: Accounting,
        inbox: Inbox,
        *,
        name: str,
    ) -> None:
        self._max_message_bytes = settings.max_message_bytes
        self._subscriptions = subscriptions
        self._requests = requests
        self._accounting = accounting
        self._inbox = inbox
        self._name = name
        self._assembler = ChunkAssembler(
            max_bytes=settings.max_blob_bytes,
            max_transfers=settings.max_transfers,
            max_buffered_bytes=settings.max_blob_bytes * 2,
            deadline_s=settings.transfer_deadline,
        )

    def handle(self, topic: str, payload: bytes, props: Properties | None, retained: bool, qos: int) -> None:
        """One MQTT message as received (a chunk, or a whole message)."""
        now = time.time()
        with self._accounting.counters() as c:
            c.received += 1
        tcls = topics.topic_class(topic)
        rule = self._subscriptions.rule_for(topic)
        if rule.decoding == "raw" or not payload:
            self._accounting.count_in(tcls, len(payload))
            self._inbox.put(Inbound(topic, None, payload, props, now, retained, qos, tcls))
            return
        try:  # the size is checked before anything is parsed
            message = _decode(topic, payload, rule.decoding, min(rule.max_bytes, self._max_message_bytes))
        except WireError as exc:
            self._accounting.count_in(tcls, len(payload))
            self._refuse(exc, topic)
            return
        if not isinstance(message, BlobChunk):
            self.deliver(topic, message, payload, props, now, retained, qos, rule.accept, counted_as=None)
            return
        chunk_cls = message.cls
        self._accounting.count_in(chunk_cls, len(payload))
        try:
            whole = self._assembler.add(message, max_bytes=rule.max_bytes, source=topic)
            if whole is None:
                return
            message = _decode(topic, whole, rule.decoding, rule.max_bytes)
            if isinstance(message, BlobChunk):
                raise WireError("a chunked payload may not be a chunk itself")
        except WireError as exc:  # ChunkError included
            self._refuse(exc, topic)
            return
        self.deliver(topic, message, whole, props, now, retained, qos, rule.accept, counted_as=chunk_cls)

    def deliver(
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
        """One whole message, decoded; `counted_as` is the class its chunks were counted as."""
        tcls = topics.topic_class(topic)
        if not all(isinstance(message, classes) for classes in accept):
            if counted_as is None:
                self._accounting.count_in(tcls, len(payload))
            taken = sorted(set.intersection(*(set(type_names(classes)) for classes in accept)))
            with self._accounting.counters() as c:
                c.type_refused += 1
            error = UnknownMessageType(f"a {message.type!r} message is not accepted on {topic} (it takes {taken})")
            self._inbox.put(ErrorEvent(error, "decode", topic))
            return
        if message.is_reply:
            corr = getattr(message, "corr", None)
            if not corr and props is not None:
                data = getattr(props, "CorrelationData", None)
                corr = bytes(data).decode("ascii", "replace") if isinstance(data, (bytes, bytearray)) else None
            pending, dropped = self._requests.claim(corr, topic)
            if pending is not None:
                cls = counted_as or message.byte_class or pending.cls
                if counted_as is None:
                    self._accounting.count_in(cls, len(payload))
                self._requests.resolve(pending, message, Inbound(topic, message, payload, props, now, retained, qos, cls))
                return
            if dropped is not None:
                if counted_as is None:
                    self._accounting.count_in(message.byte_class or tcls, len(payload))
                with self._accounting.counters() as c:
                    if dropped == "answered":
                        c.duplicate_replies += 1
                    else:
                        c.late_replies += 1
                log.debug("%s: dropped a %s reply (corr %s)", self._name, dropped, corr)
                return
        cls = counted_as or message.byte_class or tcls
        if counted_as is None:
            self._accounting.count_in(cls, len(payload))
        self._inbox.put(Inbound(topic, message, payload, props, now, retained, qos, cls))

    def expire(self) -> float | None:
        """Discard the transfers past their deadline (reported as `chunk` errors); return the
        next transfer deadline (`time.monotonic()`), or None."""
        for d in self._assembler.expire():
            with self._accounting.counters() as c:
                c.chunks_discarded += 1
            self._inbox.put(
                ErrorEvent(
                    ChunkError(
                        f"transfer {d.transfer} ({d.cls}) incomplete after {d.age_s:.1f} s: "
                        f"{d.received_chunks}/{d.count} chunks; discarded"
                    ),
                    "chunk",
                    d.source or None,
                )
            )
        return self._assembler.next_deadline()

    def transfer_stats(self) -> dict[str, int]:
        """The reassembly's counters: duplicate chunks, chunks refused, transfers pending."""
        return {
            "chunk_duplicates": self._assembler.duplicates,
            "chunks_refused": self._assembler.refused_chunks,
            "transfers_pending": self._assembler.pending,
        }

    def _refuse(self, exc: WireError, topic: str) -> None:
        """Count a refused message and report it: `size` above the limit, `chunk` for a transfer
        that cannot be reassembled, `decode` for the rest."""
        with self._accounting.counters() as c:
            if isinstance(exc, MessageTooLarge):
                c.too_large += 1
                context = "size"
            elif isinstance(exc, ChunkError):
                c.chunk_errors += 1
                context = "chunk"
            else:
                c.decode_errors += 1
                context = "decode"
        self._inbox.put(ErrorEvent(exc, context, topic))


def _decode(topic: str, data: bytes, decoding: Decoding, max_bytes: int) -> Envelope:
    if decoding == "config":
        return decode_config(data, expect=None, max_bytes=max_bytes)
    if decoding == "app":
        accepts = topics.topic_rule(topic).accepts
        return decode_app(data, bare_type=accepts[0] if accepts else "batch", max_bytes=max_bytes)
    return decode(data, max_bytes=max_bytes)
