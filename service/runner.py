"""How every daemon runs: settings, logging, signals, readiness, the watchdog and the exit code.

    def main(argv=None) -> int:
        return serve(MdsSettings, build, argv)

`serve` loads the settings (`service.settings`), sets up logging (`service.logs`), builds the
daemon and `run`s it. A bad setting, or a `ValueError` from `build` (a value a component refuses, a
database that does not open), exits 78 with one line ``clue-x: error: …`` on stderr.

`run` starts the daemon and tells systemd ``READY=1`` once `Daemon.wait_ready` says so; it pings
the watchdog while every `Daemon.liveness` check passes (`service.notify.Watchdog`) and logs the
daemon's `stats()` every `stats_interval` s (with its `status()` as ``STATUS=``). SIGTERM and SIGINT
stop it: exit 0. SIGHUP reloads a daemon that has a `reload` (``RELOADING=1``, then ``READY=1``);
one without keeps SIGHUP's default, which ends the process. A daemon whose thread died
(`Daemon.crashed`), or one that raised, exits 1; a `ConfigError` from `start()` (TLS material or a
password the client cannot use) exits 78.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from service.exit_codes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK
from service.logs import configure_logging
from service.metrics import MetricsServer
from service.notify import Notifier, Watchdog
from service.settings import ConfigError, DaemonSettings, problems
from service.worker import InboxWorker

log = logging.getLogger(__name__)

S = TypeVar("S", bound=DaemonSettings)

#: Seconds between two looks at the stop, reload and stats clocks.
_TICK = 0.2


class Daemon(ABC):
    """What `run` runs: a daemon's threads and connection behind a few hooks."""

    #: Re-reads the configuration on SIGHUP, on the runner's thread; None: the daemon has no reload.
    reload: Callable[[], None] | None = None

    @abstractmethod
    def start(self) -> None:
        """Start serving (connecting in the background) and return at once."""

    @abstractmethod
    def wait_ready(self, timeout: float) -> bool:
        """Block up to `timeout` s; True once ready to serve."""

    @abstractmethod
    def liveness(self) -> Mapping[str, Callable[[], bool]]:
        """Named checks that hold while the daemon works; the watchdog pings while all pass."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving and disconnect. What `stats()` reads stays open until `close()`."""

    @property
    def crashed(self) -> BaseException | None:
        """What ended one of its threads outside every boundary (`run` then stops it, exit 1)."""
        return None

    def stats(self) -> Mapping[str, Any]:
        """Counters for the periodic and the final stats line; none by default."""
        return {}

    def status(self) -> str | None:
        """The one line `systemctl status` shows; none by default."""
        return None

    def close(self) -> None:  # noqa: B027 - an optional hook: most daemons hold nothing past stop()
        """Release what outlived `stop()` for the final stats (a database); nothing by default."""


class Connection(Protocol):
    """What `WorkerDaemon` needs of its client (`broker.client.MqttClient`)."""

    @property
    def loop_alive(self) -> bool: ...

    def start(self) -> Any: ...

    def wait_subscribed(self, timeout: float = 10.0) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class WorkerDaemon(Daemon):
    """A daemon made of one MQTT client and the `InboxWorker` that takes its inbox.

    The worker starts first (it subscribes, so the subscriptions go out with the first connect) and
    stops first. Ready once subscribed, or `ready_after` s after `start()` all the same (logged;
    the client keeps trying): a broker that is down must not fail the unit's start. `status` gives
    the ``STATUS=`` line; `close` runs after the final stats (the MdS closes its store there);
    `metrics`, the daemon's Prometheus endpoint, serves from `start()` to `stop()`.
    """

    def __init__(
        self,
        client: Connection,
        worker: InboxWorker[Any],
        *,
        status: Callable[[], str] | None = None,
        close: Callable[[], None] | None = None,
        ready_after: float = 5.0,
        metrics: MetricsServer | None = None,
    ) -> None:
        self.client = client
        self.worker = worker
        self._status = status
        self._close = close
        self.ready_after = ready_after
        self.metrics = metrics
        self._started_at = 0.0

    @property
    def crashed(self) -> BaseException | None:
        return self.worker.crashed

    def start(self) -> None:
        if self.metrics is not None:
            self.metrics.start()
        self.worker.start()
        self._started_at = time.monotonic()
        try:
            self.client.start()
        except (OSError, ValueError) as exc:  # TLS material or a password file the client cannot use
            raise ConfigError(f"MQTT client: {exc}") from exc

    def wait_ready(self, timeout: float) -> bool:
        if self.client.wait_subscribed(timeout):
            log.info("%s: connected to the broker and subscribed", self.worker.name)
            return True
        if time.monotonic() - self._started_at < self.ready_after:
            return False
        log.warning("%s: not connected to the broker yet; ready all the same, retrying in the background", self.worker.name)
        return True

    def liveness(self) -> Mapping[str, Callable[[], bool]]:
        return {"mqtt loop": lambda: self.client.loop_alive, "worker": self.worker.alive}

    def stop(self) -> None:
        self.worker.stop()
        self.client.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def stats(self) -> Mapping[str, Any]:
        return self.worker.stats()

    def status(self) -> str | None:
        return self._status() if self._status is not None else None

    def close(self) -> None:
        if self._close is not None:
            self._close()


