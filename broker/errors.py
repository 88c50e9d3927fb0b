"""Exceptions of the bus (`broker` package).

A short hierarchy: everything raised on purpose by `broker.*` derives from `BusError`, so a
daemon can tell "the bus said no" from its own bugs. Decoders raise only `WireError` (and its
subclasses) for any input, however malformed; the fuzz tests in `tests/test_topics_wire.py` hold
them to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from broker.wire import ErrorReply


class BusError(Exception):
    """Base class of every error the bus raises on purpose."""


# --- wire ------------------------------------------------------------------------------------


class WireError(BusError, ValueError):
    """Bytes that are not a valid message (or a message that cannot be encoded)."""


class MessageTooLarge(WireError):
    """A payload above the configured (or the broker's) maximum size."""


class UnknownMessageType(WireError):
    """A well-formed envelope whose `type` is not registered, or not one of those expected."""


class UnsupportedVersion(WireError):
    """An envelope whose `v` is not a version this code speaks."""


class SchemaError(WireError):
    """An envelope whose fields fail validation (unknown field, wrong type, out of bounds)."""


class ChunkError(WireError):
    """A blob chunk that cannot be reassembled (inconsistent header, checksum, limits, deadline)."""


class ChunkTooLarge(ChunkError, MessageTooLarge):
    """A chunked transfer whose declared total is above the limit of the topic it arrives on."""


# --- topics ----------------------------------------------------------------------------------


class TopicError(BusError, ValueError):
    """An invalid topic, topic filter or node id."""


# --- client ----------------------------------------------------------------------------------


class NotConnected(BusError):
    """The client could not hand a message to paho (stopped, or paho's queue is full)."""


class RequestTimeout(BusError, TimeoutError):
    """No reply arrived for a request within its timeout and retries."""

    def __init__(self, message: str, *, corr: str = "", attempts: int = 0) -> None:
        super().__init__(message)
        self.corr = corr
        self.attempts = attempts


class RemoteError(BusError):
    """The responder answered a request with a typed `ErrorReply`."""

    def __init__(self, reply: "ErrorReply") -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply
        self.code = reply.code
        self.corr = reply.corr


class RequestRejected(BusError):
    """Raised by a request handler to answer with a typed `ErrorReply` (see `Responder`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ClientStopped(BusError):
    """The client was stopped while a request was still waiting for its reply."""


# --- launcher --------------------------------------------------------------------------------


class BrokerError(BusError):
    """The private Mosquitto could not be found, started or stopped."""


class BrokerNotFound(BrokerError, FileNotFoundError):
    """No `mosquitto` binary (Debian package `mosquitto`)."""


class BrokerStartError(BrokerError):
    """Mosquitto exited or did not accept connections in time; the message carries its log tail."""


__all__ = [
    "BrokerError",
    "BrokerNotFound",
    "BrokerStartError",
    "BusError",
    "ChunkError",
    "ChunkTooLarge",
    "ClientStopped",
    "MessageTooLarge",
    "NotConnected",
    "RemoteError",
    "RequestRejected",
    "RequestTimeout",
    "SchemaError",
    "TopicError",
    "UnknownMessageType",
    "UnsupportedVersion",
    "WireError",
]
