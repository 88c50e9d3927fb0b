"""`Responder`: the serving side of a request, answering each correlation id once.

A request may arrive twice: a retry after a timeout, a redelivery after a reconnect. Running the
handler again would redo work (a KT blob is seconds of compute) and could answer differently, so
the reply is cached by (reply topic, correlation id) and sent again instead. The cache is bounded
by count and by bytes, since a helper's replies are whole KT blobs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import topics
from broker._inbox import Inbound, InboxItem
from broker.errors import RequestRejected
from broker.wire import Envelope, ErrorReply

if TYPE_CHECKING:
    from broker.client import MqttClient

log = logging.getLogger("broker.client")  # one logger for the client, named after its public module

Handler = Callable[[Envelope, Inbound], Envelope]

_ERROR_CODES = frozenset(ErrorReply.model_fields["code"].annotation.__args__)  # type: ignore[union-attr]


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
