"""Requests in flight: matching replies to them, re-sending them, timing them out.

A request waits for its reply by correlation id. Each attempt has a timeout; a retry re-sends
the same bytes with the same correlation id, so a `Responder` answers it from its cache rather
than running its handler twice. A reply counts only on the reply topic its request named.
How a request ended is remembered (the last 4096), so that a reply arriving after its request
was answered or given up is dropped and counted as a duplicate or a late reply.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from paho.mqtt.properties import Properties

from broker._accounting import Accounting
from broker._inbox import ErrorEvent, Inbound, Inbox
from broker.errors import BusError, ClientStopped, RemoteError, RequestTimeout, UnknownMessageType
from broker.wire import Envelope, ErrorReply

log = logging.getLogger("broker.client")  # one logger for the client, named after its public module

#: How many ended requests are remembered, to tell a late or duplicate reply from a stray one.
_REMEMBERED = 4096

Ending = Literal["answered", "timeout"]


@dataclass
class Pending:
    """One request in flight: what to re-send, and where its reply must come from."""

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


class Requests:
    """The pending requests of one client; `publish` re-sends (the client's `publish`)."""

    def __init__(self, accounting: Accounting, inbox: Inbox, *, name: str, publish: Callable[..., object]) -> None:
        self._accounting = accounting
        self._inbox = inbox
        self._name = name
        self._publish = publish
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._ended: OrderedDict[str, Ending] = OrderedDict()
        self._reply_topics: set[str] = set()

    def add_reply_topic(self, topic: str) -> bool:
        """Take replies on `topic` from now on; True if it is new."""
        with self._lock:
            new = topic not in self._reply_topics
            self._reply_topics.add(topic)
        return new

    def add(self, pending: Pending) -> None:
        """Wait for the reply to `pending` (sent, or about to be)."""
        with self._lock:
            if pending.corr in self._pending:
                raise ValueError(f"a request with corr {pending.corr} is already pending")
            self._pending[pending.corr] = pending
        with self._accounting.counters() as c:
            c.requests += 1

    def discard(self, corr: str) -> None:
        """Forget a request that could not be sent."""
        with self._lock:
            self._pending.pop(corr, None)

    def claim(self, corr: str | None, topic: str) -> tuple[Pending | None, Ending | Literal["late"] | None]:
        """What a reply with `corr` on `topic` is: `(pending, None)` for the answer to a pending
        request (no longer pending); `(None, how)` for a reply on one of our reply topics to a
        request that `answered`, timed out (`timeout`) or is unknown (`late`); `(None, None)` for a
        reply that is not ours (it goes to the inbox like any message)."""
        with self._lock:
            pending = self._pending.get(corr) if corr else None
            if pending is not None and pending.reply_topic == topic:
                del self._pending[pending.corr]
                self._end(pending.corr, "answered")
                return pending, None
            if topic not in self._reply_topics:
                return None, None
            return None, (self._ended.get(corr) if corr else None) or "late"

    def resolve(self, pending: Pending, message: Envelope, item: Inbound) -> None:
        """Complete `pending` with its reply: an `ErrorReply` or an unexpected type fails it."""
        with self._accounting.counters() as c:
            c.replies += 1
            if isinstance(message, ErrorReply):
                c.remote_errors += 1
        error: BaseException | None = None
        if isinstance(message, ErrorReply):
            error = RemoteError(message)
        elif not isinstance(message, pending.expect):
            error = UnknownMessageType(f"reply of type {message.type!r} to a request expecting {pending.expect}")
        if error is None:
            pending.future.set_result(message)
        else:
            pending.future.set_exception(error)
        if pending.to_inbox:
            self._inbox.put(item)

    def tick(self) -> float | None:
        """Re-send the requests whose attempt timed out, fail those out of retries; return the
        next deadline (`time.monotonic()`), or None when nothing is pending."""
        now = time.monotonic()
        resend: list[Pending] = []
        expired: list[Pending] = []
        with self._lock:
            for p in list(self._pending.values()):
                if p.deadline > now:
                    continue
                if p.attempts <= p.retries:
                    p.attempts += 1
                    p.deadline = now + p.timeout
                    resend.append(p)
                else:
                    del self._pending[p.corr]
                    self._end(p.corr, "timeout")
                    expired.append(p)
            next_deadline = min((p.deadline for p in self._pending.values()), default=None)
        with self._accounting.counters() as c:
            c.retries += len(resend)
            c.timeouts += len(expired)
        for p in resend:
            try:
                self._publish(p.topic, p.data, p.qos, False, topic_class=p.cls, properties=p.properties)
            except BusError as exc:
                log.warning("%s: retry of %s not sent: %s", self._name, p.corr, exc)
        for p in expired:
            err = RequestTimeout(
                f"no reply to {p.corr} on {p.topic} after {p.attempts} attempts of {p.timeout} s",
                corr=p.corr,
                attempts=p.attempts,
            )
            if not p.future.done():
                p.future.set_exception(err)
            if p.to_inbox:
                self._inbox.put(ErrorEvent(err, "timeout", p.topic, corr=p.corr))
        return next_deadline

    def fail_all(self) -> None:
        """Fail every pending request with `ClientStopped` (the client stopped)."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            if not p.future.done():
                p.future.set_exception(ClientStopped(f"client {self._name} stopped before a reply to {p.corr}"))

    def _end(self, corr: str, how: Ending) -> None:
        self._ended[corr] = how
        while len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)
