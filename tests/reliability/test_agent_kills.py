"""A ``clue-agent`` SIGKILLed mid-training N times (default 20): it resumes from a consistent checkpoint.

A feeder publishes QoS 1 batches continuously (the agent's persistent session queues them while it
is down), the agent checkpoints every 2 batches, so kills land during training steps and during
checkpoint writes. A watcher copies every checkpoint version the agent writes. After each kill the
checkpoint on disk must load, hold finite weights equal to one of the versions written, have a
batch counter above the previous kill's, and be what the restarted agent says it resumed from.
"""

from __future__ import annotations

import copy
import hashlib
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from agent.checkpoint import load_checkpoint
from agent.config import LearnerConfig
from agent.learner import Learner
from agent.models import build_model
from broker import topics
from broker.wire import ArrayPayload, RequestBatch
from edge_sim.collector import Collector
from edge_sim.processes import spawn_agent

from .conftest import TINY, Traffic, Watcher, record, size

KILLS = size("AGENT_KILLS", 20)
CHECKPOINT_EVERY = 2
NODE = "phoenix"

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


class CheckpointWatcher(Watcher):
    """Keeps the digest and batch counter of every checkpoint version that appears at ``path``.

    Versions are whole files (the agent renames a finished file over the old one), so reading an
    open file is never torn; one written within a poll interval of the next can be missed.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.versions: dict[str, int] = {}

    def _run(self) -> None:
        last = None
        while not self._stop.wait(0.005):
            try:
                st = self.path.stat()
                key = (st.st_ino, st.st_mtime_ns)
                if key == last:
                    continue
                data = self.path.read_bytes()
            except FileNotFoundError:
                continue
            last = key
            self.versions[hashlib.sha256(data).hexdigest()] = st.st_mtime_ns


def _fresh_learner() -> Learner:
    """A learner built the way the daemon builds it (same arch, seed, so the same lineage)."""
    model = build_model(TINY["arch"], TINY["num_classes"], seed=0)
    return Learner(model, num_classes=TINY["num_classes"], config=LearnerConfig(), base_state=copy.deepcopy(model.state_dict()), seed=0)


@pytest.mark.timeout(240 + 30 * KILLS)
def test_agent_sigkilled_mid_training_resumes_from_a_consistent_checkpoint(fresh_mosquitto, make_client, tmp_path):
    url = f"mqtt://{fresh_mosquitto.host}:{fresh_mosquitto.port}"
    logs, state = tmp_path / "logs", tmp_path / "state"
    settings = {**TINY, "daemon": {"checkpoint_every": CHECKPOINT_EVERY, "meta_interval": 0.0}}
    ckpt = state / f"{NODE}.ckpt.npz"
    observer = make_client(fresh_mosquitto, client_id="rel-observer")
    collector = Collector(observer).start()
    assert observer.wait_subscribed(10)
    feeder = make_client(fresh_mosquitto, client_id="rel-feeder")
    assert feeder.wait_connected(10)
    stop = threading.Event()
    sent = [0]

    def feed() -> None:
        data = Traffic(7)
        while not stop.is_set():
            x, y = data.batch((0, 1, 2, 3, 4), n=128)
            feeder.publish_message(
                topics.node_batch(NODE), RequestBatch(batch_id=sent[0], x=ArrayPayload.from_numpy(x), y=ArrayPayload.from_numpy(y))
            )
            sent[0] += 1
            # Slow enough for the agent to drain what queued while it was down (at 20 per second of
            # 256 samples it fell further behind at every restart), fast enough to keep it busy.
            stop.wait(0.1)

    def resumed_events() -> list:
        return [e for e in collector.events_of(NODE, "started") if e.detail.get("resumed")]

    watcher = CheckpointWatcher(ckpt).start()
    child = spawn_agent(NODE, url, state, logs, settings=settings)
    threading.Thread(target=feed, daemon=True).start()
    rng = random.Random(KILLS)
    resumes, matched, mid_save, backlog_at_kill, batches, ahead = 0, 0, 0, [], [], []
    try:
        for _ in range(KILLS):
            # Serving, and past at least a few checkpoints of this incarnation, before the kill.
            seen = len(collector.predictions[NODE])
            assert collector.wait_for(lambda: len(collector.predictions[NODE]) >= seen + 3 * CHECKPOINT_EVERY, 120), child.log_text()[-2000:]
            time.sleep(rng.uniform(0.0, 0.3))
            backlog_at_kill.append(sent[0] - len(collector.predictions[NODE]))
            written = dict(watcher.versions)
            child.kill()
            mid_save += (state / f".{ckpt.name}.tmp").exists()
            assert collector.wait_for(lambda: collector.status.get(NODE) == topics.STATUS_OFFLINE, 60), "no will after SIGKILL"

            data = ckpt.read_bytes()
            learner = _fresh_learner()
            info = load_checkpoint(ckpt, learner)  # raises CheckpointError on a torn or corrupt file
            assert all(bool(torch.isfinite(t).all()) for t in learner.model.state_dict().values() if t.is_floating_point())
            if hashlib.sha256(data).hexdigest() in written:
                matched += 1
            else:  # written after the watcher's last poll before the kill: then newer than all it saw
                assert ckpt.stat().st_mtime_ns >= max(written.values()), "on disk: an old version never seen last"
            assert not batches or info.batch_index > batches[-1], f"batch counter went {batches[-1]} -> {info.batch_index}"
            batches.append(info.batch_index)

            before = len(resumed_events())
            child = spawn_agent(NODE, url, state, logs, settings=settings)
            assert collector.wait_for(lambda: len(resumed_events()) > before, 120), child.log_text()[-2000:]
            # The worker serves queued batches while the client finishes connecting, so "started"
            # may already count a few past the checkpoint, never fewer.
            ahead.append(resumed_events()[-1].detail["batch"] - info.batch_index)
            assert ahead[-1] >= 0, (ahead[-1], info.batch_index)
            resumes += 1
        stop.set()
        assert child.alive(), child.log_text()[-2000:]
    finally:
        stop.set()
        watcher.stop()
        child.terminate(20)
    record(
        "agent-kills",
        f"agent kills: {KILLS}, resumed from a consistent checkpoint: {resumes}, checkpoint = a watched version: "
        f"{matched} (the rest newer than the last one watched), killed during a checkpoint write: {mid_save}, "
        f"batch counters {batches[0]}..{batches[-1]} strictly increasing, batches queued at the kill: "
        f"median {sorted(backlog_at_kill)[len(backlog_at_kill) // 2]}",
        {"kills": KILLS, "resumes": resumes, "matched_watched_version": matched, "killed_during_save": mid_save,
         "batch_index_at_kill": batches, "batches_queued_at_kill": backlog_at_kill, "versions_watched": len(watcher.versions),
         "batches_sent": sent[0], "checkpoint_every": CHECKPOINT_EVERY,
         "started_event_batches_past_checkpoint": ahead},
    )
    assert resumes == KILLS
