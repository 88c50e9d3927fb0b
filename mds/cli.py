"""`clue-mds`: run the metadata service until SIGTERM or SIGINT.

    clue-mds --broker mqtt://127.0.0.1:1883 --db /var/lib/clue-mds/mds.db --similarity cosine

Every flag can also be set by a `CLUE_MDS_*` environment variable (`--max-k` <- `CLUE_MDS_MAX_K`);
the flag wins. `--broker` takes `mqtt://host:port`, `mqtts://host:port`, `unix:///path` or a bare
socket path. Logs go to stderr; under systemd (`NOTIFY_SOCKET` set) it reports `READY=1` once
subscribed.

Exit codes: 0 after a clean stop, 2 for a bad argument or configuration (an unknown similarity, an
unreadable database, a missing TLS file: restarting will not help, so a unit can list it in
`RestartPreventExitStatus=`), 1 for a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from broker.client import MqttClient, parse_broker_url
from mds.service import MetadataService
from mds.similarity import SIMILARITIES
from mds.store import NodeStore

log = logging.getLogger("clue-mds")

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2
ENV_PREFIX = "CLUE_MDS_"


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-.") or "host"
    return f"mds-{host}"[:64]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults from `CLUE_MDS_*` environment variables)."""
    p = argparse.ArgumentParser(
        prog="clue-mds",
        description="CLUE Edge metadata service: collects node metadata, answers helper queries.",
    )
    p.add_argument("--broker", default=_env("BROKER", "mqtt://127.0.0.1:1883"), help="broker URL or unix socket path")
    p.add_argument("--db", default=_env("DB", ":memory:"), help="SQLite file (default: in memory; retained messages rebuild it)")
    p.add_argument("--similarity", default=_env("SIMILARITY", "cosine"), help=f"one of {', '.join(sorted(SIMILARITIES))}")
    p.add_argument("--min-class-share", type=float, default=_env("MIN_CLASS_SHARE", "0.01"), help="share of its histogram a helper must hold in each requested class")
    p.add_argument("--max-k", type=int, default=_env("MAX_K", "32"), help="largest k served (1..64)")
    p.add_argument("--client-id", default=_env("CLIENT_ID", _default_client_id()), help="MQTT client id (fixed: the session key)")
    p.add_argument("--shared-group", default=_env("SHARED_GROUP", "mds"), help="shared-subscription group for queries (empty: none)")
    p.add_argument("--no-shared", action="store_true", help="read mds/query directly: this MdS answers every query")
    p.add_argument("--state-qos", type=int, default=_env("STATE_QOS", "1"), help="QoS of the meta/status subscriptions: 1 keeps updates during a disconnect; 0 lets a fleet larger than half the broker's max_queued_messages rebuild without loss")
    p.add_argument("--session-expiry", type=int, default=_env("SESSION_EXPIRY", "30"), help="s the broker keeps this session (and its queued queries) after a disconnect")
    p.add_argument("--inbox-size", type=int, default=_env("INBOX_SIZE", "100000"), help="messages buffered between the network and the worker (retained metadata of the whole fleet arrives at once)")
    p.add_argument("--username", default=_env("USERNAME", None))
    p.add_argument("--password-file", default=_env("PASSWORD_FILE", None), help="file holding the broker password")
    p.add_argument("--tls-ca", default=_env("TLS_CA", None))
    p.add_argument("--tls-cert", default=_env("TLS_CERT", None))
    p.add_argument("--tls-key", default=_env("TLS_KEY", None))
    p.add_argument("--stats-interval", type=float, default=_env("STATS_INTERVAL", "60"), help="s between stats lines in the log (0: only at exit)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING, ERROR")
    return p


def _broker_settings(url: str) -> dict[str, Any]:
    if url.startswith("/"):
        return {"unix_socket": url}
    return parse_broker_url(url)


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Validate what argparse cannot; return the client's connection settings."""
    if args.similarity not in SIMILARITIES:
        raise ValueError(f"--similarity must be one of {', '.join(sorted(SIMILARITIES))}, got {args.similarity!r}")
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {args.log_level!r}")
    if args.stats_interval < 0:
        raise ValueError("--stats-interval must be >= 0")
    for flag in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"--{flag.replace('_', '-')} {path}: not a readable file")
    return _broker_settings(args.broker)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `clue-mds`; return its exit code (argparse exits with 2 itself on a bad flag)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        connection = _check(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        store = NodeStore(args.db)
    except (sqlite3.Error, OSError, ValueError) as exc:
        parser.error(f"cannot open --db {args.db}: {exc}")
    try:
        client = MqttClient(
            client_id=args.client_id,
            **connection,
            session_expiry=args.session_expiry,
            clean_start=True,
            inbox_size=args.inbox_size,
            username=args.username,
            password_file=args.password_file,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            name="clue-mds",
        )
        service = MetadataService(
            client,
            store,
            similarity=args.similarity,
            min_class_share=args.min_class_share,
            shared_group=None if args.no_shared or not args.shared_group else args.shared_group,
            max_k=args.max_k,
            state_qos=args.state_qos,
        )
    except ValueError as exc:
        store.close()
        parser.error(str(exc))

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(service, client, store, stop, args.stats_interval)
    except Exception:  # noqa: BLE001 - a crash is exit 1, told apart from a bad config (2)
        log.exception("clue-mds crashed")
        return EXIT_CRASH
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(service: MetadataService, client: MqttClient, store: NodeStore, stop: threading.Event, stats_interval: float) -> int:
    log.info("store %s: %d nodes (%d online)", store.path, store.count(), store.count(online=True))
    service.start()
    try:
        client.start()
    except (OSError, ValueError) as exc:  # TLS material or a password the client cannot use
        log.error("cannot start the MQTT client: %s", exc)
        service.stop()
        store.close()
        return EXIT_CONFIG
    try:
        if client.wait_subscribed(5.0):
            log.info("ready: connected to the broker, serving %s", service.query_filter)
        else:
            log.warning("not connected to the broker yet; retrying in the background")
        _sd_notify(b"READY=1")
        next_stats = time.monotonic() + stats_interval
        while not stop.wait(1.0):
            if stats_interval and time.monotonic() >= next_stats:
                log.info("stats %s", json.dumps(service.stats()))
                next_stats = time.monotonic() + stats_interval
        log.info("stopping")
        _sd_notify(b"STOPPING=1")
        return EXIT_OK
    finally:
        service.stop()
        client.stop()
        log.info("final stats %s", json.dumps(service.stats()))
        store.close()


def _sd_notify(state: bytes) -> None:
    """Tell systemd (Type=notify) our state; nothing without `NOTIFY_SOCKET`."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state)
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


__all__ = ["EXIT_CONFIG", "EXIT_CRASH", "EXIT_OK", "build_parser", "main"]
