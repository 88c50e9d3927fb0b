"""`service.notify` and `service.logs`: the systemd notify protocol over a real unix datagram
socket; watchdog gating; logging setup."""

import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid

import pytest

from service import logs, notify
from service.notify import Notifier, Watchdog
from support import wait_until


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX/SOCK_DGRAM socket at a short path (sun_path is limited to 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()
    shutil.rmtree(directory)


def _recv(sock, timeout=2.0):
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def _drain(sock):
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return got


def _collect(sock, seconds):
    got, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


def test_exact_datagrams(notify_socket):
    path, sock = notify_socket
    n = Notifier(environ={"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert _recv(sock) == "READY=1"
    n.ready("serving")
    assert _recv(sock) == "READY=1\nSTATUS=serving"
    n.status("batch 12, 2 helpers")
    assert _recv(sock) == "STATUS=batch 12, 2 helpers"
    n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
    n.stopping()
    assert _recv(sock) == "STOPPING=1"


def test_status_cannot_forge_fields(notify_socket):
    path, sock = notify_socket
    Notifier(environ={"NOTIFY_SOCKET": path}).status("ok\nREADY=1")
    assert _recv(sock) == "STATUS=ok READY=1"


def test_reloading_carries_monotonic_usec(notify_socket):
    path, sock = notify_socket
    before = time.monotonic_ns() // 1000
    Notifier(environ={"NOTIFY_SOCKET": path}).reloading()
    after = time.monotonic_ns() // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", _recv(sock))
    assert match and before <= int(match.group(1)) <= after


def test_abstract_namespace_socket():
    name = f"clue-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier(environ={"NOTIFY_SOCKET": "@" + name}).ready()
        assert _recv(sock) == "READY=1"


def test_builtin_sender_forced_even_with_systemd_python(notify_socket, monkeypatch):
    class Exploding:
        @staticmethod
        def notify(message):
            raise AssertionError("systemd-python must not be used")

    path, sock = notify_socket
    monkeypatch.setattr(notify, "_sd_daemon", Exploding)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier(use_systemd=False).ready()
    assert _recv(sock) == "READY=1"


def test_systemd_python_used_when_present(monkeypatch):
    sent = []

    class Fake:
        @staticmethod
        def notify(message):
            sent.append(message)
            return True

    monkeypatch.setattr(notify, "_sd_daemon", Fake)
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert Notifier().stopping()
    assert sent == ["STOPPING=1"]


def test_no_socket_is_a_cheap_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not any([n.ready(), n.status("x"), n.watchdog(), n.reloading(), n.stopping()])


def test_dead_socket_is_logged_once_not_raised(caplog):
    n = Notifier(environ={"NOTIFY_SOCKET": "/nonexistent/clue/notify"})
    with caplog.at_level(logging.WARNING, logger="service.notify"):
        assert not n.watchdog()
        assert not n.watchdog()
    assert len([r for r in caplog.records if "sd_notify" in r.message]) == 1


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert Notifier(environ=env).watchdog_interval() == expected


def test_watchdog_pings_only_while_checks_pass(notify_socket, caplog):
    path, sock = notify_socket
    alive = {"mqtt": True, "worker": True}
    n = Notifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    dog = Watchdog(n, {"mqtt_loop_alive": lambda: alive["mqtt"]})
    dog.add_check("worker_alive", lambda: alive["worker"])
    assert dog.interval == 0.1
    dog.start()
    try:
        pings = _collect(sock, 0.4)
        assert len(pings) >= 4 and set(pings) == {"WATCHDOG=1"}
        alive["worker"] = False
        # A tick already past its checks may still ping; once a later one has seen the failure,
        # every such ping is in the socket (the ticks run one after the other).
        with caplog.at_level(logging.ERROR, logger="service.notify"):
            wait_until(lambda: "withholding watchdog pings" in caplog.text, 5, what="a tick to see the failing check")
        _drain(sock)
        assert _collect(sock, 0.4) == []
        assert dog.failing() == ["worker_alive"]
        alive["worker"] = True
        assert _recv(sock, timeout=1.0) == "WATCHDOG=1"
    finally:
        dog.stop()
    _drain(sock)
    assert _collect(sock, 0.2) == []


def test_watchdog_tick_logs_a_failing_spell_once(notify_socket, caplog):
    path, sock = notify_socket
    alive = {"worker": True}
    dog = Watchdog(Notifier(environ={"NOTIFY_SOCKET": path}), {"worker": lambda: alive["worker"]}, interval=10.0)
    assert dog.tick() and _recv(sock) == "WATCHDOG=1"
    alive["worker"] = False
    with caplog.at_level(logging.ERROR, logger="service.notify"):
        assert not dog.tick() and not dog.tick()
    assert [r.message for r in caplog.records if "failing" in r.message] == [
        "liveness check(s) failing, withholding watchdog pings: worker"
    ]
    alive["worker"] = True
    assert dog.tick() and _recv(sock) == "WATCHDOG=1"


def test_checks_as_a_list_are_named_by_function(notify_socket):
    path, sock = notify_socket

    def mqtt_alive():
        return True

    def worker_alive():
        return False

    dog = Watchdog(Notifier(environ={"NOTIFY_SOCKET": path}), [mqtt_alive, worker_alive, lambda: False, lambda: True])
    assert dog.failing() == ["worker_alive", "<lambda>"]
    assert not dog.tick() and _drain(sock) == []


def test_raising_check_counts_as_failed(notify_socket, caplog):
    path, sock = notify_socket

    def broken():
        raise RuntimeError("boom")

    dog = Watchdog(Notifier(environ={"NOTIFY_SOCKET": path}), {"broken": broken}, interval=10.0)
    with caplog.at_level(logging.ERROR, logger="service.notify"):
        assert not dog.tick() and not dog.tick()
    assert _drain(sock) == []
    assert len([r for r in caplog.records if "raised" in r.message]) == 1


def test_watchdog_off_starts_no_thread():
    dog = Watchdog(Notifier(environ={}), {"x": lambda: True})
    dog.start()
    assert dog.interval is None and dog._thread is None
    dog.stop()


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logging_plain_stderr_outside_systemd(root_logging, capsys):
    handler = logs.configure_logging("INFO", identifier="clue-test", environ={})
    assert isinstance(handler, logging.StreamHandler)
    logging.getLogger("clue.test").warning("hello")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING clue\.test: hello", line)


def test_logging_under_systemd_without_systemd_python(root_logging, capsys, monkeypatch):
    monkeypatch.setattr(logs, "JournalHandler", None)
    logs.configure_logging(logging.DEBUG, identifier="clue-test", environ={"INVOCATION_ID": "abc"})
    logging.getLogger("clue.test").error("one\ntwo")
    logging.getLogger("clue.test").debug("dbg")
    err = capsys.readouterr().err.splitlines()
    assert err[-3:] == ["<3>clue.test: one", "<3>two", "<7>clue.test: dbg"]


def test_logging_journald_requested_but_missing_falls_back(root_logging, capsys, monkeypatch):
    monkeypatch.setattr(logs, "JournalHandler", None)
    handler = logs.configure_logging("INFO", identifier="clue-test", journald=True, environ={})
    assert isinstance(handler, logging.StreamHandler)
    assert "<4>service.logs: journald logging requested" in capsys.readouterr().err


def test_logging_uses_journal_handler_under_systemd(root_logging, monkeypatch):
    class FakeJournalHandler(logging.Handler):
        def __init__(self, **fields):
            super().__init__()
            self.fields = fields

        def emit(self, record):
            pass

    monkeypatch.setattr(logs, "JournalHandler", FakeJournalHandler)
    handler = logs.configure_logging("INFO", environ={"JOURNAL_STREAM": "8:1234"}, identifier="clue-mds")
    assert isinstance(handler, FakeJournalHandler) and handler.fields == {"SYSLOG_IDENTIFIER": "clue-mds"}
    assert logging.getLogger().handlers == [handler]
    assert isinstance(logs.configure_logging("INFO", identifier="clue-mds", journald=False, environ={}), logging.StreamHandler)
