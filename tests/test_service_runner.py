"""`service.runner`: signals stop or reload the daemon, systemd hears READY/RELOADING/STOPPING and
watchdog pings only while the daemon is alive, and the exit code says how it ended.

`run` installs signal handlers, so it runs on the test's (main) thread; a thread beside it reads
what a systemd notify socket would get and sends the signals. The real daemons run under the
runner as processes in tests/test_mds_service.py, test_relay.py, test_fl.py and test_deploy.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from service.exit_codes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK
from service.notify import Notifier
from service.runner import Daemon, run, serve
from service.settings import ConfigError, DaemonSettings
from support import wait_until


class FakeDaemon(Daemon):
    """Records the runner's calls; ready when `ready` is set, alive while `healthy`."""

    def __init__(self, *, fail_start: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.ready = threading.Event()
        self.ready.set()
        self.healthy = True
        self.fail_start = fail_start
        self.died: BaseException | None = None
        self.sighup_at_start: Any = None

    @property
    def crashed(self) -> BaseException | None:
        return self.died

    def start(self) -> None:
        self.calls.append("start")
        self.sighup_at_start = signal.getsignal(signal.SIGHUP)
        if self.fail_start is not None:
            raise self.fail_start

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def liveness(self) -> Mapping[str, Callable[[], bool]]:
        return {"fake": lambda: self.healthy}

    def stop(self) -> None:
        self.calls.append("stop")

    def stats(self) -> Mapping[str, Any]:
        return {"handled": 3}

    def status(self) -> str | None:
        return "3 handled"

    def close(self) -> None:
        self.calls.append("close")


class ReloadingDaemon(FakeDaemon):
    def reload(self) -> None:
        self.calls.append("reload")


class Systemd:
    """The notify socket of a `Type=notify` unit with `WatchdogSec=0.4` (pings every 0.2 s)."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # sun_path holds 108 bytes
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def notifier(self) -> Notifier:
        return Notifier(environ={"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "400000"})

    def seen(self, line: str) -> int:
        with self._lock:
            return sum(line in m.splitlines() for m in self.messages)

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            with self._lock:
                self.messages.append(data.decode())

    def close(self) -> None:
        self._closed.set()
        self._reader.join(2)
        self.sock.close()
        shutil.rmtree(self.directory)


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    sd = Systemd()
    yield sd
    sd.close()


def beside(script: Callable[[], None]) -> Callable[[], None]:
    """Run `script` in a thread now; the returned call joins it and re-raises what it raised."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            script()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failure.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)  # do not leave the runner waiting

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(10)
        if failure:
            raise failure[0]

    return join


def kill(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_the_daemon_and_exits_0(systemd: Systemd, sig: signal.Signals, caplog: pytest.LogCaptureFixture) -> None:
    daemon = FakeDaemon()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def script() -> None:
        wait_until(lambda: systemd.seen("READY=1") and systemd.seen("WATCHDOG=1"), 5, what="READY=1 and a ping")
        kill(sig)

    join = beside(script)
    with caplog.at_level("INFO", logger="clue-fake"):
        code = run(daemon, name="clue-fake", notifier=systemd.notifier())
    join()
    assert code == EXIT_OK
    assert daemon.calls == ["start", "stop", "close"]
    wait_until(lambda: systemd.seen("STOPPING=1"), 2, what="STOPPING=1")
    assert systemd.seen("STATUS=3 handled"), systemd.messages
    assert daemon.sighup_at_start == before[signal.SIGHUP], "no reload: SIGHUP keeps its default"
    assert 'final stats {"handled": 3}' in caplog.text
    assert {s: signal.getsignal(s) for s in before} == before, "handlers restored"


def test_sighup_reloads_between_reloading_and_ready(systemd: Systemd) -> None:
    daemon = ReloadingDaemon()

    def script() -> None:
        wait_until(lambda: systemd.seen("READY=1"), 5, what="READY=1")
        kill(signal.SIGHUP)
        wait_until(lambda: "reload" in daemon.calls and systemd.seen("READY=1") == 2, 5, what="the reload and READY=1 again")
        kill(signal.SIGTERM)

    join = beside(script)
    code = run(daemon, name="clue-fake", notifier=systemd.notifier())
    join()
    assert code == EXIT_OK and daemon.calls == ["start", "reload", "stop", "close"]
    lines = [line for m in systemd.messages for line in m.splitlines() if line.split("=")[0] in ("READY", "RELOADING")]
    assert lines == ["READY=1", "RELOADING=1", "READY=1"]


def test_ready_waits_for_the_daemon_and_pings_follow_its_liveness(systemd: Systemd) -> None:
    daemon = FakeDaemon()
    daemon.ready.clear()

    def script() -> None:
        wait_until(lambda: systemd.seen("WATCHDOG=1") >= 2, 5, what="pings before ready")
        assert not systemd.seen("READY=1")
        daemon.ready.set()
        wait_until(lambda: systemd.seen("READY=1"), 5, what="READY=1")
        daemon.healthy = False
        pings = systemd.seen("WATCHDOG=1")
        threading.Event().wait(0.6)  # three ping periods
        assert systemd.seen("WATCHDOG=1") <= pings + 1, "pings withheld while a check fails"
        daemon.healthy = True
        wait_until(lambda: systemd.seen("WATCHDOG=1") > pings + 1, 5, what="pings again")
        kill(signal.SIGTERM)

    join = beside(script)
    assert run(daemon, name="clue-fake", notifier=systemd.notifier()) == EXIT_OK
    join()


def test_a_dead_thread_stops_the_daemon_and_exits_1(systemd: Systemd) -> None:
    daemon = FakeDaemon()
    join = beside(lambda: setattr(daemon, "died", SystemExit(1)))
    assert run(daemon, name="clue-fake", notifier=systemd.notifier()) == EXIT_CRASH
    join()
    assert daemon.calls == ["start", "stop", "close"]


def test_a_start_that_cannot_use_its_settings_exits_78(systemd: Systemd) -> None:
    daemon = FakeDaemon(fail_start=ConfigError("MQTT client: no such file"))
    assert run(daemon, name="clue-fake", notifier=systemd.notifier()) == EXIT_CONFIG
    assert daemon.calls == ["start", "stop", "close"]


def test_a_crash_exits_1(systemd: Systemd) -> None:
    daemon = FakeDaemon(fail_start=RuntimeError("bug"))
    assert run(daemon, name="clue-fake", notifier=systemd.notifier()) == EXIT_CRASH
    assert daemon.calls == ["start", "stop", "close"]


class FakeSettings(DaemonSettings):
    model_config = SettingsConfigDict(env_prefix="CLUE_FAKE_")

    program: ClassVar[str] = "clue-fake"
    size: int = Field(1, ge=1, description="how many")


def test_serve_refuses_bad_settings_and_a_build_that_raises_with_78(capsys: pytest.CaptureFixture[str]) -> None:
    def never(settings: FakeSettings) -> Daemon:
        raise AssertionError("built from bad settings")

    def refuse(settings: FakeSettings) -> Daemon:
        raise ValueError("db: cannot open /nowhere")

    assert serve(FakeSettings, never, ["--size", "0"]) == EXIT_CONFIG
    assert serve(FakeSettings, refuse, ["--size", "2"]) == EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err == ["clue-fake: error: invalid settings: size: Input should be greater than or equal to 1", "clue-fake: error: db: cannot open /nowhere"]
    with pytest.raises(SystemExit) as info:
        serve(FakeSettings, never, ["--bogus"])
    assert info.value.code == EXIT_CONFIG
