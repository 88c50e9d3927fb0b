"""Prometheus metrics of every daemon: the settings of the endpoint, its HTTP server, and the bus
client's counters as metrics.

Each daemon builds its own `prometheus_client.CollectorRegistry` (never the library's global one,
so several daemons in one process do not collide), registers its metrics in it, and serves it with
a `MetricsServer` when `metrics_port` is set. The endpoint is off by default and binds 127.0.0.1
when on; TLS (and client certificates) and HTTP basic auth guard it when it must be reachable
from a Prometheus on another host.

The server is `prometheus_client`'s own WSGI application (`make_wsgi_app`) on its threading
server class. The library's `start_http_server` takes a certificate but has no hook for basic
auth (its `basic_auth_handler` is the push client's), and wrapping its application after it has
started would leave a moment where the endpoint answers without asking; so this module assembles
the same parts with the authentication in place before the socket is opened.

>>> from prometheus_client import CollectorRegistry, Counter
>>> registry = CollectorRegistry()
>>> served = Counter("demo_served", "batches served", registry=registry)
>>> server = MetricsServer(registry, MetricsSettings(metrics_port=free_port())).start()
>>> import urllib.request
>>> b"demo_served_total 0.0" in urllib.request.urlopen(server.url).read()
True
>>> server.stop()
"""

from __future__ import annotations

import base64
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.settings import ConfigError, credential_path

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsSettings(BaseModel):
    """Where a daemon serves its Prometheus metrics: the same fields, at the top level, in every
    daemon's settings (``--metrics-port``, ``CLUE_MDS_METRICS_PORT``, ``metrics_port`` in TOML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics_port: int | None = Field(None, ge=1, le=65535, description="TCP port of the Prometheus /metrics endpoint (absent: no endpoint)")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds (0.0.0.0 or :: for every interface)")
    metrics_tls_cert: str | None = Field(None, description="certificate of the metrics endpoint: serve HTTPS (credential name or path)")
    metrics_tls_key: str | None = Field(None, description="key of metrics_tls_cert (credential name or path)")
    metrics_client_ca: str | None = Field(
        None, description="CA file: a scraper must present a client certificate it signed (needs metrics_tls_cert)"
    )
    metrics_username: str | None = Field(None, description="HTTP basic-auth user a scraper must give (needs metrics_password_file)")
    metrics_password_file: str | None = Field(None, description="file holding the basic-auth password (credential name or path)")

    @field_validator("metrics_tls_cert", "metrics_tls_key", "metrics_client_ca", "metrics_password_file")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None:
            credential_path(value)
        return value

    @model_validator(mode="after")
    def _pairs(self) -> "MetricsSettings":
        if (self.metrics_tls_cert is None) != (self.metrics_tls_key is None):
            raise ValueError("metrics_tls_cert and metrics_tls_key go together")
        if self.metrics_client_ca is not None and self.metrics_tls_cert is None:
            raise ValueError("metrics_client_ca needs metrics_tls_cert: client certificates are checked over TLS")
        if (self.metrics_username is None) != (self.metrics_password_file is None):
            raise ValueError("metrics_username and metrics_password_file go together")
        return self


class _QuietHandler(WSGIRequestHandler):
    """No line per scrape on stderr (the journal would get one every scrape interval)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _basic_auth(app: WsgiApp, username: str, password: str) -> WsgiApp:
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="clue metrics"'), ("Content-Type", "text/plain")])
            return [b"authentication required\n"]
        return app(environ, start_response)

    return guarded


