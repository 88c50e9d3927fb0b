"""A private Mosquitto: generated config, free loopback port (or a unix socket), start/stop/kill.

Used by the test fixtures, by the simulator when it is given no broker URL, and by developers
(`python -m broker.launcher`). The generated config sets every limit that matters explicitly and
says in comments what each choice costs; `extra_conf` lines, extra `listeners` (each with its own
option lines: TLS files, `protocol websockets`, …) or a whole custom config (`config_file` /
`config_text`, with `{port}`, `{host}`, `{workdir}`, `{data_dir}`, `{log_file}`, `{unix_path}`
placeholders) cover TLS, ACL and bridge setups.

Root: Mosquitto started as root switches to an unprivileged user (its `user` option) before it
writes its log and persistence database. We keep that (defence in depth) and write `user <name>`
explicitly — `mosquitto` when that account exists, else `nobody`, or whatever `run_as=` says — and
chown the run directory to that user. As a non-root user nothing changes hands.

`kill()` (SIGKILL) and `start()` again reuse the same port(s) and persistence directory, which is
how the tests show queued QoS 1 messages surviving a broker crash.

>>> with PrivateMosquitto() as broker:            # doctest: +SKIP
...     print(broker.url)
mqtt://127.0.0.1:40123
"""

from __future__ import annotations

import argparse
import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from broker.errors import BrokerError, BrokerNotFound, BrokerStartError

#: Payload limit of one MQTT message the client enforces by default (1 MiB) plus 64 KiB for the
#: topic, properties and fixed header. Blobs travel as 256 KiB chunks well below it.
DEFAULT_MAX_PACKET_SIZE = (1 << 20) + (64 << 10)
DEFAULT_MAX_QUEUED_MESSAGES = 10_000
DEFAULT_MAX_QUEUED_BYTES = 64 << 20
DEFAULT_MAX_INFLIGHT_MESSAGES = 20
DEFAULT_LOG_TYPES = ("error", "warning", "notice", "information")

_RUNNING: "weakref.WeakSet[PrivateMosquitto]" = weakref.WeakSet()


@dataclass(frozen=True)
class Listener:
    """One listener block. `port=0` picks a free port on first start and keeps it afterwards.

    `unix_path` makes it a unix socket instead (`""` means `<workdir>/mosquitto.sock`).
    `options` are lines placed under this listener (e.g. `cafile …`, `require_certificate true`).
    """

    port: int = 0
    host: str = "127.0.0.1"
    unix_path: str | None = None
    options: tuple[str, ...] = ()
    name: str = ""

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    @property
    def is_tls(self) -> bool:
        return any(line.split()[:1] == ["certfile"] for line in self.options if line.strip())

    def line(self) -> str:
        if self.is_unix:
            return f"listener 0 {self.unix_path}"
        return f"listener {self.port} {self.host}"


