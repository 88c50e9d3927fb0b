"""A long-running agent's bookkeeping stays flat (issue 8/13).

The agent kept every batch's timings in lists it never trimmed (hundreds of MB a day at 100
batches/s), and its KT responder cached up to 1,024 whole blobs (≈0.5 GB for the MLP).
"""

from __future__ import annotations

import time
import tracemalloc

import pytest
import torch

from agent.daemon import AgentDaemon
from agent.learner import BatchResult
from agent.settings import load_settings
from broker import topics
from broker.client import Inbound, Responder
from broker.wire import KtBlob, KtRequest


def test_100k_batches_of_daemon_accounting_keep_memory_flat(tmp_path):
    daemon = AgentDaemon(load_settings(node_id="ledger", state_dir=str(tmp_path)))
    result = BatchResult(batch_index=0, y_hat=torch.zeros(1, dtype=torch.int64), timings={"predict": 0.002, "train": 0.008})
    tracemalloc.start()
    try:
        for _ in range(10_000):
            daemon._account(result)
        warm, _ = tracemalloc.get_traced_memory()
        for _ in range(90_000):
            daemon._account(result)
        grown = tracemalloc.get_traced_memory()[0] - warm
    finally:
        tracemalloc.stop()
    stats = daemon.stats()
    assert stats["batch_n"] == 100_000 and stats["batch_ms"] == pytest.approx(10.0)
    assert grown < 16 << 10, f"90,000 more batches grew the accounting by {grown} bytes"


@pytest.mark.integration
def test_the_reply_cache_is_bounded_by_bytes(mosquitto, make_client, unique_id):
    client = make_client(mosquitto, client_id=unique_id)
    assert client.wait_connected(10)
    calls = []

    def handler(request, item):
        calls.append(request.corr)
        return KtBlob(corr=request.corr, blob=bytes(1 << 20))

    responder = Responder(client, handler, cache_bytes=3 << 20)
    reply_to = topics.node_reply(unique_id)

    def request(corr: str) -> Inbound:
        message = KtRequest(classes=[1], z=0.5, arch_id="a", lineage="l", reply_to=reply_to, corr=corr)
        return Inbound(topics.node_kt(unique_id), message, b"", None, time.time())

    for i in range(20):
        responder.handle(request(f"c{i}"))
    assert responder.cached_bytes <= 3 << 20 and len(calls) == 20
    responder.handle(request("c19"))  # a retry of a recent request: answered from the cache
    responder.handle(request("c0"))  # a retry of an old one: evicted, the handler runs again
    assert responder.duplicates == 1 and calls[-1] == "c0" and len(calls) == 21
