"""`clue-mds`: run the metadata service until SIGTERM or SIGINT.

    clue-mds --broker mqtt://127.0.0.1:1883 --db /var/lib/clue-mds/mds.db --similarity cosine

Every option but `--no-shared` can also be set by a `CLUE_MDS_*` environment variable
(`--max-k` <- `CLUE_MDS_MAX_K`); the flag wins. `--broker` takes `mqtt://host:port`,
`mqtts://host:port`, `unix:///path` or a bare socket path. Logs go to stderr, or to the journal
under systemd (`service.logs`); with `NOTIFY_SOCKET` set it reports `READY=1` once subscribed, or
after 5 s of trying (it keeps trying), and a status line with the node and query counts.

Exit codes (`service.exit_codes`): 0 after a clean stop, 78 for a bad argument or configuration
(an unknown similarity, an unreadable database, a missing TLS file: restarting will not help, so
the unit lists it in `RestartPreventExitStatus=`), 1 for a crash.
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
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from broker.client import MqttClient, parse_broker_url
from mds.service import MAX_CLOCK_SKEW, MetadataService
from mds.similarity import SIMILARITIES
from mds.store import NodeStore
from service.cli import ServiceArgumentParser
from service.exit_codes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK
from service.logs import configure_logging
from service.notify import Notifier, Watchdog

log = logging.getLogger("clue-mds")

ENV_PREFIX = "CLUE_MDS_"


def _default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-.") or "host"
    return f"mds-{host}"[:64]


def build_parser() -> ServiceArgumentParser:
    """The argument parser; each option's default comes from its `CLUE_MDS_*` variable if set."""
    p = ServiceArgumentParser(
        prog="clue-mds",
        description="CLUE Edge metadata service: collects node metadata, answers helper queries.",
    )

    def option(flag: str, default: str | None, text: str, kind: Callable[[str], Any] = str) -> None:
        env = ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()
        # argparse applies `type` to a string default too, so a bad variable is refused like a bad flag.
        p.add_argument(flag, type=kind, default=os.environ.get(env, default), help=f"{text} [${env}]")

    option("--broker", "mqtt://127.0.0.1:1883", "broker URL (mqtt://, mqtts://, unix://) or socket path")
    option("--db", ":memory:", "SQLite file (default: in memory, rebuilt from retained messages)")
    option("--similarity", "cosine", f"one of {', '.join(sorted(SIMILARITIES))}")
    option("--min-class-share", "0.01", "share of its histogram a helper must hold in each asked class", float)
    option("--max-k", "32", "largest k served (1..64)", int)
    option(
        "--max-clock-skew",
        "300",
        f"s a node's metadata ts may lie ahead of this clock before it is refused (0..{MAX_CLOCK_SKEW:g})",
        float,
    )
    option("--client-id", _default_client_id(), "MQTT client id (fixed: the session key)")
    option("--shared-group", "mds", "shared-subscription group for queries (empty: none)")
    p.add_argument("--no-shared", action="store_true", help="read mds/query directly: this MdS answers every query")
    option("--session-expiry", "30", "s the broker keeps the session (and queries for it) after a disconnect", int)
    option("--inbox-size", "100000", "messages buffered for the worker (the fleet's retained state comes at once)", int)
    option("--username", None, "broker user name")
    option("--password-file", None, "file holding the broker password")
    option("--tls-ca", None, "CA certificate file")
    option("--tls-cert", None, "client certificate file")
    option("--tls-key", None, "client key file")
    option("--stats-interval", "60", "s between stats lines in the log (0: only at exit)", float)
    option("--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR")
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
    """Run `clue-mds`; return its exit code: 1 for a crash, 0 when stopped. A bad setting exits 78
    through the parser."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        connection = _check(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_level.upper(), identifier="clue-mds")
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
            max_clock_skew=args.max_clock_skew,
        )
    except ValueError as exc:
        store.close()
        parser.error(str(exc))

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(service, client, store, stop, args.stats_interval)
    except Exception:  # noqa: BLE001 - a crash is exit 1, told apart from a bad config (78)
        log.exception("clue-mds crashed")
        return EXIT_CRASH
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    service: MetadataService, client: MqttClient, store: NodeStore, stop: threading.Event, stats_interval: float
) -> int:
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
        notifier = Notifier()
        if client.wait_subscribed(5.0):
            log.info("ready: connected to the broker, serving %s", service.query_filter)
        else:
            log.warning("not connected to the broker yet; retrying in the background")
        notifier.ready(_status_line(service.stats()))
        watchdog = Watchdog(notifier, checks={"mqtt loop": lambda: client.loop_alive, "service": service.alive})
        watchdog.start()
        next_stats = time.monotonic() + stats_interval
        while not stop.wait(1.0):
            if stats_interval and time.monotonic() >= next_stats:
                stats = service.stats()
                log.info("stats %s", json.dumps(stats))
                notifier.status(_status_line(stats))
                next_stats = time.monotonic() + stats_interval
        log.info("stopping")
        watchdog.stop()
        notifier.stopping()
        return EXIT_OK
    finally:
        service.stop()
        client.stop()
        log.info("final stats %s", json.dumps(service.stats()))
        store.close()


def _status_line(stats: dict[str, Any]) -> str:
    """The one line `systemctl status` shows."""
    return f"{stats['nodes']} nodes, {stats['online']} online, {stats['queries']} queries served"


__all__ = ["build_parser", "main"]
