"""The feeder and collector of a fleet run: request batches in, predictions and events out.

Both are ordinary MQTT clients of the broker the agents use. ``Collector`` records every
prediction and event per node (a thread drains its inbox); ``Feeder`` publishes request batches
and, for lock-step pacing, waits until every node answered batch t and finished the KT it started.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from broker import topics
from broker.client import Inbound, MqttClient
from broker.errors import BusError, MessageTooLarge
from broker.wire import ArrayPayload, Event, Labels, Prediction, RequestBatch, encode

#: Events that end a knowledge transfer a node started (after ``drift``).
KT_DONE = ("help_done", "help_failed")


@dataclass(frozen=True)
class Received:
    node_id: str
    at: float
    message: Prediction | Event


class Collector:
    """Records predictions and events of every node; waits on conditions over them."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.predictions: dict[str, dict[int, Prediction]] = defaultdict(dict)
        self.events: list[Received] = []
        self.status: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        client.subscribe(topics.all_predictions(), 1)
        client.subscribe(topics.all_events(), 1)
        client.subscribe(topics.all_status(), 1)

    def start(self) -> "Collector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.client.get(timeout=0.1)
            if not isinstance(item, Inbound):
                continue
            try:
                node_id, leaf = topics.parse_node_topic(item.topic)
            except BusError:
                continue
            with self._cond:
                if leaf == "status":
                    self.status[node_id] = item.payload
                    self._cond.notify_all()
                    continue
                if item.message is None:
                    continue
                if isinstance(item.message, Prediction):
                    self.predictions[node_id][item.message.batch_id] = item.message
                elif isinstance(item.message, Event):
                    self.events.append(Received(node_id, item.received_at, item.message))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def events_of(self, node_id: str, kind: str | None = None) -> list[Event]:
        with self._cond:
            return [r.message for r in self.events if r.node_id == node_id and (kind is None or r.message.kind == kind)]

    def kt_in_progress(self, node_id: str) -> bool:
        """A drift was reported and the transfer it started has not ended yet."""
        kinds = [e.kind for e in self.events_of(node_id) if e.kind in ("drift", *KT_DONE)]
        return bool(kinds) and kinds[-1] == "drift"


class Feeder:
    """Publishes request batches; ``step`` feeds batch t to every node and waits for the answers."""

    def __init__(self, client: MqttClient, collector: Collector) -> None:
        self.client = client
        self.collector = collector

    def send(self, node_id: str, batch_id: int, x: np.ndarray, y: np.ndarray | None, y_indices: np.ndarray | None = None) -> None:
        """Batch ``batch_id`` for ``node_id``, with labels ``y`` of every sample, of those ``y_indices`` names, or none."""
        msg = RequestBatch(
            batch_id=batch_id,
            x=ArrayPayload.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            y=ArrayPayload.from_numpy(np.ascontiguousarray(y, dtype=np.int64)) if y is not None else None,
            y_indices=ArrayPayload.from_numpy(np.ascontiguousarray(y_indices, dtype=np.int64)) if y_indices is not None else None,
        )
        topic, data = topics.node_batch(node_id), encode(msg)
        # One message whenever the client and the broker take it (every agent accepts 1 MiB), not
        # 256 KiB chunks: with the shipped broker's save-after-every-change persistence each chunk
        # is one more database save, and the receiver hashes, reassembles and decodes it twice.
        try:
            self.client.publish(topic, data, 1, topic_class="batch")
        except MessageTooLarge:
            self.client.publish_blob(topic, data, 1, topic_class="batch")

    def send_labels(self, node_id: str, batch_id: int, y: np.ndarray, indices: np.ndarray | None = None) -> None:
        """Labels of samples of a batch served earlier (``indices``: which; None: all, in order)."""
        msg = Labels(
            batch_id=batch_id,
            y=ArrayPayload.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
            indices=ArrayPayload.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)) if indices is not None else None,
        )
        self.client.publish(topics.node_labels(node_id), encode(msg), 1, topic_class="labels")

    def step(
        self,
        batch_id: int,
        batches: Iterable[tuple[str, np.ndarray, np.ndarray | None] | tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]],
        *,
        timeout: float = 60.0,
        extra: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Lock step: send batch ``batch_id`` to each node, wait for every prediction and KT to finish.

        ``extra`` is one more condition to wait for (a FedAvg round adopted by every node).
        """
        nodes = []
        for node_id, x, y, *y_indices in batches:
            self.send(node_id, batch_id, x, y, *y_indices)
            nodes.append(node_id)

        def done() -> bool:
            return (
                all(batch_id in self.collector.predictions[n] for n in nodes)
                and not any(self.collector.kt_in_progress(n) for n in nodes)
                and extra()
            )

        return self.collector.wait_for(done, timeout)
