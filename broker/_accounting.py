"""The client's counters and its payload bytes per class.

Every part of the client counts here, from paho's thread, the housekeeping thread and the
caller's, so the counts sit behind one lock of their own; nothing is called while it is held, so
it can be taken inside any other lock. `Counters` names every counter once: a misspelt one is an
`AttributeError` (and a type error), not a new key.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from broker import topics


@dataclass
class Counters:
    """Events since the client was made; `MqttClient.stats()` gives them as a dict."""

    connects: int = 0
    connect_failures: int = 0  # no CONNACK: the broker down or unreachable
    connect_refused: int = 0  # a CONNACK that said no
    disconnects: int = 0
    session_present: int = 0  # connects that resumed a session
    requests: int = 0
    retries: int = 0
    replies: int = 0
    remote_errors: int = 0  # replies that were an ErrorReply
    duplicate_replies: int = 0
    late_replies: int = 0
    timeouts: int = 0
    received: int = 0
    inbox_dropped: int = 0
    decode_errors: int = 0
    type_refused: int = 0
    too_large: int = 0
    chunk_errors: int = 0
    chunks_discarded: int = 0  # transfers discarded past their deadline
    qos0_dropped: int = 0  # QoS 0 publishes while disconnected
    callback_errors: int = 0
    subscribe_refused: int = 0


class Accounting:
    """`Counters` and byte counts under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters = Counters()
        self._bytes: dict[str, list[int]] = {c: [0, 0] for c in topics.TOPIC_CLASSES}

    @contextmanager
    def counters(self) -> Iterator[Counters]:
        """The counters, locked: `with accounting.counters() as c: c.retries += 1`."""
        with self._lock:
            yield self._counters

    def count_out(self, cls: str, n: int) -> None:
        """`n` payload bytes sent as class `cls` (an unknown class counts as `other`)."""
        self._count(cls, 0, n)

    def count_in(self, cls: str, n: int) -> None:
        """`n` payload bytes received as class `cls`."""
        self._count(cls, 1, n)

    def _count(self, cls: str, direction: int, n: int) -> None:
        with self._lock:
            self._bytes[cls if cls in self._bytes else "other"][direction] += n

    def byte_counts(self) -> dict[str, dict[str, int]]:
        """`{class: {"out": n, "in": n}}`, every class present."""
        with self._lock:
            return {c: {"out": v[0], "in": v[1]} for c, v in self._bytes.items()}

    def snapshot(self) -> dict[str, int]:
        """The counters as `{name: n}`."""
        with self._lock:
            return dataclasses.asdict(self._counters)