class MetricsServer:
    """The ``/metrics`` endpoint of one registry, on its own thread (module docstring).

    `start()` raises `ConfigError` when the port cannot be bound or the TLS material does not load:
    the daemon then exits 78, as for any setting that cannot be used.
    """

    def __init__(self, registry: CollectorRegistry, settings: MetricsSettings) -> None:
        if settings.metrics_port is None:
            raise ValueError("metrics_port is not set: there is no endpoint to serve")
        self.registry = registry
        self.settings = settings
        self._httpd: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        s = self.settings
        scheme = "https" if s.metrics_tls_cert else "http"
        host = f"[{s.metrics_host}]" if ":" in s.metrics_host else s.metrics_host
        return f"{scheme}://{host}:{self.port}/metrics"

    @property
    def port(self) -> int:
        return self._httpd.server_port if self._httpd is not None else int(self.settings.metrics_port or 0)

    def start(self) -> "MetricsServer":
        s = self.settings
        app: WsgiApp = make_wsgi_app(self.registry)
        if s.metrics_username is not None and s.metrics_password_file is not None:
            password = credential_path(s.metrics_password_file).read_text().strip()
            if not password:
                raise ConfigError(f"metrics_password_file {s.metrics_password_file} is empty")
            app = _basic_auth(app, s.metrics_username, password)
        family = socket.getaddrinfo(s.metrics_host, s.metrics_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            httpd = make_server(s.metrics_host, int(s.metrics_port or 0), app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"metrics endpoint: cannot listen on {s.metrics_host}:{s.metrics_port}: {exc}") from exc
        if s.metrics_tls_cert is not None and s.metrics_tls_key is not None:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(credential_path(s.metrics_tls_cert), credential_path(s.metrics_tls_key))
                if s.metrics_client_ca is not None:
                    context.load_verify_locations(credential_path(s.metrics_client_ca))
                    context.verify_mode = ssl.CERT_REQUIRED
            except (OSError, ssl.SSLError) as exc:
                httpd.server_close()
                raise ConfigError(f"metrics endpoint: cannot load its TLS material: {exc}") from exc
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("Prometheus metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def metrics_server(registry: CollectorRegistry, settings: MetricsSettings) -> MetricsServer | None:
    """The endpoint `settings` ask for, not started yet; None when `metrics_port` is unset (off)."""
    return MetricsServer(registry, settings) if settings.metrics_port is not None else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for tests and examples)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class BusClient(Protocol):
    """What `BusClientCollector` reads of a client (`broker.client.MqttClient`)."""

    @property
    def connected(self) -> bool: ...

    @property
    def inbox(self) -> Any: ...

    def stats(self) -> Mapping[str, int]: ...

    def byte_counts(self) -> Mapping[str, Mapping[str, int]]: ...


#: The client's counters of messages it refused before a handler saw them, by reason.
_REFUSED = {"decode_errors": "undecodable", "type_refused": "wrong_type", "too_large": "too_large", "chunk_errors": "bad_chunk"}


class BusClientCollector(Collector):
    """The MQTT client's own counters, read at scrape time: connection state, reconnects, inbox
    depth and drops, refused messages, payload bytes per topic class. Every daemon registers one.

    Metric names start with `prefix` (``clue_agent``, ``clue_mds``, …), so one Prometheus can tell
    the daemons of a host apart without a label.
    """

    def __init__(self, client: BusClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        stats = self.client.stats()
        yield GaugeMetricFamily(f"{p}_mqtt_connected", "1 while connected to the broker", value=1.0 if self.client.connected else 0.0)
        yield CounterMetricFamily(f"{p}_mqtt_reconnects", "connections accepted by the broker after the first", value=max(stats["connects"] - 1, 0))
        yield CounterMetricFamily(f"{p}_mqtt_disconnects", "connections lost or closed", value=stats["disconnects"])
        yield CounterMetricFamily(f"{p}_mqtt_connect_failures", "connection attempts without a CONNACK or refused by it",
                                  value=stats["connect_failures"] + stats["connect_refused"])
        yield GaugeMetricFamily(f"{p}_mqtt_inbox_messages", "messages waiting for the worker", value=self.client.inbox.qsize())
        yield CounterMetricFamily(f"{p}_mqtt_inbox_dropped", "messages dropped because the inbox was full", value=stats["inbox_dropped"])
        refused = CounterMetricFamily(f"{p}_mqtt_messages_refused", "messages the client refused before any handler, by reason", labels=["reason"])
        for key, reason in _REFUSED.items():
            refused.add_metric([reason], stats[key])
        yield refused
        payload = CounterMetricFamily(f"{p}_mqtt_payload_bytes", "MQTT payload bytes by topic class and direction", labels=["topic_class", "direction"])
        for cls, counts in sorted(self.client.byte_counts().items()):
            payload.add_metric([cls, "in"], counts["in"])
            payload.add_metric([cls, "out"], counts["out"])
        yield payload


__all__ = ["BusClient", "BusClientCollector", "MetricsServer", "MetricsSettings", "free_port", "metrics_server"]