def find_mosquitto(binary: str | os.PathLike[str] | None = None) -> str:
    """Path of the mosquitto binary: `binary`, `$PATH`, or `/usr/sbin/mosquitto`."""
    if binary is not None:
        path = str(binary)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise BrokerNotFound(f"mosquitto binary {path!r} not found or not executable")
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerNotFound(
        "mosquitto not found (looked in $PATH and /usr/sbin): install the Debian package "
        "'mosquitto' (apt-get install mosquitto mosquitto-clients)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (bind to port 0, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PrivateMosquitto:
    """A Mosquitto process of our own. Context manager: `with PrivateMosquitto() as b: b.url`.

    Arguments are keyword-only; every limit is explicit in the generated config:

    - `port`/`host`: the main TCP listener (`port=0`: a free loopback port); `unix_socket=True`
      (or a path) adds a unix-socket listener. `listeners=[Listener(...), …]` replaces both.
    - `max_packet_size`, `max_queued_messages`, `max_queued_bytes`, `max_inflight_messages`,
      `persistence`, `autosave_interval`, `autosave_on_changes`, `allow_anonymous`: as in
      `mosquitto.conf(5)`; `None` leaves a line out (Mosquitto's default applies).
    - `extra_conf`: more lines (a string or a sequence), placed before the listener blocks.
    - `config_file` / `config_text`: use this config instead of generating one (placeholders
      substituted); then `listeners` must describe the ports it opens, for the readiness check.
    - `workdir`: where config, log, socket and `data/` (persistence) live; default a new temp dir,
      removed by `close()` unless `keep_workdir`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        unix_socket: bool | str = False,
        listeners: Sequence[Listener] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        keep_workdir: bool = False,
        extra_conf: str | Sequence[str] = (),
        config_file: str | os.PathLike[str] | None = None,
        config_text: str | None = None,
        max_packet_size: int | None = DEFAULT_MAX_PACKET_SIZE,
        max_queued_messages: int | None = DEFAULT_MAX_QUEUED_MESSAGES,
        max_queued_bytes: int | None = DEFAULT_MAX_QUEUED_BYTES,
        max_inflight_messages: int | None = DEFAULT_MAX_INFLIGHT_MESSAGES,
        persistence: bool = True,
        autosave_interval: int = 1,
        autosave_on_changes: bool = True,
        allow_anonymous: bool | None = True,
        log_types: Sequence[str] = DEFAULT_LOG_TYPES,
        run_as: str | None = None,
        binary: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        if config_file is not None and config_text is not None:
            raise ValueError("give config_file or config_text, not both")
        if listeners is None:
            ls = [Listener(port=port, host=host, name="main")]
            if unix_socket:
                ls.append(Listener(unix_path="" if unix_socket is True else str(unix_socket), name="unix"))
            listeners = ls
        if not listeners:
            raise ValueError("at least one listener is needed")
        self._binary_arg = binary
        self._created_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="clue-mosquitto-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.keep_workdir = keep_workdir
        self._listeners = [
            replace(li, unix_path=str(self._workdir / "mosquitto.sock")) if li.unix_path == "" else li
            for li in listeners
        ]
        self._ports_pinned = [li.is_unix or li.port != 0 for li in self._listeners]
        self._extra = [extra_conf] if isinstance(extra_conf, str) else list(extra_conf)
        self._custom = Path(config_file).read_text() if config_file is not None else config_text
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.max_inflight_messages = max_inflight_messages
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.autosave_on_changes = autosave_on_changes
        self.allow_anonymous = allow_anonymous
        self.log_types = tuple(log_types)
        self.run_as = run_as
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._started_once = False
        self.starts = 0

    # --- paths and addresses -------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def data_dir(self) -> Path:
        return self._workdir / "data"

    @property
    def config_path(self) -> Path:
        return self._workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir / "mosquitto.log"

    @property
    def stderr_path(self) -> Path:
        return self._workdir / "stderr.log"

    @property
    def listeners(self) -> list[Listener]:
        """The listeners with their resolved ports (after the first start)."""
        return list(self._listeners)

    def listener(self, name: str) -> Listener:
        for li in self._listeners:
            if li.name == name:
                return li
        raise KeyError(name)

    @property
    def host(self) -> str:
        return self._main_tcp().host

    @property
    def port(self) -> int:
        return self._main_tcp().port

    @property
    def unix_path(self) -> str | None:
        for li in self._listeners:
            if li.is_unix:
                return li.unix_path
        return None

    @property
    def url(self) -> str:
        """`mqtt://host:port` (or `mqtts://`) of the first TCP listener, else `unix:///path`."""
        first = self._listeners[0]
        if first.is_unix:
            return f"unix://{first.unix_path}"
        host = f"[{first.host}]" if ":" in first.host else first.host
        return f"{'mqtts' if first.is_tls else 'mqtt'}://{host}:{first.port}"

    def _main_tcp(self) -> Listener:
        for li in self._listeners:
            if not li.is_unix:
                return li
        raise BrokerError("this broker has no TCP listener")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- config ----------------------------------------------------------------------------

    def _run_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        if self.run_as is not None:
            return self.run_as
        try:
            pwd.getpwnam("mosquitto")
            return "mosquitto"
        except KeyError:
            return "nobody"

    def render_config(self) -> str:
        """The config text the next `start()` will use."""
        if self._custom is not None:
            return self._substitute(self._custom)
        user = self._run_user()
        L: list[str] = [
            "# Generated by broker.launcher.PrivateMosquitto: a private Mosquitto for CLUE Edge",
            "# (tests, the simulator, development). Every limit is explicit; comments say what it costs.",
            "",
        ]
        if user is not None:
            L += [
                "# Started as root: mosquitto drops to this user before writing its log and database.",
                "# The run directory is chowned to it. (Run as a normal user, this has no effect.)",
                f"user {user}",
                "",
            ]
        if self.persistence:
            L += [
                "# Persistence: subscriptions, retained and queued messages of persistent sessions survive",
                "# a restart. Save after every change: measured with Mosquitto 2.0.11, at the default",
                "# autosave (every 1800 s) a SIGKILLed broker lost 10 of 10 QoS 1 messages queued for a",
                "# persistent session; with autosave_on_changes true / autosave_interval 1 all 10 survived.",
                "# The save runs on the broker's next main-loop pass, a few ms after the change: a SIGKILL",
                "# within those ms of a PUBACK can still lose that last message (measured: the 10th of 10",
                "# lost when killed right after its PUBACK; none lost once the database was written).",
                "# Cost: each save rewrites the whole database, so with many queued or retained messages",
                "# the broker does a lot of disk I/O; a large fleet raises autosave_interval to N changes",
                "# per save and accepts losing up to N changes on a crash.",
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "persistence_file mosquitto.db",
                f"autosave_on_changes {'true' if self.autosave_on_changes else 'false'}",
                f"autosave_interval {self.autosave_interval}",
                "",
            ]
        else:
            L += ["# No persistence: a restart loses sessions, queued and retained messages.", "persistence false", ""]
        if self.max_packet_size is not None:
            L += [
                "# Largest MQTT packet accepted (whole packet, not just the payload); a client that sends",
                "# more is disconnected. Sized for a 1 MiB payload plus topic/properties; blobs travel as",
                "# 256 KiB chunks. Cost: each message in flight can hold this much broker memory.",
                f"max_packet_size {self.max_packet_size}",
                "",
            ]
        if self.max_queued_messages is not None:
            L += [
                "# QoS 1/2 messages queued per client beyond those in flight (offline persistent sessions",
                "# included); above it new messages for that client are dropped silently. Cost: memory,",
                "# and database size with persistence. 0 means no limit (not recommended).",
                f"max_queued_messages {self.max_queued_messages}",
                "",
            ]
        if self.max_queued_bytes is not None:
            L += [
                "# Same queue bounded in bytes (the first limit reached applies): a node offline while",
                "# KT blobs or FL models are addressed to it cannot make the broker hold unbounded memory.",
                f"max_queued_bytes {self.max_queued_bytes}",
                "",
            ]
        if self.max_inflight_messages is not None:
            L += [
                "# Outgoing QoS 1/2 messages in flight per client. Higher: more throughput to slow",
                "# clients, more redelivered duplicates after a reconnect; 1 would give strict order.",
                f"max_inflight_messages {self.max_inflight_messages}",
                "",
            ]
        L += [
            "# Request/response latency over loopback: no Nagle delay (costs more small packets).",
            "set_tcp_nodelay true",
            "",
            "# Logging to a file in the run directory (PrivateMosquitto.log_text() reads it).",
            f"log_dest file {self.log_path}",
            *[f"log_type {t}" for t in self.log_types],
            "connection_messages true",
            "log_timestamp true",
            "",
        ]
        if self.allow_anonymous is not None:
            L += [
                "# Development default: anonymous clients allowed. Production configs use TLS + ACL.",
                f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
                "",
            ]
        if self._extra:
            L += ["# Extra lines (PrivateMosquitto(extra_conf=...))", *[self._substitute(x) for x in self._extra], ""]
        for li in self._listeners:
            L += [f"# listener {li.name or ''}".rstrip(), li.line(), *[self._substitute(o) for o in li.options], ""]
        return "\n".join(L)

    def _substitute(self, text: str) -> str:
        first_tcp = next((li for li in self._listeners if not li.is_unix), None)
        values = {
            "{port}": str(first_tcp.port) if first_tcp else "",
            "{host}": first_tcp.host if first_tcp else "",
            "{workdir}": str(self._workdir),
            "{data_dir}": str(self.data_dir),
            "{log_file}": str(self.log_path),
            "{unix_path}": self.unix_path or "",
        }
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "PrivateMosquitto":
        """Start mosquitto (same ports and data dir as before, if it ran already) and wait until it
        accepts connections on every listener. Raise `BrokerStartError` with the log tail if not."""
        with self._lock:
            if self.running:
                return self
            binary = find_mosquitto(self._binary_arg)
            attempts = 1 if all(self._ports_pinned) or self._started_once else 3
            last: BrokerStartError | None = None
            for _ in range(attempts):
                self._resolve_ports()
                try:
                    self._launch(binary)
                    self._started_once = True
                    self.starts += 1
                    _RUNNING.add(self)
                    return self
                except BrokerStartError as exc:
                    last = exc
                    if "in use" not in str(exc):
                        raise
                    # A race on an auto-picked port: pick again.
                    self._listeners = [
                        li if pinned else replace(li, port=0) for li, pinned in zip(self._listeners, self._ports_pinned)
                    ]
            assert last is not None
            raise last

    def _resolve_ports(self) -> None:
        self._listeners = [
            replace(li, port=free_port(li.host)) if (not li.is_unix and li.port == 0) else li for li in self._listeners
        ]

    def _launch(self, binary: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())
        os.chmod(self.config_path, 0o644)
        self._hand_over()
        for li in self._listeners:
            if li.is_unix and li.unix_path and os.path.exists(li.unix_path):
                os.unlink(li.unix_path)  # a socket left by a SIGKILLed run would block the bind
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        err_offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        with open(self.stderr_path, "ab") as err:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the broker
            )
        self._wait_ready(log_offset, err_offset)

    def _hand_over(self) -> None:
        """As root: give the run directory to the user mosquitto drops to."""
        user = self._run_user()
        if user is None:
            return
        try:
            entry = pwd.getpwnam(user)
        except KeyError as exc:
            raise BrokerError(f"user {user!r} (for mosquitto's `user` option) does not exist") from exc
        for path in (self._workdir, self.data_dir, *self.data_dir.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.log_path.exists():
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)
        blocked = _unreachable_parent(self._workdir, entry.pw_uid, entry.pw_gid)
        if blocked is not None:
            raise BrokerError(
                f"mosquitto runs as {user!r} but cannot reach {self._workdir}: {blocked} is not searchable "
                "by it; use a workdir under /tmp (the default) or pass run_as="
            )

    def _wait_ready(self, log_offset: int, err_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        # The "running" line (information level) proves the listeners are ours, not a process that
        # grabbed an auto-picked port first. Custom configs log where they like: skip it there.
        check_log = self._custom is None and bool({"information", "all"} & set(self.log_types))
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                tail = self._tail_since(log_offset, err_offset)
                reason = " (address in use)" if "in use" in tail else ""
                raise BrokerStartError(f"mosquitto exited with status {code} during start{reason}:\n{tail}")
            if all(self._accepts(li) for li in self._listeners) and (
                not check_log or " running" in self._read(self.log_path, log_offset)
            ):
                if self._proc.poll() is None:
                    return
                continue
            if time.monotonic() > deadline:
                tail = self._tail_since(log_offset, err_offset)
                self._terminate(signal.SIGKILL)
                raise BrokerStartError(
                    f"mosquitto did not accept connections within {self.start_timeout} s:\n{tail}"
                )
            time.sleep(0.02)

    @staticmethod
    def _accepts(li: Listener) -> bool:
        try:
            if li.is_unix:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    s.connect(str(li.unix_path))
            else:
                with socket.create_connection((li.host, li.port), timeout=0.5):
                    pass
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its database and exits); SIGKILL after `timeout` s."""
        with self._lock:
            self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. The next `start()` reuses the same ports and persistence dir."""
        with self._lock:
            self._terminate(signal.SIGKILL)

    def restart(self) -> "PrivateMosquitto":
        self.stop()
        return self.start()

    def _terminate(self, sig: int, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop, and remove the run directory if we created it (unless `keep_workdir`)."""
        self.stop()
        if self._created_workdir and not self.keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "PrivateMosquitto":
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: do not leave the temp dir behind
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivateMosquitto(url={self.url!r}, running={self.running}, workdir={str(self._workdir)!r})"

    # --- logs ------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Mosquitto's log file plus what it wrote to stdout/stderr."""
        return self._read(self.log_path, 0) + self._read(self.stderr_path, 0)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _tail_since(self, log_offset: int, err_offset: int, lines: int = 40) -> str:
        text = self._read(self.log_path, log_offset) + self._read(self.stderr_path, err_offset)
        return "\n".join(text.splitlines()[-lines:]) or "(no log output)"

    @staticmethod
    def _read(path: Path, offset: int) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _unreachable_parent(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on `path` that user `uid` cannot search, or None."""
    for directory in [path.resolve(), *path.resolve().parents]:
        st = directory.stat()
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return directory
    return None


@atexit.register
def _kill_leftovers() -> None:
    for broker in list(_RUNNING):
        try:
            broker.kill()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m broker.launcher`: run a private Mosquitto until Ctrl-C; print its URL."""
    ap = argparse.ArgumentParser(prog="python -m broker.launcher", description=main.__doc__)
    ap.add_argument("--port", type=int, default=0, help="TCP port (0: a free one)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--unix", action="store_true", help="also listen on <workdir>/mosquitto.sock")
    ap.add_argument("--workdir", default=None, help="run directory (default: a new temp dir)")
    ap.add_argument("--conf", action="append", default=[], help="extra config line (repeatable)")
    ap.add_argument("--no-persistence", action="store_true")
    args = ap.parse_args(argv)
    broker = PrivateMosquitto(
        port=args.port,
        host=args.host,
        unix_socket=args.unix,
        workdir=args.workdir,
        keep_workdir=args.workdir is not None,
        extra_conf=args.conf,
        persistence=not args.no_persistence,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        broker.start()
        print(broker.url, flush=True)
        if broker.unix_path:
            print(f"unix://{broker.unix_path}", flush=True)
        print(f"workdir {broker.workdir}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if not broker.running:
                print("mosquitto exited:\n" + broker.log_tail(), file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        broker.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["Listener", "PrivateMosquitto", "find_mosquitto", "free_port"]
