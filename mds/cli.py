"""`clue-mds`: run the metadata service until SIGTERM or SIGINT.

    clue-mds --broker mqtt://127.0.0.1:1883 --db /var/lib/clue-mds/mds.db --similarity cosine

Settings (`service.settings`): a TOML file (`--config`), then `CLUE_MDS_*` environment variables
(`--max-k` <- `CLUE_MDS_MAX_K`), then flags; `clue-mds --help` lists them. `--broker` takes
`mqtt://host:port`, `mqtts://host:port`, `unix:///path` or a bare socket path. The runner
(`service.runner`) logs to stderr, or to the journal under systemd; with `NOTIFY_SOCKET` set it
reports `READY=1` once subscribed, or after 5 s of trying (it keeps trying), and a status line
with the node and query counts.

Exit codes (`service.exit_codes`): 0 after a clean stop, 78 for a bad setting (an unknown
similarity, an unreadable database, a missing TLS file: restarting will not help, so the unit
lists it in `RestartPreventExitStatus=`), 1 for a crash.
"""

from __future__ import annotations

import logging
import re
import socket
import sqlite3
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from broker.client import MqttClient
from mds.service import MAX_CLOCK_SKEW, MAX_K, MetadataService
from mds.similarity import SIMILARITIES
from mds.store import NodeStore
from service.metrics import MetricsSettings, metrics_server
from service.runner import WorkerDaemon, serve
from service.settings import BrokerSettings, ConfigError, DaemonSettings

log = logging.getLogger("clue-mds")


def _default_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-.") or "host"
    return f"mds-{host}"[:64]


class MdsSettings(DaemonSettings, BrokerSettings, MetricsSettings):
    """`clue-mds` settings."""

    model_config = SettingsConfigDict(env_prefix="CLUE_MDS_")

    program: ClassVar[str] = "clue-mds"
    description: ClassVar[str] = "CLUE Edge metadata service: collects node metadata, answers helper queries."

    db: str = Field(":memory:", description="SQLite file (default: in memory, rebuilt from retained messages)")
    similarity: str = Field("cosine", description=f"one of {', '.join(sorted(SIMILARITIES))}")
    min_class_share: float = Field(
        0.01, ge=0.0, le=1.0, description="share of its histogram a helper must hold in each asked class"
    )
    max_k: int = Field(32, ge=1, le=MAX_K, description=f"largest k served (1..{MAX_K})")
    max_clock_skew: float = Field(
        300.0,
        ge=0.0,
        le=MAX_CLOCK_SKEW,
        description=f"s a node's metadata ts may lie ahead of this clock before it is refused (0..{MAX_CLOCK_SKEW:g})",
    )
    client_id: str = Field(default_factory=_default_client_id, description="MQTT client id (fixed: the session key)")
    shared_group: str = Field("mds", description="shared-subscription group for queries (empty: none)")
    no_shared: bool = Field(False, description="read mds/query directly: this MdS answers every query")
    # The client's settings bound these two (`broker.client.ClientSettings`): refused when it is made.
    session_expiry: int = Field(30, description="s the broker keeps the session (and queries for it) after a disconnect")
    inbox_size: int = Field(
        100_000, description="messages buffered for the worker (the fleet's retained state comes at once)"
    )

    @field_validator("similarity")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SIMILARITIES:
            raise ValueError(f"must be one of {', '.join(sorted(SIMILARITIES))}, got {value!r}")
        return value


def build(settings: MdsSettings) -> WorkerDaemon:
    """The MdS of `settings`: its store, client and service. ConfigError for a store that does not open."""
    try:
        store = NodeStore(settings.db)
    except (sqlite3.Error, OSError, ValueError) as exc:
        raise ConfigError(f"db: cannot open {settings.db}: {exc}") from exc
    log.info("store %s: %d nodes (%d online)", store.path, store.count(), store.count(online=True))
    try:
        client = MqttClient.from_url(
            settings.broker,
            client_id=settings.client_id,
            session_expiry=settings.session_expiry,
            clean_start=True,
            inbox_size=settings.inbox_size,
            name="clue-mds",
            **settings.client_kwargs(),
        )
        service = MetadataService(
            client,
            store,
            similarity=settings.similarity,
            min_class_share=settings.min_class_share,
            shared_group=None if settings.no_shared or not settings.shared_group else settings.shared_group,
            max_k=settings.max_k,
            max_clock_skew=settings.max_clock_skew,
        )
    except ValueError:
        store.close()
        raise
    return WorkerDaemon(
        client, service, status=lambda: _status_line(service.stats()), close=store.close, metrics=metrics_server(service.metrics.registry, settings)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `clue-mds`; return its exit code (`service.exit_codes`)."""
    return serve(MdsSettings, build, argv)


def _status_line(stats: dict[str, Any]) -> str:
    """The one line `systemctl status` shows."""
    return f"{stats['nodes']} nodes, {stats['online']} online, {stats['queries']} queries served"


__all__ = ["MdsSettings", "build", "main"]
