"""MdS helper query, end to end through a private Mosquitto, against a plain MQTT round trip.

A server process holds a ``MetadataService`` (set up as ``clue-mds`` sets it up) over a
``NodeStore`` filled directly with N synthetic nodes (30 % of them have seen the asked classes
8–9), and an echo responder that answers the same ``HelpQuery`` on its own topic with a
``HelperList`` of the same candidates — the same bytes both ways, without the store. The bench
process asks both with ``MqttClient.request``, alternately, and reports p50/p99 round-trip
latency. The ratio MdS ÷ echo is the MdS's own cost on top of the bus.

Two bus set-ups, each on its own broker: ``shipped`` (``PrivateMosquitto()`` defaults, as
``clue-sim`` runs it: persistence with a save after every change; clients as ``MqttClient``
makes them) and ``tuned``, a diagnostic: persistence off and TCP_NODELAY on every client socket.
On this box a shipped round trip takes ~90 ms: ~80 ms of Nagle's algorithm on the clients'
sockets waiting for delayed ACKs (a reply or a PUBACK queued behind an unacknowledged small
write), ~10 ms of the broker saving its database after each QoS 1 message. The targets are
judged on ``shipped``. Targets: p99 ≤ 2 ms at 10k nodes, ≤ 5 ms at 100k.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from bench.common import interleave, paired_ratio, parse_args, set_nodelay, stats, summary_row, table, write_json
from broker import topics
from broker.client import ClientSettings, MqttClient, Responder
from broker.launcher import PrivateMosquitto
from broker.wire import Candidate, HelperList, HelpQuery, NodeMeta
from mds.service import MetadataService
from mds.store import NodeStore

ARCH, LINEAGE = "bench-arch", "bench-lineage"
ASKER = "bench-asker"
# The echo plays a node: its KT topic is a real CLUE topic, so the broker routes it like the others.
ECHO_NODE = "bench-echo"
CLASSES = [8, 9]
K = 3
HELPER_SHARE = 0.3
P99_TARGET_MS = {10_000: 2.0, 100_000: 5.0}

# A shipped round trip takes ~90 ms (see the module docstring), so repetitions are few.
PLANS = {True: {"sizes": (1_000, 10_000), "reps": 100, "warmup": 10},
         False: {"sizes": (1_000, 10_000, 100_000), "reps": 500, "warmup": 30}}
BUSES = {"shipped": {"persistence": True, "nodelay": False}, "tuned": {"persistence": False, "nodelay": True}}


def query() -> HelpQuery:
    hist = [100.0] * 8 + [25.0, 25.0]
    return HelpQuery(node_id=ASKER, arch_id=ARCH, lineage=LINEAGE, classes=CLASSES, hist=hist, k=K)


def fill(store: NodeStore, n: int, seed: int) -> None:
    """N online nodes of one arch and lineage; a share of them has seen classes 8–9."""
    rng = np.random.default_rng(seed)
    hists = rng.integers(50, 500, size=(n, 10)).astype(np.float64)
    hists[rng.random(n) >= HELPER_SHARE, 8:] = 0.0
    for i, row in enumerate(hists):
        node = f"n{i:06d}"
        store.upsert_meta(NodeMeta(node_id=node, arch_id=ARCH, lineage=LINEAGE, hist=row.tolist(), ts=1.0))
        store.set_online(node, True)


def serve(host: str, port: int, n: int, nodelay: bool, conn: Connection) -> None:
    """The server process: MdS + echo until told to stop; sends back the MdS's own stats."""
    store = NodeStore(":memory:")
    fill(store, n, seed=n)
    q = query()
    candidates = [Candidate(node_id=m.node_id, score=m.score, classes=list(m.classes)) for m in store.query(ASKER, ARCH, LINEAGE, CLASSES, q.hist, K)]
    mds_client = MqttClient(ClientSettings(client_id="bench-mds", host=host, port=port, session_expiry=30, clean_start=True,
                                           inbox_size=100_000, name="clue-mds"))
    service = MetadataService(mds_client, store).start()
    mds_client.start()
    echo_client = MqttClient(ClientSettings(client_id=ECHO_NODE, host=host, port=port, clean_start=True))
    echo_client.subscribe(topics.node_kt(ECHO_NODE), 1)
    echo = Responder(echo_client, lambda request, item: HelperList(corr=item.corr, candidates=candidates)).start()
    echo_client.start()
    ready = mds_client.wait_subscribed(30) and echo_client.wait_subscribed(30)
    if nodelay:
        set_nodelay(mds_client)
        set_nodelay(echo_client)
    conn.send({"ready": ready, "candidates": len(candidates)})
    conn.recv()
    conn.send(service.stats())
    service.stop()
    echo.stop()
    for client in (mds_client, echo_client):
        client.stop()
    store.close()


