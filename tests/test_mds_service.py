"""`MetadataService` and `clue-mds` against a real Mosquitto (one broker of its own per test).

Fake nodes are plain `MqttClient`s that publish a retained `NodeMeta` and own their retained
status (`online` on connect, `offline` on stop or as their will), as agents do.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import topics
from broker.client import Inbound, MqttClient
from broker.errors import RemoteError, RequestTimeout
from broker.launcher import PrivateMosquitto
from broker.wire import ErrorReply, Event, HelperList, HelpQuery, NodeMeta, decode
from mds.cli import MdsSettings
from mds.service import MetadataService
from mds.store import NodeStore
from support import requires_mosquitto, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    requires_mosquitto,
]

REPO = Path(__file__).resolve().parents[1]
ARCH, LINEAGE = "mlp-test", "base-0"


def node_meta(
    node_id: str, hist: list[float], *, arch: str = ARCH, lineage: str = LINEAGE, ts: float | None = None
) -> NodeMeta:
    stamp = {} if ts is None else {"ts": ts}
    return NodeMeta(node_id=node_id, arch_id=arch, lineage=lineage, hist=hist, **stamp)


def query(node_id: str, hist: list[float], classes: list[int] = (), *, k: int = 5, **fields: Any) -> HelpQuery:
    values = {"node_id": node_id, "arch_id": ARCH, "lineage": LINEAGE, "classes": list(classes), "hist": hist, "k": k}
    return HelpQuery(**(values | fields))


def helper_ids(reply: HelperList) -> list[str]:
    return [c.node_id for c in reply.candidates]


class Fleet:
    """Fake nodes, MdS instances and askers on one broker; everything stopped at teardown."""

    def __init__(self, make_client: Callable[..., MqttClient], broker: PrivateMosquitto, uid: str) -> None:
        self.make_client = make_client
        self.broker = broker
        self.uid = uid
        self.services: list[MetadataService] = []
        self.stores: list[NodeStore] = []
        self.clients = 0

    def node(self, name: str, hist: list[float], **kw: Any) -> MqttClient:
        """A node that is online (retained status) with retained metadata."""
        node_id = f"{self.uid}-{name}"
        settings = kw.pop("client", {})
        client = self.make_client(self.broker, client_id=node_id, status_node_id=node_id, start=False, **settings)
        client.set_retained(topics.node_meta(node_id), node_meta(node_id, hist, **kw))
        client.start()
        assert client.wait_connected(10)
        return client

    def offline_node(self, name: str, hist: list[float]) -> None:
        """Retained metadata and an `offline` status, published by someone else."""
        node_id = f"{self.uid}-{name}"
        pub = self.publisher()
        pub.publish_message(topics.node_meta(node_id), node_meta(node_id, hist), 1, retain=True).wait()
        pub.publish(topics.node_status(node_id), topics.STATUS_OFFLINE, 1, True).wait_for_publish(5)

    def publisher(self) -> MqttClient:
        client = self.make_client(self.broker, client_id=self.client_id("pub"))
        assert client.wait_connected(10)
        return client

    def asker(self) -> MqttClient:
        """A client that sends queries (not a node: client ids of its own)."""
        client = self.make_client(self.broker, client_id=self.client_id("ask"), request_timeout=5.0, request_retries=0)
        assert client.wait_subscribed(10)
        return client

    def mds(
        self,
        store: NodeStore | None = None,
        *,
        broker: PrivateMosquitto | None = None,
        name: str = "mds",
        **settings: Any,
    ) -> MetadataService:
        """A started MdS (in-memory store unless given) whose client has subscribed."""
        store = store or NodeStore(":memory:")
        self.stores.append(store)
        client = self.make_client(
            broker or self.broker, client_id=self.client_id(name), start=False, session_expiry=5, clean_start=True
        )
        service = MetadataService(client, store, **settings).start()
        self.services.append(service)
        client.start()
        assert client.wait_subscribed(10)
        return service

    def close(self) -> None:
        for service in self.services:
            service.stop()
            service.client.stop()
        for store in self.stores:
            store.close()

    def id(self, name: str) -> str:
        return f"{self.uid}-{name}"

    def client_id(self, role: str) -> str:
        """A client id of its own: a second client with a node's id would take its session over."""
        self.clients += 1
        return f"{self.uid}-{role}-{self.clients}"


@pytest.fixture
def fleet(make_client: Callable[..., MqttClient], fresh_mosquitto: PrivateMosquitto, unique_id: str) -> Iterator[Fleet]:
    f = Fleet(make_client, fresh_mosquitto, unique_id[-20:].strip("-"))
    yield f
    f.close()


