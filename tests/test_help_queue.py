"""A second drift while a transfer is under way is served after it, never dropped (issue 8/13).

The learner starts its cooldown for the classes of every request it makes; a daemon that dropped
the request because another transfer was in progress left those classes without a helper until
the cooldown ran out, and installed the first helper against the second request's baseline.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from broker import topics
from broker.client import Responder
from broker.wire import KtBlob, NodeMeta
from support.fleet import Clusters, learner_settings
from support.peers import peer_for_blobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _slow_helper(fleet, node_id, ids, peer, delay):
    """A real peer that knows classes 8 and 9 and answers each KT request after ``delay`` s."""
    client = fleet.client(client_id=node_id, status_node_id=node_id)
    client.subscribe(topics.node_kt(node_id), 1)
    assert client.wait_subscribed(10)
    client.set_retained(topics.node_meta(node_id), NodeMeta(node_id=node_id, hist=[0.0] * 8 + [50.0, 50.0], **ids))
    asked = []

    def answer(request, item):
        asked.append(tuple(request.classes))
        time.sleep(delay)
        return KtBlob(corr=request.corr, blob=peer.kt_blob(request.classes, request.z, request.value_codec))

    responder = Responder(client, answer)
    stop = threading.Event()

    def run():
        while not stop.is_set():
            item = client.get(timeout=0.1)
            if getattr(item, "message", None) is not None and item.message.is_request:
                responder.handle(item)

    threading.Thread(target=run, daemon=True).start()
    return asked, stop


@pytest.mark.timeout(240)
def test_a_drift_during_a_transfer_is_queued_and_served_after_it(fleet):
    from agent.daemon import AgentDaemon
    from agent.settings import load_settings

    fleet.mds()
    drift = {"type": "novelty", "warmup_samples": 300, "min_count": 5}
    settings = load_settings(
        node_id="target", broker=fleet.broker_url, state_dir=str(fleet.state),
        learner=learner_settings(drift=drift, discard={"type": "static", "n_batches": 50}),
        daemon={"meta_interval": 0.0, "kt_timeout": 20.0},
    )
    target = AgentDaemon(settings)
    target.start()
    try:
        assert target.wait_ready(20)
        feeder, collector = fleet.observer()
        data = Clusters(12)
        for t in range(5):
            assert feeder.step(t, [("target", *data.batch(range(8)))])
        peer = peer_for_blobs(target.learner, data)
        for _ in range(15):  # a helper that knows classes 8 and 9 well
            peer.process_batch(*(torch.from_numpy(a) for a in data.batch(range(10))))
        ids = {"arch_id": target.learner.arch_id, "lineage": target.learner.lineage}
        asked, stop = _slow_helper(fleet, "slow-helper", ids, peer, delay=2.0)
        fleet.wait_offered(["slow-helper"], **ids)  # the MdS has the helper's retained meta and status
        # Class 8 appears: a transfer starts and waits on the slow helper. Class 9 appears in the
        # very next batch, while that transfer is still under way.
        feeder.send("target", 5, *data.batch(list(range(8)) + [8] * 3))
        assert collector.wait_for(lambda: collector.events_of("target", "help_requested"), 30)
        feeder.send("target", 6, *data.batch(list(range(8)) + [8, 9, 9, 9]))
        assert collector.wait_for(lambda: 6 in collector.predictions["target"], 30)
        installed = lambda: collector.events_of("target", "helper_installed")  # noqa: E731
        assert collector.wait_for(lambda: len(installed()) == 2, 60), [e.kind for e in collector.events_of("target")]
        assert [tuple(e.detail["classes"]) for e in installed()] == [(8,), (9,)]
        assert asked == [(8,), (9,)]
        assert collector.events_of("target", "help_queued")
        stop.set()
    finally:
        target.stop()
