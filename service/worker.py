"""The inbox worker of every daemon: one thread takes the MQTT client's inbox in arrival order.

The client's callbacks only decode and enqueue; the work happens on this one thread, so the
handlers need no lock against each other and run in the order the messages came. The loop is
``item = inbox.get(poll); handle(item); tick()``. Each call runs inside its own boundary: what one
item (or one tick) raises is logged and counted (`errors`), and the worker goes on with the next.
`tick()` runs after every item and every `poll` s when the inbox is quiet, for work that time
drives (a round that times out, a flow that waits for an answer).

Liveness, for the systemd watchdog (`alive()`): the thread runs and has looped within `stall_after`
seconds, so a handler stuck that long withholds the pings. An exception that escapes every
boundary (a `BaseException`) ends the thread and is kept in `crashed`, for the runner to exit 1.

>>> import queue
>>> class Inbox(queue.Queue):               # get() as MqttClient's: None when nothing came
...     def get(self, timeout=None):
...         try:
...             return super().get(timeout=timeout)
...         except queue.Empty:
...             return None
>>> class Upper(InboxWorker[str]):
...     seen = []
...     def handle(self, item):
...         self.seen.append(item.upper())    # an int has no upper(): that item is refused
>>> inbox = Inbox()
>>> worker = Upper(inbox, name="upper").start()
>>> for item in ("a", 3, "b"):
...     inbox.put(item)
>>> while not inbox.empty():
...     time.sleep(0.01)
>>> worker.stop()                             # finishes the item in hand
>>> worker.seen, worker.errors, worker.alive()
(['A', 'B'], 1, False)
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_T_co = TypeVar("_T_co", covariant=True)


class Inbox(Protocol[_T_co]):
    """Where the items come from: `MqttClient` is one."""

    def get(self, timeout: float | None = None) -> _T_co | None:
        """The next item, or None after `timeout` s."""


class InboxWorker(ABC, Generic[T]):
    """Owns the thread that takes `inbox` (module docstring); subclasses fill in `handle` and `tick`.

    `name` names the thread and the log lines; `poll` is the longest wait for an item (s) before
    `tick()` runs; `stall_after` (s) without a loop makes `alive()` False.
    """

    def __init__(self, inbox: Inbox[T], *, name: str, poll: float = 0.1, stall_after: float = 30.0) -> None:
        self.inbox = inbox
        self.name = name
        self.poll = poll
        self.stall_after = stall_after
        #: `time.monotonic()` of the last loop.
        self.heartbeat = time.monotonic()
        #: Items and ticks that raised.
        self.errors = 0
        #: What ended the thread outside every boundary, else None.
        self.crashed: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def handle(self, item: T) -> None:
        """Take one item. What it raises refuses this item only (`on_error`)."""

    def tick(self) -> None:
        """Work driven by time, after every item and every `poll` s; nothing by default."""

    def on_error(self, item: T | None, exc: Exception) -> None:
        """`handle(item)` (a tick when `item` is None) raised `exc`, already counted; logs it.

        Override to also answer or report the refusal.
        """
        topic = getattr(item, "topic", None)
        where = "a tick" if item is None else f"an item on {topic}" if topic else "an item"
        log.error("%s: %s raised %s", self.name, where, type(exc).__name__, exc_info=exc)

    def stats(self) -> dict[str, Any]:
        """Counters for the daemon's stats lines: the worker's `errors`; subclasses report theirs."""
        return {"errors": self.errors}

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "InboxWorker[T]":
        """Start the thread; returns at once. A worker starts once."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self.heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Started, and not asked to stop."""
        return self._thread is not None and not self._stop.is_set()

    def alive(self) -> bool:
        """The thread runs and looped within `stall_after` s (for the systemd watchdog)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and time.monotonic() - self.heartbeat < self.stall_after

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking items: the item in hand is finished first (waited for up to `timeout` s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "InboxWorker[T]":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                item = self.inbox.get(timeout=self.poll)
                if item is not None:
                    self._contained(item)
                self._contained(None)
        except BaseException as exc:  # the boundaries catch Exception: this is an exit, a kill
            log.critical("%s: the worker thread died", self.name, exc_info=exc)
            self.crashed = exc

    def _contained(self, item: T | None) -> None:
        try:
            if item is None:
                self.tick()
            else:
                self.handle(item)
        except Exception as exc:  # noqa: BLE001 - the boundary of one item: the worker lives on
            self.errors += 1
            self.on_error(item, exc)


__all__ = ["Inbox", "InboxWorker"]