def ask(asker: MqttClient, q: HelpQuery, timeout: float = 5.0) -> HelperList:
    reply = asker.request(topics.mds_query(), q, timeout=timeout, retries=0)
    assert isinstance(reply, HelperList)
    return reply


# --- answers -----------------------------------------------------------------------------------


def test_answers_top_k_of_online_same_arch_and_lineage(fleet: Fleet) -> None:
    fleet.node("same", [9, 1, 0, 0])
    fleet.node("close", [6, 3, 1, 0])
    fleet.node("far", [0, 1, 5, 5])
    fleet.node("other-arch", [9, 1, 0, 0], arch="cnn-test")
    fleet.node("other-lineage", [9, 1, 0, 0], lineage="base-1")
    fleet.node("asker", [9, 1, 0, 0])
    fleet.offline_node("gone", [9, 1, 0, 0])
    service = fleet.mds(shared_group=None)
    wait_until(lambda: service.stats()["online"] == 6 and service.stats()["nodes"] == 7, what="fleet ingested")

    asker = fleet.asker()
    reply = ask(asker, query(fleet.id("asker"), [9, 1, 0, 0], k=5))
    assert helper_ids(reply) == [fleet.id("same"), fleet.id("close"), fleet.id("far")]
    scores = [c.score for c in reply.candidates]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0)
    assert ask(asker, query(fleet.id("asker"), [9, 1, 0, 0], [2], k=1)).candidates[0].node_id == fleet.id("close")
    # The service samples a query's latency once its reply is published, so the asker can hold
    # the second reply a moment before the second sample is counted: wait for it.
    wait_until(lambda: service.stats()["latency_ms"]["count"] == 2, what="both latencies sampled")
    stats = service.stats()
    assert stats["queries"] == stats["answered"] == 2
    assert stats["latency_ms"]["p99"] > 0


def test_offline_node_disappears_by_status_and_by_will(fleet: Fleet) -> None:
    fleet.node("a", [5, 5])
    stopping = fleet.node("stopping", [5, 5])
    # No reconnect during the test: the broker's will is the last word on this one.
    crashing = fleet.node("crashing", [5, 5], client={"reconnect_min_delay": 20, "reconnect_max_delay": 30})
    service = fleet.mds()
    wait_until(lambda: service.stats()["online"] == 3, what="three online")
    asker = fleet.asker()
    everyone = {fleet.id("a"), fleet.id("stopping"), fleet.id("crashing")}
    assert set(helper_ids(ask(asker, query("x", [1, 1])))) == everyone

    stopping.stop()  # publishes `offline`, retained
    crashing.abort_connection()  # the broker publishes the will
    wait_until(lambda: service.stats()["online"] == 1, what="two offline")
    assert helper_ids(ask(asker, query("x", [1, 1]))) == [fleet.id("a")]


def test_two_instances_share_the_queries_each_answered_once(fleet: Fleet) -> None:
    for i in range(3):
        fleet.node(f"n{i}", [i + 1, 1])
    group = f"g{fleet.uid[-8:]}"
    first = fleet.mds(name="mds-1", shared_group=group)
    second = fleet.mds(name="mds-2", shared_group=group)
    for service in (first, second):
        wait_until(lambda s=service: s.stats()["online"] == 3, what="both instances ingested")
    asker = fleet.asker()
    futures = [asker.send_request(topics.mds_query(), query("x", [1, 1]), timeout=10, retries=0) for _ in range(20)]
    replies = [f.result(timeout=15) for f in futures]
    assert all(isinstance(r, HelperList) and len(r.candidates) == 3 for r in replies)
    served = [first.stats()["queries"], second.stats()["queries"]]
    assert sum(served) == 20 and min(served) > 0, served
    stats = asker.stats()
    assert stats["duplicate_replies"] == 0 and stats["late_replies"] == 0


def test_retry_with_the_same_corr_is_answered_from_cache(fleet: Fleet) -> None:
    fleet.node("a", [1, 1])
    service = fleet.mds()
    wait_until(lambda: service.stats()["online"] == 1, what="node online")
    asker = fleet.asker()
    q = query("x", [1, 1], corr="retry-1")
    assert ask(asker, q).corr == "retry-1"
    assert helper_ids(ask(asker, q)) == [fleet.id("a")]
    stats = service.stats()
    assert stats["queries"] == 1 and stats["duplicates"] == 1


