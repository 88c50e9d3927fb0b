"""What an `MqttClient` is configured with: `ClientSettings`, the `Will`, and broker URLs.

One frozen pydantic model holds every setting, with its default, its bounds and the rules that
tie settings together, so a bad value is refused when the settings are made, before anything
connects. pydantic's `ValidationError` is a `ValueError`, which is what callers catch.

>>> ClientSettings(client_id="edge-1", **parse_broker_url("mqtt://10.0.0.2")).port
1883
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from broker import topics
from broker.chunking import CHUNK_OVERHEAD, DEFAULT_CHUNK_BYTES

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class Will:
    """The last-will message, registered with the broker before connecting."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    @classmethod
    def offline(cls, node_id: str) -> "Will":
        """`node/{id}/status` = `offline`, QoS 1, retained."""
        return cls(topics.node_status(node_id), topics.STATUS_OFFLINE, 1, True)


class ClientSettings(BaseModel):
    """Every setting of an `MqttClient`; only `client_id` has no default (it is the session key:
    two processes sharing a default id would take each other's session)."""

    # Errors leave the input out: it may hold a password.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    client_id: str = Field(description="Fixed MQTT client id, the broker's session key: 1-128 characters, no whitespace.")
    name: str | None = Field(None, description="Name in logs and thread names (None: the client id).")
    host: str = Field("127.0.0.1", description="Broker host name or address (TCP).")
    port: int = Field(1883, description="Broker port (TCP).")
    unix_socket: str | None = Field(None, description="Path of the broker's unix socket; used instead of host/port.")
    session_expiry: int = Field(3600, gt=0, lt=1 << 32, description="Seconds the broker keeps the session (> 0: it must outlive a reconnect).")
    clean_start: bool = Field(False, description="Start a clean session once, then resume it on reconnects (False: always resume).")
    keepalive: int = Field(30, description="MQTT keepalive, s.")
    username: str | None = Field(None, description="MQTT user name (None: anonymous, or the certificate's CN).")
    password: SecretStr | None = Field(None, description="MQTT password; prefer password_file.")
    password_file: Path | None = Field(None, description="File holding the MQTT password (read at start).")
    tls: bool = Field(False, description="Use TLS (implied by any of tls_ca, tls_cert, tls_key).")
    tls_ca: Path | None = Field(None, description="CA certificate that signed the broker's (None: the system's CAs).")
    tls_cert: Path | None = Field(None, description="Client certificate.")
    tls_key: Path | None = Field(None, description="Client key.")
    tls_key_password_file: Path | None = Field(None, description="File holding the client key's passphrase.")
    will: Will | None = Field(None, description="Last will (None: `offline` on the status topic, if status_node_id is set).")
    status_node_id: str | None = Field(None, description="Node whose `node/{id}/status` this client owns: will `offline`, retained `online`.")
    reply_topic: str | None = Field(None, description="Where replies to requests come (None: node/{client_id}/reply if the id is a node id).")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=2 * CHUNK_OVERHEAD, description="Largest single MQTT payload sent or taken.")
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, gt=CHUNK_OVERHEAD, description="Payloads above this travel as chunks (at most max_message_bytes).")
    max_blob_bytes: int = Field(64 << 20, description="Largest chunked payload, whole (at least chunk_bytes).")
    max_transfers: int = Field(16, ge=1, description="Chunked transfers reassembled at once.")
    transfer_deadline: float = Field(60.0, description="Seconds a chunked transfer may take before it is discarded.")
    inbox_size: int = Field(1000, ge=1, description="Inbox capacity; a full inbox drops (counted).")
    max_offline_queue: int = Field(10_000, description="Most outgoing messages paho holds (QoS 1/2 wait there while disconnected; 0: no limit).")
    reconnect_min_delay: float = Field(0.5, gt=0, description="First reconnect delay, s (jittered up to +50 %).")
    reconnect_max_delay: float = Field(30.0, description="Cap of the exponential reconnect delay, s.")
    request_timeout: float = Field(10.0, description="Default seconds one request attempt waits for its reply.")
    request_retries: int = Field(2, description="Default re-sends of a request after its first attempt times out.")

    @field_validator("client_id")
    @classmethod
    def _check_client_id(cls, value: str) -> str:
        if not 1 <= len(value) <= 128 or any(c.isspace() for c in value):
            raise ValueError("client_id must be 1-128 characters without whitespace")
        return value

    @field_validator("status_node_id")
    @classmethod
    def _check_status_node_id(cls, value: str | None) -> str | None:
        return None if value is None else topics.validate_node_id(value)

    @field_validator("will")
    @classmethod
    def _check_will(cls, value: Will | None) -> Will | None:
        if value is not None:
            topics.validate_publish_topic(value.topic)
        return value

    @field_validator("reply_topic")
    @classmethod
    def _check_reply_topic(cls, value: str | None) -> str | None:
        if value is not None and not topics.is_reply_topic(value):
            raise ValueError(f"reply_topic {value!r} is not node/{{id}}/reply or relay/{{id}}/reply")
        return value

    @model_validator(mode="after")
    def _check_together(self) -> "ClientSettings":
        if self.chunk_bytes > self.max_message_bytes:
            raise ValueError(f"chunk_bytes must be in ({CHUNK_OVERHEAD}, max_message_bytes]")
        if self.max_blob_bytes < self.chunk_bytes:
            raise ValueError("max_blob_bytes must be >= chunk_bytes")
        if self.reconnect_min_delay > self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    @property
    def uses_tls(self) -> bool:
        """TLS asked for, or implied by a CA, certificate or key."""
        return self.tls or any(x is not None for x in (self.tls_ca, self.tls_cert, self.tls_key))


def parse_broker_url(url: str) -> dict[str, Any]:
    """`mqtt://host:port`, `mqtts://host:port`, `tcp://…`, `unix:///path` -> client keyword args."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"no socket path in {url!r}")
        return {"unix_socket": path}
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported broker URL scheme in {url!r} (mqtt, mqtts, unix)")
    tls = scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    out: dict[str, Any] = {"host": parts.hostname, "port": port}
    if tls:
        out["tls"] = True
    return out
