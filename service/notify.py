"""systemd integration for a ``Type=notify`` service: readiness, status, reload, stop and watchdog.

``Notifier`` sends sd_notify(3) messages over ``$NOTIFY_SOCKET``: through systemd-python when it is
importable, else over a unix datagram socket of its own (paths and ``@abstract`` names). Without
``$NOTIFY_SOCKET`` (not under systemd, or ``NotifyAccess=`` denies us) every call is a cheap no-op.
A failed send is logged, never raised: the daemon must not die because its supervisor went away.

``Watchdog`` pings ``WATCHDOG=1`` at half of ``WatchdogSec=`` only while every registered liveness
check passes, so systemd restarts a daemon whose MQTT loop or worker thread is stuck even though
the process is still alive.

>>> notifier = Notifier(environ={})          # not under systemd: nothing is sent
>>> notifier.ready(), notifier.watchdog_interval()
(False, None)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

try:
    from systemd import daemon as _sd_daemon
except ImportError:
    _sd_daemon = None


class Notifier:
    """Sends sd_notify messages for this process.

    ``use_systemd``: None picks systemd-python when importable; False forces the built-in sender.
    ``environ`` defaults to ``os.environ`` and is read at construction; a given one always uses the
    built-in sender (systemd-python only reads ``os.environ``).
    """

    def __init__(self, *, use_systemd: bool | None = None, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        if use_systemd and _sd_daemon is None:
            raise RuntimeError("systemd-python is not installed (pip install 'clue-edge[systemd]')")
        if use_systemd is None:
            use_systemd = _sd_daemon is not None
        # systemd-python reads os.environ itself, so a given ``environ`` needs the built-in sender.
        self._use_systemd = use_systemd and environ is None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._socket is not None

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: ``READY=1``, with an optional status line."""
        return self._send("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping: ``WATCHDOG=1``."""
        return self._send("WATCHDOG=1")

    def reloading(self) -> bool:
        """A reload started (``Type=notify-reload``); send ``ready()`` again when it is done.

        systemd ≥ 253 wants ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, µs) with it to order the two.
        """
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """Shutdown started: ``STOPPING=1``."""
        return self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """``WatchdogSec=`` in seconds when the watchdog is on for this process, else None.

        Like sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer and
        ``$WATCHDOG_PID``, when set, must be our pid. Ping at half of it (``Watchdog`` does).
        """
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_USEC=%r", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                log.warning("ignoring malformed WATCHDOG_PID=%r", self._watchdog_pid)
                return None
        return usec / 1e6

    def _send(self, message: str) -> bool:
        if self._socket is None:
            return False
        try:
            if self._use_systemd:
                if not _sd_daemon.notify(message):
                    raise OSError("systemd.daemon.notify returned False")
            else:
                _send_datagram(self._socket, message.encode())
        except OSError as exc:
            # Log once: a supervisor that went away would otherwise flood the log every ping.
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", self._socket, exc)
                self._warned = True
            return False
        self._warned = False
        return True


def _one_line(text: str) -> str:
    # A newline would start another notify field (e.g. a forged READY=1).
    return " ".join(text.splitlines())


def _send_datagram(address: str, payload: bytes) -> None:
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        raise OSError(f"unsupported NOTIFY_SOCKET address {address!r} (need a path or @abstract name)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(target)
        sock.sendall(payload)


class Watchdog:
    """Thread that pings the systemd watchdog while every liveness check passes.

    ``checks``: named callables, or plain ones named by their ``__name__`` (``daemon.mqtt_alive``).
    ``interval`` is ``WatchdogSec=`` in seconds (default: ``notifier.watchdog_interval()``); pings
    go out every ``interval / 2``. When the watchdog is off, ``start()`` does nothing. A check that
    raises counts as failed. Failing check names are logged once per unhealthy spell.
    """

    def __init__(
        self,
        notifier: Notifier,
        checks: Mapping[str, Callable[[], bool]] | Iterable[Callable[[], bool]] = (),
        *,
        interval: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self._checks: dict[str, Callable[[], bool]] = {}
        if isinstance(checks, Mapping):
            self._checks.update(checks)
        else:
            for check in checks:
                self.add_check(getattr(check, "__name__", repr(check)), check)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: tuple[str, ...] = ()
        self._raising: set[str] = set()

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """Register a liveness check; pings stop while it returns False. A taken name gets a suffix."""
        unique, n = name, 1
        while unique in self._checks:
            n += 1
            unique = f"{name}#{n}"
        self._checks[unique] = check

    def failing(self) -> list[str]:
        """Names of the checks that fail right now."""
        bad = []
        for name, check in list(self._checks.items()):
            try:
                ok = bool(check())
            except Exception:
                # Once per spell, not every half interval.
                if name not in self._raising:
                    log.exception("watchdog check %r raised", name)
                    self._raising.add(name)
                ok = False
            else:
                self._raising.discard(name)
            if not ok:
                bad.append(name)
        return bad

    def tick(self) -> bool:
        """Run the checks once and ping if they all pass; returns whether it pinged."""
        bad = tuple(self.failing())
        if bad != self._failing:
            if bad:
                log.error("liveness check(s) failing, withholding watchdog pings: %s", ", ".join(bad))
            else:
                log.warning("liveness checks pass again, resuming watchdog pings")
            self._failing = bad
        if bad:
            return False
        self.notifier.watchdog()
        return True

    def start(self) -> None:
        """Start pinging in a daemon thread (no-op when the watchdog is off or already running)."""
        if self.interval is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(self.interval / 2,), name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(period)
