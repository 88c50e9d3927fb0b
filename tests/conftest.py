"""Shared fixtures: a real Mosquitto on a free loopback port, unique ids per test, client factory.

- `mosquitto` (session): one `PrivateMosquitto` for every test that only needs *a* broker.
- `fresh_mosquitto` (function): a broker of the test's own, for tests that kill or restart it.
- `unique_id`: a node-id-safe id derived from the test's name (plus a random suffix), so tests
  sharing the session broker never see each other's topics.
- `make_client(broker, **settings)`: an `MqttClient` with fast reconnects, stopped at teardown.
- `fleet`: real daemons (MdS, relay, agents) on a `fresh_mosquitto`, stopped at teardown
  (`support.fleet.Fleet`).

Helpers the tests import (`wait_until`, `requires_mosquitto`, ...) are in `tests/support/`.

Tests that talk to a broker are marked `@pytest.mark.integration` and carry a
`@pytest.mark.timeout(...)` so a hang fails instead of stalling CI.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from broker.client import ClientSettings, MqttClient
from broker.launcher import PrivateMosquitto
from support import MOSQUITTO_MISSING, mosquitto_available

if TYPE_CHECKING:
    from support.fleet import Fleet


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[PrivateMosquitto]:
    """One private Mosquitto for the whole session (do not kill it: use `fresh_mosquitto`)."""
    if not mosquitto_available():
        pytest.skip(MOSQUITTO_MISSING)
    with PrivateMosquitto(unix_socket=True) as broker:
        yield broker


@pytest.fixture
def fresh_mosquitto() -> Iterator[PrivateMosquitto]:
    """A private Mosquitto for one test: free to `kill()` and `start()` again."""
    if not mosquitto_available():
        pytest.skip(MOSQUITTO_MISSING)
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
        client = MqttClient(ClientSettings(**settings))  # type: ignore[arg-type]
        clients.append(client)
        if start:
            client.start()
        return client

    yield factory
    for client in reversed(clients):
        client.stop()


@pytest.fixture
def fleet(fresh_mosquitto: PrivateMosquitto, make_client: Callable[..., MqttClient], tmp_path: Path) -> Iterator[Fleet]:
    """Start an MdS, a relay, agents on demand (`support.fleet.Fleet`); stop them at teardown."""
    from support.fleet import Fleet  # numpy, paho and the simulator: only for the tests that run a fleet

    fleet = Fleet(fresh_mosquitto, make_client, tmp_path)
    yield fleet
    fleet.close()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test: tiny models run faster so, and far faster when other jobs
    share the cores (100,000 tiny forward passes take 10 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
