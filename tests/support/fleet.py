"""A fleet of real daemons (``clue-mds``, ``clue-relay``, ``clue-agent``) on a broker of the test's own.

The ``fleet`` fixture (``tests/conftest.py``) hands a test a :class:`Fleet`; the helpers below
drive its agents as an operator or a feeder would: wait for them to come online, patch their
config with ``mosquitto_pub``, feed them Gaussian clusters, wait until the MdS offers a node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.subscribe as subscribe

from broker import topics
from broker.client import ClientSettings, Inbound, MqttClient
from broker.errors import RemoteError, RequestTimeout
from broker.launcher import PrivateMosquitto
from broker.wire import ConfigAck, HelpQuery
from edge_sim.collector import Collector, Feeder
from edge_sim.processes import Child, spawn, spawn_agent, spawn_mds
from support import wait_until


class Clusters:
    """Gaussian clusters in 784 dimensions, one per class: learnable in a few batches."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.normal(size=(10, 784)).astype(np.float32)

    def batch(self, classes, n=100):
        y = self.rng.choice(np.asarray(classes), size=n)
        return self.centres[y] + 1.5 * self.rng.normal(size=(n, 784)).astype(np.float32), y


def learner_settings(**overrides: Any) -> dict[str, Any]:
    """Learner settings that drift and discard quickly (the fleet's agents' default)."""
    base: dict[str, Any] = {
        "discard": {"type": "static", "n_batches": 4},
        "drift": {"type": "rolling_error", "window": 2, "margin": 0.1, "baseline_window": 4},
        "help_cooldown": 100,
    }
    base.update(overrides)
    return base


class Fleet:
    """Start an MdS, a relay, agents and observer clients on demand; :meth:`close` stops the daemons
    (and prints the log of any that raised)."""

    def __init__(self, broker: PrivateMosquitto, make_client: Callable[..., MqttClient], tmp_path: Path) -> None:
        self.broker = broker
        self.broker_url = f"mqtt://{broker.host}:{broker.port}"
        self.state = tmp_path / "state"
        self.logs = tmp_path / "logs"
        self.children: list[Child] = []
        #: The last MdS started (its log says what it refused).
        self.mds_child: Child | None = None
        self._tmp_path = tmp_path
        self._make_client = make_client

    def mds(self, *args: str) -> Child:
        """An MdS; `args` are more of its flags (``--metrics-port``, …)."""
        child = spawn_mds(self.broker_url, self._tmp_path / "mds.db", self.logs, extra_args=list(args))
        self.children.append(child)
        self.mds_child = child
        return child

    def relay(self, *args: str) -> Child:
        """A relay; `args` are more of its flags (``--metrics-port``, …)."""
        child = spawn("relay", [sys.executable, "-m", "broker.relay", "--broker", self.broker_url, *args], self.logs)
        self.children.append(child)
        return child

    def agent(self, node_id: str, *, learner: dict[str, Any] | None = None, daemon: dict[str, Any] | None = None, **settings: Any) -> Child:
        merged = {"learner": learner or learner_settings(), "daemon": {"meta_interval": 0.0, "kt_timeout": 3.0, **(daemon or {})}}
        merged.update(settings)
        child = spawn_agent(node_id, self.broker_url, self.state, self.logs, settings=merged)
        self.children.append(child)
        return child

    def client(self, **settings: Any) -> MqttClient:
        settings.setdefault("client_id", f"observer-{os.getpid()}-{time.monotonic_ns()}")
        client = self._make_client(self.broker, **settings)
        assert client.wait_connected(10)
        return client

    def observer(self) -> tuple[Feeder, Collector]:
        client = self.client()
        collector = Collector(client).start()
        client.wait_subscribed(10)
        return Feeder(client, collector), collector

    def wait_offered(
        self, nodes: Iterable[str], *, arch_id: str, lineage: str, classes: Sequence[int] = (8, 9), num_classes: int = 10, timeout: float = 30.0
    ) -> list[str]:
        """Ask the MdS for helpers with ``classes`` until its answer names every one of ``nodes``
        (it has read their retained metadata and online status); the node ids it named."""
        wanted = set(nodes)
        asker = self.client()
        query = HelpQuery(node_id="probe", arch_id=arch_id, lineage=lineage, classes=list(classes), hist=[1.0] * num_classes, k=32)
        last: list[str] = []

        def offered() -> list[str] | None:
            nonlocal last
            try:
                reply = asker.request(topics.mds_query(), query, timeout=1.0, retries=0)
            except (RequestTimeout, RemoteError):
                return None
            last = [c.node_id for c in reply.candidates]
            return last if wanted <= set(last) else None

        return wait_until(offered, timeout, what=lambda: f"the MdS to offer {sorted(wanted)} (last answer {last})", interval=0.05)

    def close(self) -> None:
        for child in self.children:
            child.terminate(10)
        for child in self.children:
            text = child.log_text()
            if "Traceback" in text:
                print(f"--- {child.name} log ---\n{text[-4000:]}")


def wait_status_online(broker: PrivateMosquitto, node: str, child: Child, timeout: float = 60.0, **tls: object) -> None:
    """Until the node's retained status says online (it publishes it once connected); ``tls``:
    the reading identity's ``ClientSettings`` TLS fields on a broker that wants them."""
    client = MqttClient(ClientSettings(client_id=f"probe-{node}-{time.monotonic_ns()}", host=broker.host, port=broker.port, **tls))
    client.subscribe(topics.node_status(node), 1)
    client.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert child.alive(), child.log_text()[-3000:]
            item = client.get(timeout=0.2)
            if isinstance(item, Inbound) and item.payload == topics.STATUS_ONLINE:
                return
        raise AssertionError(f"{node} never came online:\n{child.log_text()[-3000:]}")
    finally:
        client.stop()


def wait_online(fleet: Fleet, nodes: Iterable[str], timeout: float = 60) -> None:
    """Every node's retained status says online (they published it once connected)."""
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            msg = subscribe.simple(
                topics.node_status(node), hostname=fleet.broker.host, port=fleet.broker.port, retained=True,
            )
            if msg.payload == b"online":
                break
            assert time.monotonic() < deadline, f"{node} never came online"


def patch_and_ack(fleet: Fleet, client: MqttClient, node: str, payload: str) -> ConfigAck:
    """Publish ``payload`` with mosquitto_pub, as an operator would, and return the agent's ack."""
    subprocess.run(
        ["mosquitto_pub", "-h", fleet.broker.host, "-p", str(fleet.broker.port), "-q", "1",
         "-t", topics.node_config(node), "-m", payload],
        check=True, timeout=10,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        item = client.get(timeout=0.2)
        if isinstance(getattr(item, "message", None), ConfigAck):
            return item.message
    raise AssertionError(f"no config ack for {payload!r}")