def run(daemon: Daemon, *, name: str, stats_interval: float = 0.0, notifier: Notifier | None = None) -> int:
    """Run `daemon` until SIGTERM or SIGINT (module docstring); return the exit code.

    `name` is the daemon's program (``clue-mds``), the logger of these lines; `stats_interval` (s,
    0: only the final line) paces the stats lines; `notifier` defaults to this process's.
    """
    say = logging.getLogger(name)
    notifier = notifier or Notifier()
    stop, reload = threading.Event(), threading.Event()
    events = {signal.SIGTERM: stop, signal.SIGINT: stop}
    if daemon.reload is not None:
        events[signal.SIGHUP] = reload
    previous = {sig: signal.signal(sig, lambda *_, event=event: event.set()) for sig, event in events.items()}
    watchdog = Watchdog(notifier, daemon.liveness())
    code = EXIT_OK
    try:
        daemon.start()
        watchdog.start()
        _serve(daemon, say, notifier, stop, reload, stats_interval)
        if daemon.crashed is not None:
            code = EXIT_CRASH
    except ConfigError as exc:
        say.error("cannot start: %s", exc)
        code = EXIT_CONFIG
    except Exception:  # noqa: BLE001 - a crash is exit 1, told apart from a bad config (78)
        say.exception("crashed")
        code = EXIT_CRASH
    finally:
        watchdog.stop()
        notifier.stopping()
        try:
            daemon.stop()
            _log_stats(say, "final stats", daemon)
            daemon.close()
        except Exception:  # noqa: BLE001 - report it; the process ends either way
            say.exception("stopping failed")
            code = EXIT_CRASH
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _serve(
    daemon: Daemon, say: logging.Logger, notifier: Notifier, stop: threading.Event, reload: threading.Event, stats_interval: float
) -> None:
    ready = False
    next_stats = time.monotonic() + stats_interval
    while daemon.crashed is None:
        if not ready and daemon.wait_ready(_TICK):  # it blocks up to _TICK while not ready
            ready = True
            notifier.ready(daemon.status())
        if stop.wait(_TICK if ready else 0.0):
            say.info("stopping")
            return
        if ready and reload.is_set() and daemon.reload is not None:
            reload.clear()
            notifier.reloading()
            try:
                daemon.reload()
            except Exception:  # noqa: BLE001 - a failed reload keeps the running configuration
                say.exception("reload failed; the running configuration stays")
            notifier.ready(daemon.status())
        if stats_interval and time.monotonic() >= next_stats:
            next_stats = time.monotonic() + stats_interval
            _log_stats(say, "stats", daemon)
            status = daemon.status()
            if status is not None:
                notifier.status(status)
    say.error("a thread of the daemon died: stopping")


def _log_stats(say: logging.Logger, label: str, daemon: Daemon) -> None:
    stats = daemon.stats()
    if stats:
        say.info("%s %s", label, json.dumps(stats))


def serve(settings_cls: type[S], build: Callable[[S], Daemon], argv: Sequence[str] | None = None) -> int:
    """Load `settings_cls` from `argv` (``sys.argv`` when None), `build` the daemon, `run` it.

    Returns the exit code; a bad flag exits 78 through the parser (`service.cli`).
    """
    prog = settings_cls.program
    try:
        settings = settings_cls.from_argv(argv)
    except ConfigError as exc:
        return _refuse(prog, exc)
    configure_logging(settings.log_level, identifier=prog)
    try:
        daemon = build(settings)
    except ValueError as exc:  # a ConfigError, a model that did not validate, a value a component refused
        return _refuse(prog, exc)
    return run(daemon, name=prog, stats_interval=settings.stats_interval)


def _refuse(prog: str, exc: ValueError) -> int:
    # stderr, not the log: the first line an operator sees, with or without logging set up.
    message = problems(exc) if isinstance(exc, ValidationError) else str(exc)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


__all__ = ["Connection", "Daemon", "WorkerDaemon", "run", "serve"]
