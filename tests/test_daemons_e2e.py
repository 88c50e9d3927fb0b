"""clue-agent and clue-mds end to end: real processes, a real mosquitto, lock-step batches.

Three agents start from one base model (same ``model_seed``, so the same lineage). ``helper`` has
seen all ten classes, ``partial`` only classes 0–3, ``target`` classes 0–7 until classes 8–9
arrive. The data are Gaussian clusters in 784 dimensions: learnable in a few batches, so the run
stays short; the learning itself is tested on Fashion-MNIST elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.subscribe as subscribe
import pytest
import torch

from agent.models import arch_id, build_model, lineage
from broker import topics
from broker.client import Responder
from broker.wire import ConfigAck, Event, KtBlob, NodeMeta
from edge_sim.collector import Collector, Feeder
from edge_sim.processes import spawn, spawn_agent, spawn_mds

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEW = (8, 9)


class Clusters:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.normal(size=(10, 784)).astype(np.float32)

    def batch(self, classes, n=100):
        y = self.rng.choice(np.asarray(classes), size=n)
        return self.centres[y] + 1.5 * self.rng.normal(size=(n, 784)).astype(np.float32), y


def _learner(**overrides):
    base = {
        "discard": {"type": "static", "n_batches": 4},
        "drift": {"type": "rolling_error", "window": 2, "margin": 0.1, "baseline_window": 4},
        "help_cooldown": 100,
    }
    base.update(overrides)
    return base


@pytest.fixture
def fleet(fresh_mosquitto, make_client, tmp_path):
    """Start MdS + agents on demand; stop everything at teardown (logs shown on failure)."""
    children = []
    url = f"mqtt://{fresh_mosquitto.host}:{fresh_mosquitto.port}"

    class Fleet:
        broker = fresh_mosquitto
        broker_url = url
        state = tmp_path / "state"
        logs = tmp_path / "logs"

        def mds(self):
            child = spawn_mds(url, tmp_path / "mds.db", self.logs)
            children.append(child)
            return child

        def relay(self):
            child = spawn("relay", [sys.executable, "-m", "broker.relay", "--broker", url], self.logs)
            children.append(child)
            return child

        def agent(self, node_id, *, learner=None, daemon=None, **settings):
            merged = {"learner": learner or _learner(), "daemon": {"meta_interval": 0.0, "kt_timeout": 3.0, **(daemon or {})}}
            merged.update(settings)
            child = spawn_agent(node_id, url, self.state, self.logs, settings=merged)
            children.append(child)
            return child

        def client(self, **settings):
            settings.setdefault("client_id", f"observer-{os.getpid()}-{time.monotonic_ns()}")
            client = make_client(fresh_mosquitto, **settings)
            assert client.wait_connected(10)
            return client

        def observer(self):
            client = self.client()
            collector = Collector(client).start()
            client.wait_subscribed(10)
            return Feeder(client, collector), collector

    yield Fleet()
    for child in children:
        child.terminate(10)
    for child in children:
        text = child.log_text()
        if "Traceback" in text:
            print(f"--- {child.name} log ---\n{text[-4000:]}")


def _wait_online(fleet, nodes, timeout=60):
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
    if kt_mode == "relay":
        fleet.relay()
    nodes = ["target", "helper", "partial"]
    children = {n: fleet.agent(n, daemon={"kt_mode": kt_mode}) for n in nodes}
    feeder, collector = fleet.observer()
    _wait_online(fleet, nodes)
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
    print(f"{kt_mode}: drift -> helper serving: {installed[0].detail['batches']} batches, {installed[0].detail['ms']:.1f} ms")


def _patch_and_ack(fleet, client, node, payload):
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


@pytest.mark.timeout(180)
def test_config_patch_from_mosquitto_pub(fleet):
    node = "cfg-node"
    fleet.agent(node)
    _wait_online(fleet, [node])
    client = fleet.client()
    client.subscribe(topics.node_config_ack(node), 1)
    assert client.wait_subscribed(10)
    ack = _patch_and_ack(fleet, client, node, '{"z": 0.3, "drift.window": 4}')
    assert ack.ok and ack.applied["z"] == 0.3 and ack.applied["drift"]["window"] == 4
    bad = _patch_and_ack(fleet, client, node, '{"z": 7, "pool_max": 2}')
    assert not bad.ok and "z" in bad.error
    again = _patch_and_ack(fleet, client, node, '{"pool_max": 3}')
    assert again.ok and again.applied["z"] == 0.3 and again.applied["pool_max"] == 3
    garbage = _patch_and_ack(fleet, client, node, "not json at all")
    assert not garbage.ok


def _rogue(fleet, node_id, meta_like, hist, answer):
    """A node that advertises ``hist`` and answers every KT request with ``answer(request)``.

    It is a real MQTT client speaking the real protocol; it stands for a broken or malicious peer.
    ``answer=None`` makes it silent: it receives requests and never answers.
    """
    client = fleet.client(client_id=node_id, status_node_id=node_id)
    client.subscribe(topics.node_kt(node_id), 1)
    assert client.wait_subscribed(10)
    client.set_retained(
        topics.node_meta(node_id),
        NodeMeta(node_id=node_id, arch_id=meta_like["arch_id"], lineage=meta_like["lineage"], hist=hist),
    )
    seen = []
    responder = Responder(client, lambda request, item: KtBlob(corr=request.corr, blob=answer(request)))
    stop = threading.Event()

    def run():
        while not stop.is_set():
            item = client.get(timeout=0.1)
            request = getattr(item, "message", None)
            if request is None or not request.is_request:
                continue
            seen.append(request)
            if answer is not None:
                responder.handle(item)

    threading.Thread(target=run, daemon=True).start()
    return seen, stop


def _hostile_blobs(learner):
    """Blobs a target must refuse, each for a different reason."""
    import msgpack
    import zstandard

    from agent.kt import codec
    from agent.models import build_model

    sig = learner.significant_for((8, 9), 0.5)
    good = codec.encode_blob(sig, value_codec="float32")
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(good), raw=False)

    def repack(mutate):
        d = msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False)
        mutate(d)
        return zstandard.ZstdCompressor(write_checksum=True).compress(msgpack.packb(d, use_bin_type=True))

    def nan(d):
        vals = np.frombuffer(d["tensors"][0]["val"], dtype="<f4").copy()
        vals[3] = np.nan
        d["tensors"][0]["val"] = vals.tobytes()

    def wrong_shape(d):
        d["tensors"][0]["shape"] = [d["tensors"][0]["shape"][0] + 1, d["tensors"][0]["shape"][1]]

    other = build_model("mlp4", 5, seed=0)
    from agent.learner import Learner

    foreign = Learner(other, num_classes=5)
    foreign.process_batch(torch.rand(8, 784), torch.arange(8) % 5)
    # A real frame that declares (and holds) 1 GiB of zeros: a few KiB on the wire.
    bomb = zstandard.ZstdCompressor(write_checksum=True).compressobj(size=1 << 30)
    zeros = bytes(1 << 20)
    bomb_blob = b"".join(bomb.compress(zeros) for _ in range(1024)) + bomb.flush()
    return {
        "nan": repack(nan),
        "wrong_shape": repack(wrong_shape),
        "wrong_arch": foreign.kt_blob((1,), 0.5),
        "truncated": good[: len(good) // 3],
        "zstd_bomb": bomb_blob,
    }


def start_victim(fleet, k: int):
    """An in-process agent named ``victim`` (so the test can look at its weights), and the MdS."""
    from agent.daemon import AgentDaemon
    from agent.settings import load_settings

    fleet.mds()
    settings = load_settings(
        node_id="victim", broker=fleet.broker_url, state_dir=str(fleet.state),
        learner=_learner(k=k), daemon={"meta_interval": 0.0, "kt_timeout": 5.0},
    )
    victim = AgentDaemon(settings)
    victim.start()
    return victim


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
        helper_like = Learner_clone_for_blobs(learner, data)
        blobs = _hostile_blobs(helper_like)
        snapshots = []

        def answer_with(name):
            def answer(request):
                if not snapshots:
                    snapshots.append({k: v.clone() for k, v in learner.model.state_dict().items()})
                return blobs[name]
            return answer

        hist = [0.0] * 8 + [50.0, 50.0]
        rogues = [_rogue(fleet, f"rogue-{name.replace('_', '-')}", {"arch_id": learner.arch_id, "lineage": learner.lineage}, hist, answer_with(name)) for name in blobs]
        time.sleep(1.0)  # the MdS ingests the rogues' retained meta
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
        victim.request_stop()
        victim.stop()


def Learner_clone_for_blobs(learner, data):
    """A peer of the same lineage that has seen classes 8-9: the source of well-formed blobs."""
    import copy

    from agent.learner import Learner

    peer = Learner(copy.deepcopy(learner.model), num_classes=10, base_state=learner._base_params)
    peer.lineage = learner.lineage
    peer.process_batch(torch.from_numpy(data.batch(range(10))[0]), torch.from_numpy(data.batch(range(10))[1]))
    return peer


@pytest.mark.timeout(240)
def test_silent_helper_makes_target_move_to_the_next_candidate(fleet):
    fleet.mds()
    fleet.agent("target2", learner=_learner(k=4), daemon={"kt_timeout": 2.0})
    fleet.agent("helper2")
    feeder, collector = fleet.observer()
    _wait_online(fleet, ["target2", "helper2"])
    # The agents build their base model from model_seed 0: the same ids as this one.
    base = build_model("mlp4", 10, seed=0)
    ids = {"arch_id": arch_id(base), "lineage": lineage(base)}
    data = Clusters(2)
    schedule = Schedule(["target2", "helper2"], drift_at=10)
    schedule_fn = lambda node, t: list(range(10)) if node == "helper2" else schedule("target", t)
    schedule_fn.nodes = schedule.nodes
    for t in range(10):
        assert feeder.step(t, [(n, *data.batch(schedule_fn(n, t))) for n in schedule.nodes])
    # The silent node looks most like the target (its classes 0-7 plus 8-9), so the MdS ranks it first.
    hist = [100.0] * 8 + [30.0, 30.0]
    seen, stop = _rogue(fleet, "silent", {"arch_id": ids["arch_id"], "lineage": ids["lineage"]}, hist, None)
    time.sleep(1.0)
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
    _wait_online(fleet, [node])
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
        first = _next(client, ConfigAck)
        assert first.ok and first.applied["z"] == 0.25 and first.applied["help_cooldown"] == 7

        toml.write_text(toml.read_text().replace("help_cooldown = 7", "help_cooldown = 9"))
        child.process.send_signal(signal.SIGHUP)
        reload_event = _next(client, Event, lambda e: e.detail.get("source") == "reload")
        assert reload_event.kind == "config_applied" and reload_event.detail.get("source") == "reload"
        ack = _patch_and_ack(fleet, client, node, '{"pool_max": 2}')
        assert ack.ok and ack.applied["help_cooldown"] == 9 and ack.applied["pool_max"] == 2

        toml.write_text(toml.read_text().replace("help_cooldown = 9", "help_cooldown = -1"))
        child.process.send_signal(signal.SIGHUP)
        refused = _next(client, Event, lambda e: e.detail.get("source") == "reload")
        assert refused.kind == "config_refused" and "help_cooldown" in refused.detail["error"]
        assert child.alive()
    finally:
        assert child.terminate(20) == 0
    assert (fleet.state / f"{node}.ckpt.npz").exists()


def _next(client, kind, where=lambda m: True, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = client.get(timeout=0.2)
        message = getattr(item, "message", None)
        if isinstance(message, kind) and where(message):
            return message
    raise AssertionError(f"no {kind.__name__} within {timeout} s")
