"""Labels that come later, over a real mosquitto with real agents and an MdS.

The target is served unlabelled batches; their labels come three batches late, for some samples
only, in two messages out of order, and for every fourth batch never. It must still train, see the
drift when the new classes' labels come, get a helper and serve with it; batches never labelled
expire with a count. Bad labels are refused, answered with why, and change nothing. Then an
application: ``clue-app`` and ``AppClient`` over the TLS broker with the fleet ACL's ``app``
identity, and JSON from ``mosquitto_pub``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from broker import topics
from broker.app_client import AppClient
from broker.errors import RemoteError
from edge_sim.processes import spawn_agent
from service.metrics import free_port
from support import mosquitto_available, scrape
from support.fleet import Clusters, wait_online, wait_status_online

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DELAY = 3
DRIFT_AT = 12
BATCHES = 30


def _classes(node: str, t: int) -> list[int]:
    if node == "helper":
        return list(range(10))
    return list(range(8)) + ([8, 9] * 2 if t >= DRIFT_AT else [])


@pytest.mark.timeout(300)
def test_late_partial_out_of_order_and_missing_labels_still_train_detect_drift_and_transfer(fleet, tmp_path):
    fleet.mds()
    fleet.agent("helper")
    metrics_port = free_port()
    target = fleet.agent("target", daemon={"served_max_batches": 2 * DELAY, "top_k": 3}, metrics_port=metrics_port)
    feeder, collector = fleet.observer()
    wait_online(fleet, ["helper", "target"])
    data = Clusters()
    held: dict[int, np.ndarray] = {}
    rng = np.random.default_rng(1)
    for t in range(BATCHES):
        late = t - DELAY
        if late >= 0 and late % 4 != 3:  # every fourth batch is never labelled
            y = held[late]
            some = rng.permutation(len(y))[: int(0.6 * len(y))]
            half = len(some) // 2
            # Two messages, the later samples first.
            for part in (np.sort(some[half:])[::-1], some[:half]):
                feeder.send_labels("target", late, y[part], part)
        x_h, y_h = data.batch(_classes("helper", t))
        x_t, y_t = data.batch(_classes("target", t))
        held[t] = y_t
        assert feeder.step(t, [("helper", x_h, y_h), ("target", x_t, None)], timeout=60), f"batch {t} not answered"

    preds = collector.predictions["target"]
    versions = [preds[t].model_version for t in range(BATCHES)]
    assert versions[:DELAY] == [0] * DELAY, "nothing to learn from before the first labels"
    assert versions[DELAY] == 2, "batch 0's labels, in two messages, came before batch 3"
    assert versions == sorted(versions) and versions[-1] >= 2 * (BATCHES - DELAY) * 3 // 4 - 2, versions
    assert all(p.top_classes is not None and p.top_classes.shape == [100, 3] for p in preds.values())
    drift = collector.events_of("target", "drift")
    # Each labels message is learnt as it comes: half a batch may show one new class, the next the other.
    assert drift and {8, 9} <= {c for e in drift for c in e.detail["classes"]}, [e.kind for e in collector.events_of("target")]
    # Batch 12's labels come after batch 14 was served: no drift before, none missed after.
    assert all(e.detail["batch"] >= DRIFT_AT + DELAY - 1 for e in drift), [e.detail for e in drift]
    installed = collector.events_of("target", "helper_installed")
    assert installed and installed[0].detail["helper"] == "helper"
    assert any(preds[t].helpers for t in range(DRIFT_AT, BATCHES)), "the helper served"
    expired = collector.events_of("target", "served_expired")
    assert expired and expired[-1].detail["total"] >= 4, "batches never labelled expire, counted"

    # Bad labels, through an application: each refused with why; the model does not move.
    app = AppClient.connect(fleet.broker_url, timeout=10)
    try:
        x, y = data.batch(list(range(8)), n=20)
        first = app.predict("target", x, top_k=10)
        bad = [
            (first.batch_id + 1, y, None, "is unknown"),
            (3, held[3][:5], np.arange(5), "expired"),
            (first.batch_id, y[:5], None, "5 labels for batch"),
            (first.batch_id, np.full(20, 10), None, r"labels outside \[0, 10\)"),
        ]
        for batch_id, labels, indices, why in bad:
            with pytest.raises(RemoteError, match=why):
                app.send_labels("target", batch_id, labels, indices)
        ack = app.send_labels("target", first.batch_id, y[:4], np.arange(4))
        assert (ack.learnt, ack.pending) == (4, 16)
        with pytest.raises(RemoteError, match="labelled already"):
            app.send_labels("target", first.batch_id, y[:2], np.arange(2))
        # After the refusals the model is where the one good message left it: one step on.
        again = app.predict("target", x, top_k=10)
        assert again.model_version == first.model_version + 1
        refused = [e for e in collector.events_of("target", "rejected") if e.detail.get("context") == "labels"]
        assert len(refused) == 5
    finally:
        app.close()
    # The metrics count a batch where it is served and each labels message where it is learnt.
    metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    labelled = sum(1 for t in range(DELAY, BATCHES) if (t - DELAY) % 4 != 3)
    assert metrics["clue_agent_batches_served_total"] == BATCHES + 2
    assert metrics["clue_agent_batches_trained_total"] == 2 * labelled + 1
    assert metrics['clue_agent_messages_refused_total{reason="labels"}'] == 5
    assert metrics["clue_agent_helpers_installed_total"] == len(collector.events_of("target", "helper_installed"))
    assert target.alive(), target.log_text()[-3000:]


@pytest.mark.timeout(120)
def test_mosquitto_pub_sends_a_json_batch_and_json_labels_and_reads_json_answers(fleet):
    fleet.agent("edge-j", daemon={"top_k": 2})
    wait_online(fleet, ["edge-j"])
    reply = topics.app_reply("app")
    host, port = fleet.broker.host, str(fleet.broker.port)
    sub = subprocess.Popen(["mosquitto_sub", "-V", "mqttv5", "-h", host, "-p", port, "-t", reply, "-C", "2", "-W", "60"],
                           stdout=subprocess.PIPE, text=True)
    try:
        x = Clusters().batch([0, 1], n=3)[0].round(3).tolist()
        for topic, body, corr in (
            (topics.node_batch("edge-j"), {"batch_id": 41, "x": x}, "b41"),
            (topics.node_labels("edge-j"), {"batch_id": 41, "y": [1, 0], "indices": [2, 0]}, "l41"),
        ):
            subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-h", host, "-p", port, "-q", "1", "-t", topic, "-m", json.dumps(body),
                            "-D", "publish", "response-topic", reply, "-D", "publish", "correlation-data", corr], check=True, timeout=30)
        out, _ = sub.communicate(timeout=70)
    finally:
        sub.kill()
    prediction, ack = (json.loads(line) for line in out.splitlines())
    assert prediction["type"] == "prediction" and prediction["batch_id"] == 41 and prediction["corr"] == "b41"
    assert len(prediction["y_hat"]) == 3 and len(prediction["top_probs"][0]) == 2
    assert ack == {**ack, "type": "labels.ack", "batch_id": 41, "learnt": 2, "pending": 1, "corr": "l41"}


@pytest.mark.timeout(180)
def test_clue_app_and_the_client_over_tls_with_the_fleet_acl(tmp_path):
    if not mosquitto_available():
        pytest.skip("mosquitto not installed (Debian package 'mosquitto')")
    from broker import certs as certs_mod
    from broker.mosquitto import private

    node = "tls-node"
    directory = tempfile.mkdtemp(prefix="clue-app-certs-")  # 0755: mosquitto reads the server key
    try:
        certs = certs_mod.generate(directory, nodes=[node], roles=["app", "operator"])
        with private("secure.conf", certs=certs, topology="relay") as broker:
            child = spawn_agent(node, broker.url, tmp_path / "state", tmp_path / "logs", settings={
                "tls_ca": str(certs.ca), "tls_cert": str(certs.cert(node)), "tls_key": str(certs.key(node)), "daemon": {"meta_interval": 0.0},
            })
            try:
                wait_status_online(broker, node, child, **certs.client_kwargs("operator"))
                tls = ["--broker", broker.url, "--cafile", str(certs.ca), "--cert", str(certs.cert("app")), "--key", str(certs.key("app"))]
                x = Clusters().batch([0, 1, 2], n=5)[0]
                np.save(tmp_path / "x.npy", x)
                done = subprocess.run([sys.executable, "-m", "broker.app_client", *tls, "predict", node, str(tmp_path / "x.npy"), "--top-k", "2"],
                                      capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stdout + done.stderr
                prediction = json.loads(done.stdout)
                assert len(prediction["y_hat"]) == 5 and np.array(prediction["top_classes"]).shape == (5, 2)
                (tmp_path / "y.json").write_text(json.dumps({"y": [2, 1], "indices": [4, 0]}))
                (tmp_path / "i.json").write_text(json.dumps([4, 0]))
                labelled = subprocess.run(
                    [sys.executable, "-m", "broker.app_client", *tls, "labels", node, str(prediction["batch_id"]), str(tmp_path / "y.json"),
                     "--indices", str(tmp_path / "i.json")], capture_output=True, text=True, timeout=60,
                )
                assert labelled.returncode == 0, labelled.stdout + labelled.stderr
                assert json.loads(labelled.stdout) == {"batch_id": prediction["batch_id"], "learnt": 2, "error": json.loads(labelled.stdout)["error"],
                                                       "pending": 3}
                twice = subprocess.run(
                    [sys.executable, "-m", "broker.app_client", *tls, "labels", node, str(prediction["batch_id"]), str(tmp_path / "y.json"),
                     "--indices", str(tmp_path / "i.json")], capture_output=True, text=True, timeout=60,
                )
                assert twice.returncode == 1 and "labelled already" in twice.stderr, twice.stdout + twice.stderr
                with AppClient.connect(broker.url, timeout=15, **certs.client_kwargs("app")) as app:
                    answer = app.predict(node, x, y=np.array([0, 1, 2, 0, 1]))
                    # Served by the model one step on (the labels above), then learnt from its own labels.
                    assert answer.error is not None and answer.model_version == 1
                # An identity that is not the application may not read its answers: the node's own.
                with pytest.raises(Exception, match="no answer|not authori|refused"):
                    with AppClient.connect(broker.url, timeout=5, **certs.client_kwargs(node)) as spoof:
                        spoof.predict(node, x, timeout=3)
            finally:
                child.terminate(20)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
