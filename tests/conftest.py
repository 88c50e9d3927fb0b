"""Shared fixtures: a real Mosquitto on a free loopback port, unique ids per test, client factory.

- `mosquitto` (session): one `PrivateMosquitto` for every test that only needs *a* broker.
- `fresh_mosquitto` (function): a broker of the test's own, for tests that kill or restart it.
- `unique_id`: a node-id-safe id derived from the test's name (plus a random suffix), so tests
  sharing the session broker never see each other's topics.
- `make_client(broker, **settings)`: an `MqttClient` with fast reconnects, stopped at teardown.

Tests that talk to a broker are marked `@pytest.mark.integration` and carry a
`@pytest.mark.timeout(...)` so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest

from broker.client import MqttClient
from broker.launcher import PrivateMosquitto


def _mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or os.access("/usr/sbin/mosquitto", os.X_OK)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[PrivateMosquitto]:
    """One private Mosquitto for the whole session (do not kill it: use `fresh_mosquitto`)."""
    if not _mosquitto_available():
        pytest.skip("mosquitto not installed (Debian package 'mosquitto')")
    with PrivateMosquitto(unix_socket=True) as broker:
        yield broker


@pytest.fixture
def fresh_mosquitto() -> Iterator[PrivateMosquitto]:
    """A private Mosquitto for one test: free to `kill()` and `start()` again."""
    if not _mosquitto_available():
        pytest.skip("mosquitto not installed (Debian package 'mosquitto')")
    with PrivateMosquitto() as broker:
        yield broker


def make_unique_id(name: str) -> str:
    """A node id (`[A-Za-z0-9_.-]{1,64}`) from a test name, unique per call."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:48] or "t"
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def unique_id(request: pytest.FixtureRequest) -> str:
    """A node-id-safe id derived from this test's name; topics built from it are the test's own."""
    return make_unique_id(request.node.name)


@pytest.fixture
def topic_prefix(unique_id: str) -> str:
    """A free-form topic prefix of this test's own (for raw, non-CLUE topics)."""
    return f"test/{unique_id}"


@pytest.fixture
def make_client() -> Iterator[Callable[..., MqttClient]]:
    """Factory: `make_client(broker, client_id=..., start=True, **settings)`; all stopped at teardown."""
    clients: list[MqttClient] = []

    def factory(broker: PrivateMosquitto, *, start: bool = True, **settings: object) -> MqttClient:
        settings.setdefault("reconnect_min_delay", 0.05)
        settings.setdefault("reconnect_max_delay", 0.5)
        if "unix_socket" not in settings:
            settings.setdefault("host", broker.host)
            settings.setdefault("port", broker.port)
        client = MqttClient(**settings)  # type: ignore[arg-type]
        clients.append(client)
        if start:
            client.start()
        return client

    yield factory
    for client in reversed(clients):
        client.stop()