def test_restart_rebuilds_from_retained_messages_and_from_disk(fleet: Fleet, tmp_path: Path) -> None:
    for name, hist in [("a", [9, 1]), ("b", [5, 5]), ("c", [1, 9])]:
        fleet.node(name, hist)
    fleet.offline_node("d", [9, 1])
    db = tmp_path / "mds.db"
    first = fleet.mds(NodeStore(db), name="mds-first")
    wait_until(lambda: first.stats()["nodes"] == 4 and first.stats()["online"] == 3, what="first ingested")
    asker = fleet.asker()
    expected = helper_ids(ask(asker, query("x", [9, 1], k=4)))
    assert expected == [fleet.id("a"), fleet.id("b"), fleet.id("c")]
    first.stop()
    first.client.stop()
    first.store.close()

    # From retained messages: a new MdS with an empty store, same broker.
    rebuilt = fleet.mds(name="mds-retained")
    wait_until(lambda: rebuilt.stats()["nodes"] == 4 and rebuilt.stats()["online"] == 3, what="rebuilt from retained")
    assert helper_ids(ask(asker, query("x", [9, 1], k=4))) == expected
    rebuilt.stop()
    rebuilt.client.stop()

    # From disk: the first MdS's file, on a broker that never saw these nodes.
    with PrivateMosquitto() as empty_broker:
        store = NodeStore(db)
        assert store.count() == 4 and store.count(online=True) == 3  # before any message arrives
        fleet.mds(store, broker=empty_broker, name="mds-disk")
        other_asker = fleet.make_client(empty_broker, client_id=fleet.client_id("ask"))
        assert other_asker.wait_subscribed(10)
        assert helper_ids(ask(other_asker, query("x", [9, 1], k=4))) == expected
        fleet.close()


# --- timestamps --------------------------------------------------------------------------------


def test_meta_from_the_future_is_refused_and_the_node_kept(fleet: Fleet) -> None:
    fleet.node("a", [9, 1, 0])
    fleet.node("b", [1, 9, 0])
    service = fleet.mds()
    wait_until(lambda: service.stats()["online"] == 2, what="nodes online")
    asker = fleet.asker()
    a, b = fleet.id("a"), fleet.id("b")
    assert helper_ids(ask(asker, query("x", [9, 1, 0], [0]))) == [a, b]
    pub = fleet.publisher()
    # On the node's own topic (all a broker ACL checks): an empty histogram stamped far ahead.
    pub.publish_message(topics.node_meta(a), node_meta(a, [0, 0, 0], ts=1e18), 1).wait()
    pub.publish_message(topics.node_meta(b), node_meta(b, [1, 9, 0]), 1).wait()  # handled after it
    wait_until(lambda: service.stats()["meta_applied"] == 3, what="the messages handled")
    assert helper_ids(ask(asker, query("x", [9, 1, 0], [0]))) == [a, b]
    np.testing.assert_array_equal(service.store.get(a).hist, [9, 1, 0])
    assert service.stats()["meta_future"] == 1

    # The node's clock stepped back an hour: its news still counts.
    pub.publish_message(topics.node_meta(a), node_meta(a, [0, 1, 9], ts=time.time() - 3600), 1).wait()
    wait_until(lambda: service.stats()["meta_applied"] == 4, what="the older stamp applied")
    assert helper_ids(ask(asker, query("x", [9, 1, 0]))) == [b, a]
    # Ahead by less than the allowance (300 s by default): skew, not forgery.
    pub.publish_message(topics.node_meta(a), node_meta(a, [5, 5, 0], ts=time.time() + 200), 1).wait()
    wait_until(lambda: service.stats()["meta_applied"] == 5, what="a slightly fast clock applied")
    np.testing.assert_array_equal(service.store.get(a).hist, [5, 5, 0])
    assert service.stats()["meta_future"] == 1


def test_clock_skew_allowance_is_a_bounded_setting(fleet: Fleet) -> None:
    service = fleet.mds(max_clock_skew=0)
    pub = fleet.publisher()
    a = fleet.id("a")
    pub.publish_message(topics.node_meta(a), node_meta(a, [1, 1], ts=time.time() + 30), 1).wait()
    wait_until(lambda: service.stats()["meta_future"] == 1, what="30 s ahead refused")
    assert service.store.get(a) is None
    with NodeStore(":memory:") as spare:
        for bad in (-1.0, 86_401.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="max_clock_skew"):
                MetadataService(service.client, spare, max_clock_skew=bad)


# --- bad input -------------------------------------------------------------------------------


