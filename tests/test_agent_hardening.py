"""One message must never crash, brick or poison a real ``clue-agent`` process (issue 7/13).

Each test runs the real daemon as a child process against a real Mosquitto and sends it what an
attacker or a broken application would: a retained batch the model cannot take, finite inputs so
large that training overflows, a KT request on the batch topic. The agent must refuse each with an
event, keep serving, never write a non-finite checkpoint, and start again afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from agent.checkpoint import load_checkpoint, previous_path
from agent.learner import Learner
from agent.models import build_model
from broker import topics
from broker.wire import ArrayPayload, Event, KtBlob, KtRequest, RequestBatch, encode
from edge_sim.processes import spawn
from support import next_message, wait_until
from support.fleet import Clusters, patch_and_ack, wait_online

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _batch(batch_id: int, x: np.ndarray, y: np.ndarray | None = None) -> bytes:
    return encode(
        RequestBatch(
            batch_id=batch_id,
            x=ArrayPayload.from_numpy(x),
            y=ArrayPayload.from_numpy(y.astype(np.int64)) if y is not None else None,
        )
    )


def _rejections(collector, node):
    return [e.detail.get("reason", "") for e in collector.events_of(node, "rejected")]


def _serving(fleet, node: str, seed: int, batches: int, **settings):
    """A real agent that has served and learnt ``batches`` batches of classes 0-7."""
    child = fleet.agent(node, **settings)
    feeder, collector = fleet.observer()
    wait_online(fleet, [node])
    data = Clusters(seed)
    for t in range(batches):
        assert feeder.step(t, [(node, *data.batch(range(8)))])
    return child, feeder, collector, data


def _fresh_learner() -> Learner:
    return Learner(build_model("mlp4", 10, seed=0), num_classes=10)


@pytest.mark.timeout(180)
def test_a_retained_batch_that_raises_is_refused_and_the_agent_serves_on_across_restarts(fleet):
    node = "brittle"
    sender = fleet.client()
    # 1-D inputs used to raise IndexError deep in the model and kill the worker (exit 1); retained,
    # the agent crash-looped on every start.
    sender.publish(topics.node_batch(node), _batch(900, np.zeros(784, dtype=np.float32)), 1, retain=True)
    feeder, collector = fleet.observer()
    data = Clusters(7)
    for attempt in range(2):
        child = fleet.agent(node)
        wait_online(fleet, [node])
        assert collector.wait_for(lambda: len(_rejections(collector, node)) > attempt, 30), child.log_text()[-2000:]
        assert "sample axis" in _rejections(collector, node)[-1]
        assert feeder.step(attempt, [(node, *data.batch(range(8)))]), "the agent stopped serving"
        assert child.alive()
        assert child.terminate(20) == 0
        assert collector.wait_for(lambda: collector.status.get(node) == b"offline", 30)
    sender.clear_retained(topics.node_batch(node))


@pytest.mark.timeout(180)
def test_huge_finite_and_raw_pixel_inputs_are_refused_and_no_checkpoint_goes_non_finite(fleet):
    node = "overflow"
    child, feeder, collector, data = _serving(fleet, node, 8, 4, daemon={"checkpoint_every": 1})
    sender = fleet.client()
    x, y = data.batch(range(8))
    hostile = {
        "3e38": np.full_like(x, 3e38),
        "1e30": np.full_like(x, 1e30),
        "raw_uint8": np.full(x.shape, 255, dtype=np.uint8),
    }
    for i, payload in enumerate(hostile.values()):
        sender.publish(topics.node_batch(node), _batch(100 + i, payload, y), 1)
    assert collector.wait_for(lambda: len(_rejections(collector, node)) == len(hostile), 30)
    assert all("input_range" in reason for reason in _rejections(collector, node))
    assert not collector.events_of(node, "drift")
    assert feeder.step(4, [(node, *data.batch(range(8)))])
    assert collector.predictions[node][4].error < 0.2
    assert child.terminate(20) == 0
    restored = _fresh_learner()
    load_checkpoint(fleet.state / f"{node}.ckpt.npz", restored)  # refuses NaN or infinity in any member
    assert restored.batch_index == 5, "refused batches must not count"


@pytest.mark.timeout(180)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(fleet):
    node = "fallback"
    child, feeder, collector, data = _serving(fleet, node, 9, 3, daemon={"checkpoint_every": 1})
    assert child.terminate(20) == 0
    newest = fleet.state / f"{node}.ckpt.npz"
    assert previous_path(newest).exists()
    newest.write_bytes(newest.read_bytes()[:1000])
    collector.events.clear()
    child = fleet.agent(node, daemon={"checkpoint_every": 1})
    assert collector.wait_for(lambda: collector.events_of(node, "checkpoint_refused"), 60), child.log_text()[-2000:]
    started = collector.events_of(node, "started")[-1].detail
    assert started["resumed"] is True and started["batch"] == 3  # the save before the stop's
    assert feeder.step(3, [(node, *data.batch(range(8)))])
    assert child.terminate(20) == 0


@pytest.mark.timeout(120)
def test_no_usable_checkpoint_exits_78_with_the_reason_first_in_the_log(fleet, tmp_path):
    node = "bricked"
    fleet.state.mkdir(parents=True, exist_ok=True)
    for path in (fleet.state / f"{node}.ckpt.npz", previous_path(fleet.state / f"{node}.ckpt.npz")):
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    child = fleet.agent(node)
    assert child.process.wait(60) == 78
    first = child.log_text().strip().splitlines()[0]
    assert "cannot start" in first and "checkpoint" in first, first


@pytest.mark.timeout(60)
def test_a_node_id_that_cannot_name_topics_exits_78_not_1(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "agent", "--node-id", "..", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 78, out.stderr[-2000:]
    assert "node id" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(180)
def test_a_kt_request_on_the_batch_topic_or_above_the_z_cap_is_not_served(fleet):
    node = "leaky"
    fleet.agent(node)
    feeder, collector = fleet.observer()
    wait_online(fleet, [node])
    data = Clusters(10)
    assert feeder.step(0, [(node, *data.batch(range(10)))])
    listener = fleet.client()
    listener.subscribe(topics.node_reply("spy"), 1)
    listener.subscribe(topics.node_events(node), 1)
    assert listener.wait_subscribed(10)
    arch = build_model("mlp4", 10, seed=0)
    from agent.models import arch_id, lineage

    ids = {"arch_id": arch_id(arch), "lineage": lineage(arch.state_dict())}
    # On the batch topic, a request names the node's events topic, which a feeder may read.
    # Built past validation: the wire no longer takes a reply topic that is not a reply topic.
    sneaky = KtRequest.model_construct(classes=[1], z=1.0, value_codec="float32", reply_to=topics.node_events(node), corr="c1", **ids)
    listener.publish(topics.node_batch(node), encode(sneaky), 1)
    assert collector.wait_for(lambda: _rejections(collector, node), 30)
    assert "kt.request" in _rejections(collector, node)[0]
    # On its own topic, a request above the helper's cap gets a typed refusal, not the model.
    greedy = KtRequest(classes=[1], z=1.0, value_codec="float32", reply_to=topics.node_reply("spy"), corr="c2", **ids)
    listener.publish(topics.node_kt(node), encode(greedy), 1)
    seen = []
    reply = next_message(listener, object, lambda m: seen.append(m) or getattr(m, "corr", None) == "c2", timeout=30)
    assert not isinstance(reply, KtBlob) and "serve_max_z" in reply.message
    # Fence: the agent handles its messages one after the other and publishes in that order, so once
    # the answer to a later request is in, anything it published for the two above has arrived too.
    fence = KtRequest(classes=[1], z=1.0, value_codec="float32", reply_to=topics.node_reply("spy"), corr="fence", **ids)
    listener.publish(topics.node_kt(node), encode(fence), 1)
    next_message(listener, object, lambda m: seen.append(m) or getattr(m, "corr", None) == "fence", timeout=30)
    while (item := listener.get(timeout=0)) is not None:
        seen.append(getattr(item, "message", None))
    assert not collector.events_of(node, "kt_served")
    assert not [m for m in seen if isinstance(m, KtBlob)], "the model was published"


@pytest.mark.timeout(240)
def test_run_time_patches_survive_a_restart_and_a_reload(fleet, tmp_path):
    import signal

    node = "keeper"
    client = fleet.client()
    client.subscribe(topics.node_config_ack(node), 1)
    client.subscribe(topics.node_events(node), 1)
    assert client.wait_subscribed(10)
    toml = tmp_path / "agent.toml"
    toml.write_text(f'node_id = "{node}"\nbroker = "{fleet.broker_url}"\nstate_dir = "{fleet.state}"\n[learner]\nhelp_cooldown = 7\n')
    child = spawn(node, [sys.executable, "-m", "agent", "--config", str(toml)], fleet.logs)
    try:
        wait_online(fleet, [node])
        ack = patch_and_ack(fleet, client, node, '{"kt_mode": "relay", "z": 0.3}')
        assert ack.ok and ack.applied["kt_mode"] == "relay"
        assert child.terminate(20) == 0
        child = spawn(node, [sys.executable, "-m", "agent", "--config", str(toml)], fleet.logs)
        started = next_message(client, Event, lambda e: e.kind == "started" and e.detail.get("resumed"))
        assert started.detail["resumed"] is True
        ack = patch_and_ack(fleet, client, node, '{"pool_max": 2}')
        assert ack.applied["kt_mode"] == "relay" and ack.applied["z"] == 0.3 and ack.applied["help_cooldown"] == 7

        # A reload lays the file under the patches and says what changed.
        toml.write_text(toml.read_text().replace("help_cooldown = 7", "help_cooldown = 9"))
        child.process.send_signal(signal.SIGHUP)
        reloaded = next_message(client, Event, lambda e: e.detail.get("source") == "reload")
        assert reloaded.kind == "config_applied" and reloaded.detail["changed"] == ["help_cooldown"]
        ack = patch_and_ack(fleet, client, node, '{"k": 2}')
        assert ack.applied["help_cooldown"] == 9 and ack.applied["kt_mode"] == "relay" and ack.applied["pool_max"] == 2
    finally:
        assert child.terminate(20) == 0
    stored = json.loads((fleet.state / f"{node}.patches.json").read_text())
    assert stored == {"k": 2, "kt_mode": "relay", "pool_max": 2, "z": 0.3}


@pytest.mark.parametrize(
    "patch, knob",
    [('{"z": 1e-320}', "z"), ('{"kt_timeout": 1e-300}', "kt_timeout"), ('{"lr": 1.0}', "lr"), ('{"drift.window": 100000000}', "window")],
)
def test_config_bounds_a_deployment_needs(patch, knob):
    from agent.config import LearnerConfig
    from agent.errors import ConfigError
    from agent.settings import DaemonKnobs, split_patch
    from broker.wire import decode_config

    with pytest.raises(ConfigError, match=knob):
        split_patch(decode_config(patch.encode()).values, LearnerConfig(), DaemonKnobs())


@pytest.mark.timeout(180)
def test_the_log_tells_an_operator_what_happened(fleet):
    node = "talker"
    child = fleet.agent(node)
    feeder, collector = fleet.observer()
    wait_online(fleet, [node])
    client = fleet.client()
    client.subscribe(topics.node_config_ack(node), 1)
    assert client.wait_subscribed(10)
    assert patch_and_ack(fleet, client, node, '{"z": 0.3}').ok
    assert not patch_and_ack(fleet, client, node, '{"z": 7}').ok
    data = Clusters(11)
    assert feeder.step(0, [(node, *data.batch(range(8)))])
    client.publish(topics.node_batch(node), _batch(5, np.zeros(3, dtype=np.float32)), 1)
    assert collector.wait_for(lambda: _rejections(collector, node), 30)
    assert child.terminate(20) == 0
    log = child.log_text()
    for needle in ("connected", "started", "config_applied", "config_refused", "rejected", "stopped"):
        assert needle in log, (needle, log[-3000:])


def test_an_unresolvable_broker_is_logged_at_once(tmp_path):
    child = spawn(
        "lost", [sys.executable, "-m", "agent", "--node-id", "lost", "--state-dir", str(tmp_path), "--broker", "mqtt://no-such-host.invalid:1883"],
        tmp_path / "logs",
    )
    try:
        wait_until(lambda: "no-such-host.invalid" in child.log_text(), 30, what=child.log_text, interval=0.2)
        assert child.alive()
    finally:
        child.terminate(20)


def test_a_learner_rolls_back_a_step_that_overflows_and_refuses_inputs_out_of_range():
    learner = _fresh_learner()
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(rng.random((64, 784), dtype=np.float32)), torch.from_numpy(rng.integers(0, 10, 64))
    learner.process_batch(x, y)
    with pytest.raises(ValueError, match="input_range"):
        learner.process_batch(torch.full((64, 784), 3e38), y)
    learner.apply_config({"input_range": [-1e39, 1e39]})
    model = {k: v.clone() for k, v in learner.model.state_dict().items()}
    moments = [v.clone() for s in learner.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    hist, index = learner.histogram(), learner.batch_index
    result = learner.process_batch(torch.full((64, 784), 3e38), y)
    assert result.train_refused is not None
    assert all(torch.equal(model[k], v) for k, v in learner.model.state_dict().items())
    after = [v for s in learner.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(moments, after))
    assert (learner.histogram() == hist).all() and learner.batch_index == index + 1
    assert learner.process_batch(x, y).train_refused is None


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    from agent.checkpoint import save_checkpoint
    from agent.errors import CheckpointError

    learner = _fresh_learner()
    path = save_checkpoint(tmp_path / "n.ckpt.npz", learner)
    with torch.no_grad():
        next(learner.model.parameters())[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(path, learner)
    load_checkpoint(path, _fresh_learner())
