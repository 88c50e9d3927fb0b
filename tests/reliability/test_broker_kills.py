"""Mosquitto SIGKILLed and restarted N times (default 100) under a running fleet.

Three real ``clue-agent`` processes and a real ``clue-mds``; a feeder publishes QoS 1 request
batches at a steady rate while the broker is killed at random moments and started again on the
same port and persistence directory. Counted: batches published, acknowledged (PUBACK) and
answered (a prediction arrived at a persistent-session collector).

What "lost" can honestly mean: Mosquitto acknowledges a QoS 1 message from memory and writes its
database on the next pass of its main loop (``autosave_on_changes true``, ``autosave_interval 1``:
after every change, the launcher's default). A SIGKILL between the PUBACK and that write loses the
message, and no setting closes that gap. The database's mtime after each kill is when its last
save finished, so every batch acknowledged before it was on disk: those must all be answered. A
batch acknowledged after it (within milliseconds of a kill) is counted apart, with how many of
those were lost.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from broker import topics
from broker.wire import ArrayPayload, RequestBatch
from edge_sim.collector import Collector
from edge_sim.processes import spawn_agent, spawn_mds

from .conftest import TINY, Traffic, record, size

KILLS = size("BROKER_KILLS", 100)
RATE = 4.0  # batches per second per node
#: Delay the feeder's acker thread may add to a recorded PUBACK time (it polls every 2 ms).
ACK_LAG = 0.01
NODES = ("helper", "peer", "target")

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def _classes(node: str, t: int) -> tuple[int, ...]:
    if node == "helper":
        return (0, 1, 2, 3, 4)
    if node == "peer":
        return (0, 1, 2)
    # Classes 3-4 come and go every 12 batches: a drift, and a knowledge transfer, each time.
    return (0, 1, 2, 3, 4) if (t // 12) % 2 else (0, 1, 2)


class QoS1Feeder:
    """Publishes batches at ``RATE`` per node; a second thread timestamps each PUBACK."""

    def __init__(self, client) -> None:
        self.client = client
        self.sent: dict[tuple[str, int], float] = {}
        self.acked: dict[tuple[str, int], float] = {}
        self._pending: list[tuple[tuple[str, int], object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._feed, daemon=True), threading.Thread(target=self._ack, daemon=True)]

    def start(self) -> "QoS1Feeder":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join(10)

    def _feed(self) -> None:
        data = {node: Traffic(seed) for seed, node in enumerate(NODES)}
        t = 0
        while not self._stop.is_set():
            for node in NODES:
                x, y = data[node].batch(_classes(node, t))
                msg = RequestBatch(batch_id=t, x=ArrayPayload.from_numpy(x), y=ArrayPayload.from_numpy(y))
                handle = self.client.publish_message(topics.node_batch(node), msg, qos=1)
                with self._lock:
                    self.sent[(node, t)] = time.time()
                    self._pending.append(((node, t), handle))
            t += 1
            self._stop.wait(1.0 / RATE)

    def _ack(self) -> None:
        while True:
            with self._lock:
                pending = list(self._pending)
            now = time.time()
            done = [key for key, handle in pending if all(info.is_published() for info in handle.infos)]
            with self._lock:
                for key in done:
                    self.acked[key] = now
                self._pending = [(k, h) for k, h in self._pending if k not in self.acked]
            if self._stop.is_set() and not pending:
                return
            time.sleep(0.002)

    def unacked(self) -> int:
        with self._lock:
            return len(self._pending)


@pytest.mark.timeout(300 + 8 * KILLS)
def test_broker_sigkilled_and_restarted_under_a_running_fleet(fresh_mosquitto, make_client, tmp_path):
    broker = fresh_mosquitto
    assert broker.persistence and broker.autosave_on_changes and broker.autosave_interval == 1
    url = f"mqtt://{broker.host}:{broker.port}"
    logs, state = tmp_path / "logs", tmp_path / "state"
    learner = {
        "drift": {"type": "rolling_error", "window": 2, "margin": 0.1, "baseline_window": 4},
        "discard": {"type": "static", "n_batches": 4},
        "help_cooldown": 6,
        "k": 3,
    }
    children = [spawn_mds(url, tmp_path / "mds.db", logs)]
    children += [
        spawn_agent(node, url, state, logs, settings={**TINY, "learner": learner, "daemon": {"meta_interval": 0.0, "kt_timeout": 3.0}})
        for node in NODES
    ]
    try:
        observer = make_client(broker, client_id="rel-collector")  # a persistent session (1 h expiry)
        collector = Collector(observer).start()
        assert observer.wait_subscribed(10)
        online = lambda: all(collector.status.get(n) == topics.STATUS_ONLINE for n in NODES)  # noqa: E731
        assert collector.wait_for(online, 180), "agents never came online"
        feeder = QoS1Feeder(make_client(broker, client_id="rel-feeder")).start()

        rng = random.Random(KILLS)
        db = broker.data_dir / "mosquitto.db"
        windows: list[tuple[float, float]] = []
        for _ in range(KILLS):
            # Long enough for the agents' reconnect back-off (0.5 s at first) to get them back.
            time.sleep(rng.uniform(1.0, 2.0))
            broker.kill()
            killed_at = time.time()
            saved_at = db.stat().st_mtime_ns / 1e9 if db.exists() else 0.0
            windows.append((saved_at, killed_at + ACK_LAG))
            broker.start()
        time.sleep(2.0)  # a last stretch without kills
        feeder.stop()
        assert collector.wait_for(lambda: feeder.unacked() == 0, 60), f"{feeder.unacked()} batches never acknowledged"

        def answered(key: tuple[str, int]) -> bool:
            return key[1] in collector.predictions[key[0]]

        def in_window(t_ack: float) -> bool:
            return any(saved < t_ack <= killed for saved, killed in windows)

        durable = [k for k, t in feeder.acked.items() if not in_window(t)]
        risky = [k for k, t in feeder.acked.items() if in_window(t)]
        collector.wait_for(lambda: all(answered(k) for k in durable) and not collector.kt_in_progress("target"), 90)
        lost = sorted(k for k in durable if not answered(k))
        lost_risky = sorted(k for k in risky if not answered(k))
        received = sum(answered(k) for k in feeder.acked)
        kinds = [e.kind for e in collector.events_of("target")]
        kt = {kind: kinds.count(kind) for kind in ("drift", "help_requested", "helper_installed", "kt_failed", "help_failed")}
        alive = {c.name: c.alive() for c in children}
        counts = {
            "broker_kills": KILLS, "sent": len(feeder.sent), "acked": len(feeder.acked), "received": received,
            "lost": len(lost), "acked_within_ms_of_a_kill": len(risky), "lost_of_those": len(lost_risky),
            "lost_batches": lost[:20], "kt": kt, "processes_alive": alive,
            "save_to_kill_ms_p50": float(np.median([1000 * (k - ACK_LAG - s) for s, k in windows])),
        }
        record(
            "broker-kills",
            f"broker kills: {KILLS}, acked sent: {len(feeder.acked)}, received: {received}, lost: {len(lost)} "
            f"(+{len(lost_risky)} of {len(risky)} acked in the last ms before a kill, before its save); "
            f"KT: {kt['drift']} started, {kt['helper_installed']} installed, {kt['kt_failed']} failed tries, "
            f"{kt['help_failed']} given up; agents alive: {sum(alive[n] for n in NODES)}/{len(NODES)}",
            counts,
        )
        assert len(feeder.acked) == len(feeder.sent)
        assert not lost, f"acknowledged and persisted, never answered: {lost[:20]}"
        assert all(alive.values()), {c.name: c.log_text()[-2000:] for c in children if not c.alive()}
        assert kt["drift"] >= 1 and kt["helper_installed"] >= 1, kt
        assert not collector.kt_in_progress("target"), "a knowledge transfer never ended"
        assert collector.status.get("target") == topics.STATUS_ONLINE
    finally:
        for child in children:
            child.terminate(10)
        for child in children:
            if "Traceback" in child.log_text():
                print(f"--- {child.name} log ---\n{child.log_text()[-3000:]}")
