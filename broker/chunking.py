"""Splitting large payloads into `BlobChunk` messages and putting them back together.

Why: paho sends whatever it is given, and brokers cap a packet (EMQX's default is 1 MB, our
Mosquitto's `max_packet_size` likewise), so anything above the chunk size (default 256 KiB) travels
as several messages. Each chunk carries a transfer id, its index, the count, the total length and
the sha256 of the whole, so the receiver can reassemble chunks that arrive out of order or twice,
and refuse a payload that does not check out. Incomplete transfers are discarded after a deadline;
the number of concurrent transfers and the bytes buffered are bounded.

Limits are the receiver's: each `add` may pass the `max_bytes` of where the chunk arrived (the
client passes its subscription's limit for the topic), and a chunk whose declared `total` is above
it is refused before anything is buffered; the sender's `cls` only labels bytes. A transfer belongs
to the `source` (topic) its chunks arrive on, so chunks sent to another topic can neither complete
nor disturb it.

Pure: no MQTT here (the client wires it in).

>>> chunks = split(b"x" * 1000, chunk_bytes=700)
>>> asm = ChunkAssembler()
>>> [asm.add(c) for c in reversed(chunks)][-1] == b"x" * 1000
True
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from broker.errors import ChunkError, ChunkTooLarge, MessageTooLarge
from broker.topics import TopicClass
from broker.wire import BlobChunk, encode

#: Bytes of a chunk message that are not payload (envelope, header). Measured ~190; kept generous.
CHUNK_OVERHEAD = 512
DEFAULT_CHUNK_BYTES = 256 << 10


def split(payload: bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, cls: TopicClass = "other") -> list[BlobChunk]:
    """Cut `payload` into chunks whose *encoded* messages are at most `chunk_bytes` long."""
    if chunk_bytes <= CHUNK_OVERHEAD:
        raise ValueError(f"chunk_bytes must exceed {CHUNK_OVERHEAD}")
    piece = chunk_bytes - CHUNK_OVERHEAD
    count = max(1, -(-len(payload) // piece))
    if count > 1 << 16:
        raise MessageTooLarge(f"payload of {len(payload)} bytes needs more than 65536 chunks of {piece}")
    digest = hashlib.sha256(payload).digest()
    transfer = uuid.uuid4().hex
    view = memoryview(payload)
    return [
        BlobChunk(
            transfer=transfer,
            index=i,
            count=count,
            total=len(payload),
            digest=digest,
            cls=cls,
            data=bytes(view[i * piece : (i + 1) * piece]),
        )
        for i in range(count)
    ]


def encode_chunks(payload: bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, cls: TopicClass = "other") -> list[bytes]:
    """`split` then `encode` each chunk."""
    return [encode(c) for c in split(payload, chunk_bytes=chunk_bytes, cls=cls)]


@dataclass
class _Transfer:
    count: int
    total: int
    digest: bytes
    cls: str
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


@dataclass(frozen=True)
class DiscardedTransfer:
    """A transfer dropped before completion (deadline passed)."""

    transfer: str
    cls: str
    received_chunks: int
    count: int
    age_s: float
    source: str = ""


class ChunkAssembler:
    """Reassemble `BlobChunk`s into payloads; thread-safe.

    `add` returns the payload when its last missing chunk arrives, `None` otherwise, and raises
    `ChunkError` for a chunk that cannot belong to a valid payload (inconsistent header, too many
    transfers at once, checksum mismatch; `ChunkTooLarge` above the size limit). Duplicates (also
    of finished transfers) are ignored and counted; so are the later chunks of a transfer refused
    as too large (`refused_chunks`), which raised once. Call `expire` periodically to discard
    transfers past their deadline. `max_bytes` here bounds every transfer; `add(..., max_bytes=n)`
    lowers it for one chunk's transfer.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 64 << 20,
        max_transfers: int = 16,
        max_buffered_bytes: int = 256 << 20,
        deadline_s: float = 60.0,
        remember: int = 1024,
        clock=time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self.max_buffered_bytes = max_buffered_bytes
        self.deadline_s = deadline_s
        self._remember = remember
        self._clock = clock
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        #: Transfers done or dropped -> True when refused as too large (their chunks are not duplicates).
        self._finished: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._buffered = 0
        self.completed = 0
        self.duplicates = 0
        self.discarded = 0
        self.rejected = 0
        self.refused_chunks = 0

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def pending(self) -> int:
        return len(self._transfers)

    def add(
        self, chunk: BlobChunk, now: float | None = None, *, max_bytes: int | None = None, source: str = ""
    ) -> bytes | None:
        """Take one chunk that arrived on `source`, whose whole may be at most `max_bytes` (and
        this assembler's own `max_bytes`); return the payload once complete."""
        now = self._clock() if now is None else now
        limit = self.max_bytes if max_bytes is None else min(max_bytes, self.max_bytes)
        with self._lock:
            tid = chunk.transfer
            key = (source, tid)
            if key in self._finished:
                if self._finished[key]:
                    self.refused_chunks += 1
                else:
                    self.duplicates += 1
                return None
            t = self._transfers.get(key)
            if chunk.total > limit:
                # Checked on every chunk, not only the first: the limit is the receiver's, here and now.
                self.rejected += 1
                if t is not None:
                    self._drop(key, t)
                self._remember_key(key, refused=True)
                raise ChunkTooLarge(f"transfer of {chunk.total} bytes exceeds the limit of {limit} bytes")
            if t is None:
                t = self._open(chunk, now, key)
            elif (t.count, t.total, t.digest, t.cls) != (chunk.count, chunk.total, chunk.digest, chunk.cls):
                self.rejected += 1
                raise ChunkError(f"chunk {chunk.index} of transfer {tid} disagrees with its first chunk")
            if chunk.index in t.parts:
                self.duplicates += 1
                return None
            size = len(chunk.data)
            if t.received + size > t.total:
                self._drop(key, t)
                raise ChunkError(f"transfer {tid} received more than its declared {t.total} bytes")
            if self._buffered + size > self.max_buffered_bytes:
                self._drop(key, t)
                raise ChunkError(f"reassembly buffers full ({self.max_buffered_bytes} bytes); transfer {tid} dropped")
            t.parts[chunk.index] = chunk.data
            t.received += size
            self._buffered += size
            if len(t.parts) < t.count:
                return None
            payload = b"".join(t.parts[i] for i in range(t.count))
            self._drop(key, t)
            if len(payload) != t.total or hashlib.sha256(payload).digest() != t.digest:
                self.rejected += 1
                raise ChunkError(f"transfer {tid}: checksum or length mismatch, payload discarded")
            self.completed += 1
            return payload

    def expire(self, now: float | None = None) -> list[DiscardedTransfer]:
        """Discard transfers older than the deadline; return what was dropped."""
        now = self._clock() if now is None else now
        dropped: list[DiscardedTransfer] = []
        with self._lock:
            for key, t in list(self._transfers.items()):
                if now - t.started > self.deadline_s:
                    source, tid = key
                    dropped.append(DiscardedTransfer(tid, t.cls, len(t.parts), t.count, now - t.started, source))
                    self._drop(key, t)
                    self.discarded += 1
        return dropped

    def next_deadline(self) -> float | None:
        """Clock time at which the oldest open transfer expires (None when none is open)."""
        with self._lock:
            if not self._transfers:
                return None
            return min(t.started for t in self._transfers.values()) + self.deadline_s

    def _open(self, chunk: BlobChunk, now: float, key: tuple[str, str]) -> _Transfer:
        if chunk.count > max(1, chunk.total):
            self.rejected += 1
            raise ChunkError(f"{chunk.count} chunks for {chunk.total} bytes")
        if len(self._transfers) >= self.max_transfers:
            self.rejected += 1
            raise ChunkError(f"more than {self.max_transfers} transfers in progress; chunk refused")
        t = _Transfer(count=chunk.count, total=chunk.total, digest=chunk.digest, cls=chunk.cls, started=now)
        self._transfers[key] = t
        return t

    def _drop(self, key: tuple[str, str], t: _Transfer) -> None:
        self._transfers.pop(key, None)
        self._buffered -= t.received
        t.parts.clear()
        t.received = 0
        self._remember_key(key, refused=False)

    def _remember_key(self, key: tuple[str, str], *, refused: bool) -> None:
        self._finished[key] = refused
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)


__all__ = ["CHUNK_OVERHEAD", "ChunkAssembler", "DEFAULT_CHUNK_BYTES", "DiscardedTransfer", "encode_chunks", "split"]
