"""The subscriptions a client was asked for, and the rule each received message is taken by.

A subscription is remembered so that it can be redone on every connect, and it carries what
its topics take: a decoding, the accepted message classes and a size limit (ARCHITECTURE.md §4).
What a subscription leaves open comes from the topic's kind (`broker.topics.topic_rule`): a
batch topic takes `RequestBatch`, config topics `ConfigPatch` of at most 64 KiB, and so on. The
same defaults cover a message that no subscription of this process matches (one queued for the
session by an earlier process), so no message escapes a rule.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Literal

from broker import topics
from broker.wire import Envelope, MessageClasses, message_types

Decoding = Literal["auto", "msgpack", "config", "app", "raw"]


@dataclass(frozen=True)
class Subscription:
    filter: str
    qos: int
    decoding: Decoding
    accept: MessageClasses | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class Rule:
    """How a message on one topic is taken: its decoding, the accepted types (the message must be
    an instance of every tuple in `accept`) and the largest whole message in bytes."""

    decoding: Decoding
    accept: tuple[MessageClasses, ...]
    max_bytes: int


class Subscriptions:
    """The subscriptions by filter, thread-safe (paho's thread reads them for every message)."""

    def __init__(self, max_blob_bytes: int) -> None:
        self._max_blob_bytes = max_blob_bytes
        self._subs: dict[str, Subscription] = {}
        self._lock = threading.Lock()

    def check(
        self,
        topic_filter: str,
        qos: int,
        decoding: Decoding,
        accept: type[Envelope] | MessageClasses | None,
        max_bytes: int | None,
    ) -> Subscription:
        """A valid `Subscription` of these arguments (see `MqttClient.subscribe`), or ValueError."""
        topics.validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if accept is not None:
            accept = (accept,) if isinstance(accept, type) else tuple(accept)
            if not accept or not all(isinstance(c, type) and issubclass(c, Envelope) for c in accept):
                raise ValueError("accept must be a non-empty tuple of message classes")
        if max_bytes is not None and not 0 < max_bytes <= self._max_blob_bytes:
            raise ValueError(f"max_bytes must be in [1, max_blob_bytes={self._max_blob_bytes}]")
        return Subscription(topic_filter, qos, decoding, accept, max_bytes)

    def put(self, sub: Subscription) -> None:
        with self._lock:
            self._subs[sub.filter] = sub

    def put_default(self, topic_filter: str) -> None:
        """Subscribe `topic_filter` at QoS 1 with its kind's rule, unless already subscribed."""
        with self._lock:
            self._subs.setdefault(topic_filter, Subscription(topic_filter, 1, "auto"))

    def remove(self, topic_filter: str) -> Subscription | None:
        with self._lock:
            return self._subs.pop(topic_filter, None)

    def __contains__(self, topic_filter: object) -> bool:
        with self._lock:
            return topic_filter in self._subs

    def all(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs.values())

    def rule_for(self, topic: str) -> Rule:
        """The subscriptions' settings for `topic`, else its kind's defaults. Where several
        subscriptions match, a message must pass every `accept` given and the smallest limit."""
        with self._lock:
            subs = [s for s in self._subs.values() if topics.matches(s.filter, topic)]
        explicit = [s.decoding for s in subs if s.decoding != "auto"]
        tcls = topics.topic_class(topic)
        if explicit:
            decoding = explicit[0]
        elif tcls == "status":
            decoding = "raw"
        elif tcls == "config":
            decoding = "config"
        elif tcls in ("batch", "labels"):
            decoding = "app"  # what applications send: msgpack, or JSON for `mosquitto_pub` and the like
        else:
            decoding = "msgpack"
        default = topics.topic_rule(topic)
        accept = tuple(s.accept for s in subs if s.accept is not None)
        if not accept and default.accepts is not None:
            accept = (_classes(default.accepts),)
        limits = [s.max_bytes for s in subs if s.max_bytes is not None]
        max_bytes = min(limits) if limits else (default.max_bytes or self._max_blob_bytes)
        return Rule(decoding, accept, min(max_bytes, self._max_blob_bytes))


@functools.lru_cache(maxsize=None)
def _classes(names: tuple[str, ...]) -> MessageClasses:
    """Message classes of registered `type` names (a topic kind's default)."""
    registry = message_types()
    return tuple(registry[name] for name in names)


def type_names(classes: MessageClasses) -> list[str]:
    """The registered `type` names of `classes` and their subclasses, for error messages."""
    return [name for name, cls in message_types().items() if issubclass(cls, classes)]
