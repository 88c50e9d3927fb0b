"""clue-agent and clue-mds end to end: real processes, a real mosquitto, lock-step batches.

Three agents start from one base model (same ``model_seed``, so the same lineage). ``helper`` has
seen all ten classes, ``partial`` only classes 0–3, ``target`` classes 0–7 until classes 8–9
arrive. The data are Gaussian clusters in 784 dimensions: learnable in a few batches, so the run
stays short; the learning itself is tested on Fashion-MNIST elsewhere.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from agent.models import arch_id, build_model, lineage
from broker import topics
from broker.wire import ConfigAck, Event
from edge_sim.processes import spawn
from service.metrics import free_port
from support import next_message, scrape
from support.fleet import Clusters, learner_settings, patch_and_ack, wait_online
from support.peers import hostile_blobs, peer_for_blobs, rogue, start_victim

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEW = (8, 9)


def _run_lockstep(feeder, collector, data, schedule, batches, start=0):
    for t in range(start, start + batches):
        ok = feeder.step(t, [(node, *data.batch(schedule(node, t))) for node in schedule.nodes], timeout=60)
        assert ok, f"batch {t} not answered by every node"


class Schedule:
    def __init__(self, nodes, drift_at):
        self.nodes = nodes
        self.drift_at = drift_at

    def __call__(self, node, t):
        if node == "helper":
            return list(range(10))
        if node == "partial":
            return [0, 1, 2, 3]
        return list(range(8)) + ([8, 9] * 2 if t >= self.drift_at else [])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kt_mode", ["direct", "relay"])
def test_drift_leads_to_kt_from_the_node_that_knows_the_classes(fleet, kt_mode):
    fleet.mds()
    ports = {name: free_port() for name in ("target", "helper", "relay")}
    if kt_mode == "relay":
        fleet.relay("--metrics-port", str(ports["relay"]))
    nodes = ["target", "helper", "partial"]
    children = {n: fleet.agent(n, daemon={"kt_mode": kt_mode}, **({"metrics_port": ports[n]} if n in ports else {})) for n in nodes}
    feeder, collector = fleet.observer()
    wait_online(fleet, nodes)
    data = Clusters()
    schedule = Schedule(nodes, drift_at=12)
    _run_lockstep(feeder, collector, data, schedule, 24)

    drift = collector.events_of("target", "drift")
    assert drift and set(drift[0].detail["classes"]) == set(NEW)
    asked = collector.events_of("target", "help_requested")
    installed = collector.events_of("target", "helper_installed")
    assert installed, [e.kind for e in collector.events_of("target")]
    # Direct: the MdS picks the node that has seen classes 8-9. Relay: the same node serves,
    # but the target only ever talks to the relay and never learns who helped.
    expected = "helper" if kt_mode == "direct" else "relay"
    assert asked[0].detail["helper"] == expected and installed[0].detail["helper"] == expected
    assert installed[0].detail["batches"] == 0, "lock-step: the helper serves the very next batch"
    assert collector.events_of("helper", "kt_served")
    assert not collector.events_of("partial", "kt_served")
    assert collector.events_of("target", "helper_discarded"), "static discard after 4 batches"
    preds = collector.predictions["target"]
    served = [preds[t].helpers for t in sorted(preds)]
    assert any(served) and not served[-1]
    for child in children.values():
        assert child.alive(), child.log_text()[-2000:]

    # The metrics say what the events said.
    target = scrape(f"http://127.0.0.1:{ports['target']}/metrics")
    assert target["clue_agent_batches_served_total"] == 24 and target["clue_agent_batches_trained_total"] == 24
    assert target["clue_agent_drift_detections_total"] == len(drift)
    assert target["clue_agent_helpers_installed_total"] == len(installed) == target['clue_agent_help_requests_total{outcome="installed"}']
    assert target["clue_agent_kt_received_bytes_total"] == sum(e.detail["bytes"] for e in installed)
    assert target["clue_agent_helpers_discarded_total"] == len(collector.events_of("target", "helper_discarded"))
    assert target["clue_agent_drift_to_helper_seconds_count"] == len(installed)
    assert target["clue_agent_drift_unhelped_batches"] == 0
    assert 0.0 <= target["clue_agent_served_error_ratio"] <= 1.0
    assert target["clue_agent_mqtt_connected"] == 1.0
    assert target['clue_agent_mqtt_payload_bytes_total{direction="in",topic_class="kt"}'] >= target["clue_agent_kt_received_bytes_total"]
    helper = scrape(f"http://127.0.0.1:{ports['helper']}/metrics")
    served = collector.events_of("helper", "kt_served")
    assert helper["clue_agent_kt_served_total"] == len(served)
    assert helper["clue_agent_kt_sent_bytes_total"] == sum(e.detail["bytes"] for e in served) > 0
    assert helper['clue_agent_operation_seconds_count{operation="pick"}'] == len(served)
    if kt_mode == "relay":
        relay = scrape(f"http://127.0.0.1:{ports['relay']}/metrics")
        assert relay['clue_relay_transfers_total{outcome="forwarded"}'] == len(installed)
    print(f"{kt_mode}: drift -> helper serving: {installed[0].detail['batches']} batches, {installed[0].detail['ms']:.1f} ms")


@pytest.mark.timeout(180)
def test_config_patch_from_mosquitto_pub(fleet):
    node = "cfg-node"
    fleet.agent(node)
    wait_online(fleet, [node])
    client = fleet.client()
    client.subscribe(topics.node_config_ack(node), 1)
    assert client.wait_subscribed(10)
    ack = patch_and_ack(fleet, client, node, '{"z": 0.3, "drift.window": 4}')
    assert ack.ok and ack.applied["z"] == 0.3 and ack.applied["drift"]["window"] == 4
    bad = patch_and_ack(fleet, client, node, '{"z": 7, "pool_max": 2}')
    assert not bad.ok and "z" in bad.error
    again = patch_and_ack(fleet, client, node, '{"pool_max": 3}')
    assert again.ok and again.applied["z"] == 0.3 and again.applied["pool_max"] == 3
    garbage = patch_and_ack(fleet, client, node, "not json at all")
    assert not garbage.ok


@pytest.mark.timeout(240)
def test_hostile_blobs_are_rejected_and_weights_stay_bit_identical(fleet):
    victim = start_victim(fleet, k=8)
    try:
        assert victim.wait_ready(20)
        learner = victim.learner
        feeder, collector = fleet.observer()
        data = Clusters(1)
        for t in range(10):
            assert feeder.step(t, [("victim", *data.batch(range(8)))])
        helper_like = peer_for_blobs(learner, data)
        blobs = hostile_blobs(helper_like)
        snapshots = []

        def answer_with(name):
            def answer(request):
                if not snapshots:
                    snapshots.append({k: v.clone() for k, v in learner.model.state_dict().items()})
                return blobs[name]
            return answer

        hist = [0.0] * 8 + [50.0, 50.0]
        ids = {"arch_id": learner.arch_id, "lineage": learner.lineage}
        names = [f"rogue-{name.replace('_', '-')}" for name in blobs]
        rogues = [rogue(fleet, node_id, ids, hist, answer_with(name)) for node_id, name in zip(names, blobs)]
        fleet.wait_offered(names, **ids)  # the MdS has the rogues' retained meta and status
        t = 10
        while not collector.events_of("victim", "help_failed"):
            assert t < 20, "no drift"
            assert feeder.step(t, [("victim", *data.batch(list(range(8)) + [8, 9] * 2))], timeout=90)
            t += 1
        rejected = collector.events_of("victim", "rejected")
        assert len(rejected) == len(blobs), [e.detail for e in rejected]
        assert snapshots, "no rogue was asked"
        after = learner.model.state_dict()
        assert all(torch.equal(snapshots[0][k], after[k]) for k in after)
        assert len(learner.pool) == 0
        assert all(seen for seen, _ in rogues)
        for _, stop in rogues:
            stop.set()
    finally:
        victim.stop()


@pytest.mark.timeout(240)
def test_silent_helper_makes_target_move_to_the_next_candidate(fleet):
    fleet.mds()
    fleet.agent("target2", learner=learner_settings(k=4), daemon={"kt_timeout": 2.0})
    fleet.agent("helper2")
    feeder, collector = fleet.observer()
    wait_online(fleet, ["target2", "helper2"])
    # The agents build their base model from model_seed 0: the same ids as this one.
    base = build_model("mlp4", 10, seed=0)
    ids = {"arch_id": arch_id(base), "lineage": lineage(base)}
    data = Clusters(2)
    schedule = Schedule(["target2", "helper2"], drift_at=10)

    def schedule_fn(node, t):
        return list(range(10)) if node == "helper2" else schedule("target", t)

    for t in range(10):
        assert feeder.step(t, [(n, *data.batch(schedule_fn(n, t))) for n in schedule.nodes])
    # The silent node looks most like the target (its classes 0-7 plus 8-9), so the MdS ranks it first.
    hist = [100.0] * 8 + [30.0, 30.0]
    seen, stop = rogue(fleet, "silent", {"arch_id": ids["arch_id"], "lineage": ids["lineage"]}, hist, None)
    fleet.wait_offered(["silent", "helper2"], **ids)
    t = 10
    while not collector.events_of("target2", "helper_installed"):
        assert t < 22, "no helper installed"
        assert feeder.step(t, [(n, *data.batch(schedule_fn(n, t))) for n in schedule.nodes], timeout=90)
        t += 1
    stop.set()
    asked = [e.detail["helper"] for e in collector.events_of("target2", "help_requested")]
    assert asked[:2] == ["silent", "helper2"]
    assert seen, "the silent node was asked first"
    failed = collector.events_of("target2", "kt_failed")
    assert failed and failed[0].detail["helper"] == "silent"
    installed = collector.events_of("target2", "helper_installed")[0]
    assert installed.detail["helper"] == "helper2"
    assert 2000 <= installed.detail["ms"] < 2000 + 5000


@pytest.mark.timeout(240)
def test_sigkilled_agent_resumes_from_its_checkpoint(fleet):
    node = "phoenix"
    child = fleet.agent(node, daemon={"checkpoint_every": 5})
    feeder, collector = fleet.observer()
    wait_online(fleet, [node])
    data = Clusters(3)
    for t in range(12):
        assert feeder.step(t, [(node, *data.batch(range(8)))])
    child.kill()
    # As systemd would (RestartSec=): restart once the broker has seen the old connection go.
    assert collector.wait_for(lambda: collector.status.get(node) == b"offline", 60), "no will after SIGKILL"
    child2 = fleet.agent(node, daemon={"checkpoint_every": 5})
    # The first agent may have said "started" before the observer subscribed: look for the resumed one.
    resumed = lambda: [e for e in collector.events_of(node, "started") if e.detail.get("resumed")]  # noqa: E731
    assert collector.wait_for(resumed, 120), child2.log_text()[-2000:]
    restarted = resumed()[-1].detail
    assert restarted["resumed"] is True and restarted["batch"] == 10
    assert feeder.step(12, [(node, *data.batch(range(8)))])
    assert collector.predictions[node][12].error < 0.2


@pytest.mark.timeout(180)
def test_retained_config_applies_at_start_and_sighup_reloads_the_file(fleet, tmp_path):
    node = "reloader"
    subprocess.run(
        ["mosquitto_pub", "-h", fleet.broker.host, "-p", str(fleet.broker.port), "-q", "1", "-r",
         "-t", topics.node_config(node), "-m", '{"z": 0.25}'],
        check=True, timeout=10,
    )
    client = fleet.client()
    client.subscribe(topics.node_config_ack(node), 1)
    client.subscribe(topics.node_events(node), 1)
    assert client.wait_subscribed(10)
    toml = tmp_path / "agent.toml"
    toml.write_text(f'node_id = "{node}"\nbroker = "{fleet.broker_url}"\nstate_dir = "{fleet.state}"\n[learner]\nhelp_cooldown = 7\n')
    child = spawn(node, [sys.executable, "-m", "agent", "--config", str(toml)], fleet.logs)
    try:
        first = next_message(client, ConfigAck)
        assert first.ok and first.applied["z"] == 0.25 and first.applied["help_cooldown"] == 7

        toml.write_text(toml.read_text().replace("help_cooldown = 7", "help_cooldown = 9"))
        child.process.send_signal(signal.SIGHUP)
        reload_event = next_message(client, Event, lambda e: e.detail.get("source") == "reload")
        assert reload_event.kind == "config_applied" and reload_event.detail.get("source") == "reload"
        ack = patch_and_ack(fleet, client, node, '{"pool_max": 2}')
        assert ack.ok and ack.applied["help_cooldown"] == 9 and ack.applied["pool_max"] == 2

        toml.write_text(toml.read_text().replace("help_cooldown = 9", "help_cooldown = -1"))
        child.process.send_signal(signal.SIGHUP)
        refused = next_message(client, Event, lambda e: e.detail.get("source") == "reload")
        assert refused.kind == "config_refused" and "help_cooldown" in refused.detail["error"]
        assert child.alive()
    finally:
        assert child.terminate(20) == 0
    assert (fleet.state / f"{node}.ckpt.npz").exists()


def _meta_publications(fleet, node, daemon, batches, drift_at):
    """Feed ``node`` lock-step batches (classes 0–7, then 8–9 too from ``drift_at``); the batch
    index after which each metadata publication arrived."""
    fleet.agent(node, daemon=daemon)
    feeder, collector = fleet.observer()
    watcher = fleet.client()
    watcher.subscribe(topics.node_meta(node), 1)
    assert watcher.wait_subscribed(10)
    wait_online(fleet, [node])
    data = Clusters()
    published = []
    for t in range(batches):
        classes = list(range(8)) + ([8, 9] * 2 if t >= drift_at else [])
        assert feeder.step(t, [(node, *data.batch(classes))], timeout=60), f"batch {t} not answered"
        # The metadata goes out before the prediction, so by now it is on its way to the watcher.
        while (item := watcher.get(timeout=0.3)) is not None:
            if getattr(item, "topic", None) == topics.node_meta(node) and item.message is not None:
                published.append((t, item.message.batches))
    return published


@pytest.mark.timeout(180)
def test_metadata_goes_out_when_the_class_shares_move_not_every_batch(fleet):
    published = _meta_publications(fleet, "meta-node", {"meta_interval": 0.0}, batches=40, drift_at=25)
    after = [t for t, _ in published]
    # Steady class mix: once the shares settle, nothing new goes out; the arrival of classes 8-9
    # moves them, and the MdS hears about it within a few batches.
    assert len(after) < 20, after
    assert not [t for t in after if 18 <= t < 25], after
    assert [t for t in after if 25 <= t < 30], after
    every = _meta_publications(fleet, "meta-every", {"meta_interval": 0.0, "meta_min_change": 0.0}, batches=10, drift_at=99)
    assert len(every) >= 9, every
