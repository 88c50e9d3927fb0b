"""`service.worker.InboxWorker`: what one item or one tick raises stays with it, liveness follows
the thread and its heartbeat, and an exit that escapes every boundary is kept as `crashed`."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from service.worker import InboxWorker
from support import wait_until


class QueueInbox:
    """An inbox as `MqttClient.get` is one: the next item, or None after `timeout` s."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()

    def put(self, *items: Any) -> None:
        for item in items:
            self.queue.put(item)

    def get(self, timeout: float | None = None) -> Any:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class Recorder(InboxWorker[Any]):
    """Records what it handles; an item that is an exception is raised; `gate` blocks on "wait"."""

    def __init__(self, inbox: QueueInbox, **kw: Any) -> None:
        super().__init__(inbox, name="recorder", poll=0.01, **kw)
        self.seen: list[Any] = []
        self.refused: list[tuple[Any, type[Exception]]] = []
        self.ticks = 0
        self.tick_error: Exception | None = None
        self.gate = threading.Event()

    def handle(self, item: Any) -> None:
        if isinstance(item, BaseException):
            raise item
        if item == "wait":
            self.gate.wait(10)
        self.seen.append(item)

    def tick(self) -> None:
        self.ticks += 1
        if self.tick_error is not None:
            raise self.tick_error

    def on_error(self, item: Any, exc: Exception) -> None:
        super().on_error(item, exc)
        self.refused.append((item, type(exc)))


@pytest.fixture
def inbox() -> QueueInbox:
    return QueueInbox()


def test_an_item_that_raises_is_refused_alone_and_counted(inbox: QueueInbox) -> None:
    bad = KeyError("handler bug")
    inbox.put("a", bad, "b")
    with Recorder(inbox) as worker:
        wait_until(lambda: worker.seen == ["a", "b"], what="both good items handled")
        assert worker.errors == 1 and worker.refused == [(bad, KeyError)]
        assert worker.stats() == {"errors": 1}
        assert worker.alive() and worker.crashed is None


def test_ticks_run_while_the_inbox_is_quiet_and_a_failing_one_is_contained(inbox: QueueInbox) -> None:
    with Recorder(inbox) as worker:
        wait_until(lambda: worker.ticks >= 3, what="ticks without items")
        worker.tick_error = RuntimeError("tick bug")
        wait_until(lambda: worker.errors >= 2, what="failing ticks counted")
        assert worker.refused[0] == (None, RuntimeError)
        worker.tick_error = None
        inbox.put("after")
        wait_until(lambda: worker.seen == ["after"], what="an item after the failing ticks")
        assert worker.alive()


def test_liveness_is_the_thread_and_a_recent_heartbeat(inbox: QueueInbox) -> None:
    worker = Recorder(inbox, stall_after=0.3)
    assert not worker.alive(), "not started"
    worker.start()
    try:
        assert worker.alive()
        inbox.put("wait")  # a handler stuck: the thread lives, its heartbeat ages
        wait_until(lambda: not worker.alive(), what="a stuck handler to fail the liveness check")
        worker.gate.set()
        wait_until(worker.alive, what="liveness back once the handler returned")
    finally:
        worker.stop()
    assert not worker.alive(), "stopped"
    with pytest.raises(RuntimeError):
        worker.start()


def test_an_exit_from_a_handler_ends_the_thread_as_crashed(inbox: QueueInbox) -> None:
    inbox.put(SystemExit(3), "never")
    worker = Recorder(inbox).start()
    wait_until(lambda: worker.crashed is not None, what="the worker to die")
    assert isinstance(worker.crashed, SystemExit)
    assert not worker.alive() and worker.seen == [] and worker.errors == 0