def test_bad_queries_get_typed_error_replies(fleet: Fleet) -> None:
    fleet.node("a", [1, 1, 0])
    service = fleet.mds(max_k=4)
    wait_until(lambda: service.stats()["online"] == 1, what="node online")
    asker = fleet.asker()

    def code(q: HelpQuery) -> str:
        with pytest.raises(RemoteError) as info:
            asker.request(topics.mds_query(), q, timeout=5, retries=0)
        return info.value.code

    assert code(query("x", [1, 1, 0], arch_id="unknown-arch", k=2)) == "arch_mismatch"
    assert code(query("x", [1, 1, 0], lineage="unknown", k=2)) == "lineage_mismatch"
    assert code(query("x", [1, 1, 0], k=5)) == "bad_request"  # above max_k
    assert code(query("x", [1, 1, 0], [3], k=2)) == "bad_request"  # no class 3 in this arch
    assert code(query("x", [1, 1], k=2)) == "bad_request"  # histogram of the wrong width
    assert service.stats()["rejected_by_code"] == {"arch_mismatch": 1, "lineage_mismatch": 1, "bad_request": 3}

    # Bytes that do not decode as a HelpQuery are still answered where the v5 properties say.
    probe = fleet.make_client(fleet.broker, client_id=fleet.client_id("probe"))
    reply_topic = topics.node_reply(f"{fleet.uid}-probe-inbox")
    probe.subscribe(reply_topic, decoding="raw")
    assert probe.wait_subscribed(10)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = b"broken-1"
    bad = query("x", [1.0]).model_dump()
    bad["k"] = 0  # out of the wire's range: fails to decode
    probe.publish(topics.mds_query(), msgpack.packb(bad), 1, properties=props)
    item = probe.get(timeout=10)
    assert isinstance(item, Inbound) and item.topic == reply_topic
    error = decode(item.payload, expect=ErrorReply)
    assert (error.code, error.corr) == ("bad_request", "broken-1")
    assert service.stats()["undecodable_queries"] == 1


def test_garbage_does_not_stop_the_service(fleet: Fleet) -> None:
    service = fleet.mds()
    pub = fleet.publisher()
    fleet.node("good", [1, 1])
    fleet.node("other", [1, 1])
    wait_until(lambda: service.stats()["online"] == 2, what="nodes online")
    victim = fleet.id("victim")
    pub.publish(topics.node_meta(victim), b"\xff\x00 not msgpack", 1).wait_for_publish(5)
    pub.publish(topics.node_meta(victim), msgpack.packb({"v": 1, "type": "meta", "hist": [float("nan")]}), 1)
    pub.publish_message(topics.node_meta(victim), Event(node_id=victim, kind="drift"))
    pub.publish_message(topics.node_meta(victim), node_meta(fleet.id("someone-else"), [1, 1]))
    pub.publish(topics.node_status(victim), b"maybe", 1)
    pub.publish_message(topics.node_meta(victim), node_meta(victim, [1, 1, 1]))  # wrong width for its group
    pub.publish(topics.mds_query(), b"\x93garbage", 1)  # no reply topic: nothing to answer
    wait_until(
        lambda: (s := service.stats())["bad_input"] == 5 and s["meta_rejected"] == 1 and s["undecodable_queries"] == 1,
        what="garbage counted",
    )
    assert service.stats()["worker_errors"] == 0
    fleet.node("late", [1, 1])
    wait_until(lambda: service.stats()["online"] == 3, what="a node after the garbage")
    assert len(ask(fleet.asker(), query("x", [1, 1])).candidates) == 3


def test_cleared_retained_meta_removes_the_node(fleet: Fleet) -> None:
    node = fleet.node("a", [1, 1])
    fleet.node("b", [1, 1])
    service = fleet.mds()
    wait_until(lambda: service.stats()["online"] == 2, what="nodes online")
    node.clear_retained(topics.node_meta(fleet.id("a")))
    wait_until(lambda: service.stats()["nodes"] == 1, what="node removed")
    assert helper_ids(ask(fleet.asker(), query("x", [1, 1]))) == [fleet.id("b")]


# --- the daemon --------------------------------------------------------------------------------


def run_mds(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mds", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ask_daemon(
    proc: subprocess.Popen, asker: MqttClient, q: HelpQuery, count: int, timeout: float = 30.0
) -> HelperList:
    """Ask until the answer names `count` helpers: the daemon needs a moment to import, subscribe
    and read the retained metadata."""
    deadline = time.monotonic() + timeout
    reply: HelperList | None = None
    while reply is None or len(reply.candidates) != count:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"the daemon never named {count} helpers; last answer {reply}"
        try:
            reply = asker.request(topics.mds_query(), q, timeout=1.0, retries=0)
        except (RequestTimeout, RemoteError):
            time.sleep(0.05)
    return reply


