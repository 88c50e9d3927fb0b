"""Soak: N agents (default 50, tiny model, one torch thread each) for S seconds (default 600).

Real ``clue-agent`` processes and a ``clue-mds`` on one broker; every agent gets a labelled batch
every ``PERIOD`` seconds, and every fifth agent sees two classes come and go, so it drifts, pulls
helpers from the others and discards them, again and again. Checked:

- resident memory of every agent after warm-up vs at the end: grown by at most 10 %;
- the helper pool: never above ``pool_max`` (the ``helpers`` field of each node's metadata and the
  ``pool`` of each ``helper_installed`` event);
- no growing queue: the batches sent to an agent and not yet answered (broker queue + client inbox
  + the batch in hand), sampled throughout, stay within a few batches.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from broker import topics
from broker.client import Inbound
from broker.wire import ArrayPayload, NodeMeta, RequestBatch
from edge_sim.collector import Collector
from edge_sim.processes import spawn_agent, spawn_mds

from .conftest import TINY, Traffic, Watcher, record, rss_bytes, size

AGENTS = size("SOAK_AGENTS", 50)
SECONDS = size("SOAK_SECONDS", 600)
# A fifth of the run: short runs (a quick check) still sample memory after warm-up.
WARMUP = SECONDS / 5
PERIOD = 2.0  # seconds between two batches of one agent
POOL_MAX = 2
MAX_LAG = 5  # batches: ten seconds behind at this rate
GROWTH = 0.10

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def _drifter(i: int) -> bool:
    return i % 5 == 0


def _classes(i: int, t: int) -> tuple[int, ...]:
    if not _drifter(i):
        return (0, 1, 2, 3, 4)
    return (0, 1, 2, 3, 4) if (t // 12) % 2 else (0, 1, 2)


class MetaWatcher(Watcher):
    """The largest pool each node reported in its metadata."""

    def __init__(self, client) -> None:
        super().__init__()
        self.client = client
        self.max_helpers: dict[str, int] = {}
        self.count = 0
        client.subscribe(topics.all_meta(), 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.client.get(timeout=0.1)
            if isinstance(item, Inbound) and isinstance(item.message, NodeMeta):
                meta = item.message
                self.count += 1
                self.max_helpers[meta.node_id] = max(self.max_helpers.get(meta.node_id, 0), meta.helpers)


@pytest.mark.timeout(900 + 2 * SECONDS)
def test_soak_memory_flat_pool_bounded_no_growing_queue(fresh_mosquitto, make_client, tmp_path):
    url = f"mqtt://{fresh_mosquitto.host}:{fresh_mosquitto.port}"
    logs, state = tmp_path / "logs", tmp_path / "state"
    nodes = [f"soak-{i:03d}" for i in range(AGENTS)]
    learner = {
        "drift": {"type": "rolling_error", "window": 2, "margin": 0.1, "baseline_window": 4},
        "discard": {"type": "static", "n_batches": 4},
        "pool_max": POOL_MAX,
        "help_cooldown": 6,
        "k": 3,
    }
    children = [spawn_mds(url, tmp_path / "mds.db", logs)]
    agents = {
        node: spawn_agent(node, url, state, logs, threads=1, settings={**TINY, "learner": learner, "daemon": {"kt_timeout": 5.0}})
        for node in nodes
    }
    children += agents.values()
    try:
        observer = make_client(fresh_mosquitto, client_id="soak-collector", inbox_size=100_000)
        collector = Collector(observer).start()
        metas = MetaWatcher(make_client(fresh_mosquitto, client_id="soak-meta", start=False))
        metas.client.start()
        metas.start()
        assert observer.wait_subscribed(10) and metas.client.wait_subscribed(10)
        online = lambda: all(collector.status.get(n) == topics.STATUS_ONLINE for n in nodes)  # noqa: E731
        assert collector.wait_for(online, 900), f"{sum(collector.status.get(n) == topics.STATUS_ONLINE for n in nodes)} of {AGENTS} online"
        feeder = make_client(fresh_mosquitto, client_id="soak-feeder")
        assert feeder.wait_connected(10)
        traffic = [Traffic(i) for i in range(AGENTS)]
        sent = dict.fromkeys(nodes, 0)
        lags: list[tuple[float, int]] = []
        rss_warm: dict[str, int] = {}
        t0 = time.monotonic()
        step = PERIOD / AGENTS
        next_sample = t0
        while (now := time.monotonic()) - t0 < SECONDS:
            for i, node in enumerate(nodes):
                x, y = traffic[i].batch(_classes(i, sent[node]), n=32)
                feeder.publish_message(
                    topics.node_batch(node), RequestBatch(batch_id=sent[node], x=ArrayPayload.from_numpy(x), y=ArrayPayload.from_numpy(y))
                )
                sent[node] += 1
                time.sleep(max(0.0, t0 + (sum(sent.values())) * step - time.monotonic()))
            if now >= next_sample:
                lags.append((now - t0, max(sent[n] - len(collector.predictions[n]) for n in nodes)))
                next_sample = now + 5.0
            if not rss_warm and now - t0 >= WARMUP:
                rss_warm = {n: rss_bytes(agents[n].pid) for n in nodes}
        rss_end = {n: rss_bytes(agents[n].pid) for n in nodes}
        alive = sum(c.alive() for c in agents.values())
        answered = collector.wait_for(lambda: all(len(collector.predictions[n]) >= sent[n] for n in nodes), 60)
        growth = {n: rss_end[n] / rss_warm[n] - 1.0 for n in nodes}
        installed = [(r.node_id, r.message.detail.get("pool", 0)) for r in collector.events if r.message.kind == "helper_installed"]
        discarded = sum(1 for r in collector.events if r.message.kind == "helper_discarded")
        pool_seen = max([p for _, p in installed] + list(metas.max_helpers.values()) + [0])
        late = [lag for at, lag in lags if at >= WARMUP]
        mib = lambda v: v / (1 << 20)  # noqa: E731
        counts = {
            "agents": AGENTS, "seconds": SECONDS, "warmup_s": WARMUP, "batches_sent": sum(sent.values()),
            "batches_answered": sum(len(collector.predictions[n]) for n in nodes), "agents_alive": alive,
            "rss_warm_mib": {"min": mib(min(rss_warm.values())), "max": mib(max(rss_warm.values()))},
            "rss_end_mib": {"min": mib(min(rss_end.values())), "max": mib(max(rss_end.values()))},
            "rss_growth": {"min": min(growth.values()), "max": max(growth.values()), "median": float(np.median(list(growth.values())))},
            "helpers_installed": len(installed), "helpers_discarded": discarded, "pool_max": POOL_MAX,
            "largest_pool_seen": pool_seen, "meta_messages": metas.count,
            "unanswered_batches_max_after_warmup": max(late, default=0), "lag_samples": lags,
        }
        record(
            "soak",
            f"soak: {AGENTS} agents x {SECONDS} s, {counts['batches_sent']} batches, {alive}/{AGENTS} alive; RSS after "
            f"warm-up {counts['rss_warm_mib']['min']:.0f}-{counts['rss_warm_mib']['max']:.0f} MiB, at the end "
            f"{counts['rss_end_mib']['min']:.0f}-{counts['rss_end_mib']['max']:.0f} MiB, growth "
            f"{100 * counts['rss_growth']['min']:+.1f}%..{100 * counts['rss_growth']['max']:+.1f}%; helpers installed "
            f"{len(installed)}, discarded {discarded}, largest pool {pool_seen} (max {POOL_MAX}); unanswered batches "
            f"per agent after warm-up: at most {counts['unanswered_batches_max_after_warmup']}",
            counts,
        )
        assert alive == AGENTS
        assert answered, "some batches were never answered"
        assert max(growth.values()) <= GROWTH, {n: g for n, g in growth.items() if g > GROWTH}
        assert installed and discarded, "the soak never exercised the helper pool"
        assert pool_seen <= POOL_MAX
        assert max(late, default=0) <= MAX_LAG, lags
    finally:
        for child in children:
            child.terminate(20)