def measure(broker: PrivateMosquitto, n: int, *, nodelay: bool, reps: int, warmup: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    server = ctx.Process(target=serve, args=(broker.host, broker.port, n, nodelay, there), daemon=True)
    server.start()
    asker = MqttClient(ClientSettings(client_id=ASKER, host=broker.host, port=broker.port, clean_start=True))
    asker.start()
    try:
        if not here.poll(600) or not here.recv()["ready"]:
            raise RuntimeError(f"the MdS server process for N={n} did not come up")
        if not asker.wait_subscribed(30):
            raise RuntimeError("the asking client could not subscribe")
        if nodelay:
            set_nodelay(asker)
        q = query()
        replies: dict[str, int] = {}

        def ask(topic: str, name: str):
            def call() -> None:
                reply = asker.request(topic, q, timeout=5.0, retries=0)
                replies[name] = len(reply.candidates)
            return call

        samples = interleave({"echo": ask(topics.node_kt(ECHO_NODE), "echo"), "mds": ask(topics.mds_query(), "mds")},
                             reps=reps, warmup=warmup)
        if replies["echo"] != replies["mds"]:
            raise RuntimeError(f"echo answered {replies['echo']} candidates, the MdS {replies['mds']}")
        here.send("stop")
        service_stats = here.recv() if here.poll(30) else {}
    finally:
        asker.stop()
        server.join(30)
        if server.is_alive():
            server.terminate()
    echo, mds = stats(samples["echo"], 1e3), stats(samples["mds"], 1e3)
    return {
        "nodes": n,
        "nodelay": nodelay,
        "candidates": replies["mds"],
        "echo_ms": echo,
        "mds_ms": mds,
        "ratio_p50": paired_ratio(samples["mds"], samples["echo"]),
        "ratio_p99": mds["p99"] / echo["p99"],
        "mds_service": {k: service_stats.get(k) for k in ("latency_ms", "query_ms", "answered", "rejected")},
    }


def run(quick: bool) -> dict[str, Any]:
    plan = PLANS[quick]
    results = []
    for bus, cfg in BUSES.items():
        with PrivateMosquitto(persistence=cfg["persistence"]) as broker:
            for n in plan["sizes"]:
                r = measure(broker, n, nodelay=cfg["nodelay"], reps=plan["reps"], warmup=plan["warmup"])
                results.append({"bus": bus, **r})
    rows = []
    for r in results:
        target = P99_TARGET_MS.get(r["nodes"])
        q_ms = r["mds_service"]["query_ms"] or {}
        rows.append([r["bus"], r["nodes"], round(r["echo_ms"]["p50"], 3), round(r["echo_ms"]["p99"], 3),
                     round(r["mds_ms"]["p50"], 3), round(r["mds_ms"]["p99"], 3), round(r["ratio_p50"], 2),
                     round(r["ratio_p99"], 2), round(q_ms.get("p50", float("nan")), 3), round(q_ms.get("p99", float("nan")), 3),
                     f"≤ {target}" if target else "—", r["mds_ms"]["p99"] <= target if target else None])
    print(table(["bus", "nodes", "echo p50 ms", "echo p99 ms", "MdS p50 ms", "MdS p99 ms", "÷ echo p50", "÷ echo p99",
                 "store p50 ms", "store p99 ms", "p99 target ms", "met"], rows))
    summary = []
    for n in plan["sizes"]:
        target = P99_TARGET_MS.get(n)
        shipped = next(r for r in results if r["bus"] == "shipped" and r["nodes"] == n)
        tuned = next(r for r in results if r["bus"] == "tuned" and r["nodes"] == n)
        summary.append(summary_row(
            f"MdS query p99, {n:,} nodes", "—", f"p99 ≤ {target} ms" if target else "—",
            f"shipped p99 {shipped['mds_ms']['p99']:.1f} ms ({shipped['ratio_p50']:.2f}× echo); "
            f"tuned bus p99 {tuned['mds_ms']['p99']:.2f} ms ({tuned['ratio_p50']:.2f}× echo)",
            shipped["mds_ms"]["p99"] <= target if target else None,
        ))
    path = write_json("mds_query", quick=quick, settings={**plan, "buses": BUSES, "classes": CLASSES, "k": K,
                                                          "helper_share": HELPER_SHARE},
                      results=results, summary=summary)
    print(f"\nwritten {path}")
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