def stop_daemon(proc: subprocess.Popen) -> str:
    """SIGTERM, expect exit 0; its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return err


def test_daemon_answers_and_exits_zero_on_sigterm(fleet: Fleet, tmp_path: Path) -> None:
    fleet.node("a", [3, 1])
    fleet.node("b", [1, 3])
    db = str(tmp_path / "mds.db")
    client_id = fleet.client_id("daemon")
    proc = run_mds("--broker", fleet.broker.url, "--db", db, "--client-id", client_id, "--stats-interval", "0")
    try:
        reply = ask_daemon(proc, fleet.asker(), query("x", [3, 1]), 2)
        assert helper_ids(reply) == [fleet.id("a"), fleet.id("b")]
        assert "final stats" in stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_daemon_restarts_do_not_keep_a_future_stamp(fleet: Fleet, tmp_path: Path) -> None:
    a, b = fleet.id("a"), fleet.id("b")
    db = tmp_path / "mds.db"
    # The file as an older version left it after a forged meta: node a pinned with an empty histogram.
    with NodeStore(db) as store:
        store.upsert_meta(node_meta(a, [0, 0], ts=1e18))
        store.set_online(a, True)
    fleet.node("a", [9, 1])
    fleet.node("b", [1, 9])
    asker = fleet.asker()
    args = ("--broker", fleet.broker.url, "--db", str(db), "--stats-interval", "0")
    proc = run_mds(*args, "--client-id", fleet.client_id("daemon"), env={"CLUE_MDS_MAX_CLOCK_SKEW": "120"})
    try:
        assert helper_ids(ask_daemon(proc, asker, query("x", [9, 1]), 2)) == [a, b]
        # The forged meta again, now retained in place of the node's own; then a node to wait for,
        # handled after it.
        pub = fleet.publisher()
        pub.publish_message(topics.node_meta(a), node_meta(a, [0, 0], ts=1e18), 1, retain=True).wait()
        fleet.node("c", [5, 5])
        assert helper_ids(ask_daemon(proc, asker, query("x", [9, 1]), 3)) == [a, fleet.id("c"), b]
        assert "ahead of this MdS's clock" in stop_daemon(proc)

        # Restarted on the same file: the broker's retained copy is the forged one, refused again.
        proc = run_mds(*args, "--client-id", fleet.client_id("daemon"), "--max-clock-skew", "120")
        ask_daemon(proc, asker, query("x", [9, 1]), 3)
        fleet.node("d", [1, 1])
        assert helper_ids(ask_daemon(proc, asker, query("x", [9, 1]), 4))[0] == a
        stop_daemon(proc)
        with sqlite3.connect(db) as con:
            stamp = con.execute("SELECT meta_ts FROM nodes WHERE node_id = ?", (a,)).fetchone()[0]
        assert stamp < time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_clock_skew_setting_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLUE_MDS_MAX_CLOCK_SKEW", raising=False)
    assert MdsSettings.from_argv([]).max_clock_skew == 300.0
    monkeypatch.setenv("CLUE_MDS_MAX_CLOCK_SKEW", "60")
    assert MdsSettings.from_argv([]).max_clock_skew == 60.0
    assert MdsSettings.from_argv(["--max-clock-skew", "5"]).max_clock_skew == 5.0


def test_no_shared_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--no-shared` takes no value; its variable, as every other option's, is `CLUE_MDS_*`."""
    monkeypatch.delenv("CLUE_MDS_NO_SHARED", raising=False)
    assert MdsSettings.from_argv([]).no_shared is False
    assert MdsSettings.from_argv(["--no-shared"]).no_shared is True
    monkeypatch.setenv("CLUE_MDS_NO_SHARED", "true")
    assert MdsSettings.from_argv([]).no_shared is True


@pytest.mark.parametrize(
    "args, env",
    [
        (["--bogus"], {}),
        (["--similarity", "euclid"], {}),
        (["--max-k", "500"], {}),
        ([], {"CLUE_MDS_SIMILARITY": "euclid"}),
        (["--db", "/nonexistent-dir/mds.db"], {}),
        (["--max-clock-skew", "-1"], {}),
        ([], {"CLUE_MDS_MAX_CLOCK_SKEW": "1e9"}),
    ],
    ids=["unknown-flag", "bad-similarity", "bad-max-k", "bad-env", "unopenable-db", "bad-skew", "bad-skew-env"],
)
def test_daemon_bad_config_exits_78(args: list[str], env: dict[str, str]) -> None:
    proc = run_mds("--broker", "mqtt://127.0.0.1:1", *args, env=env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 78, err
    assert "clue-mds: error:" in err
