"""`secure.conf` with the generated CA and the generated ACLs, against a real Mosquitto.

Done-when items of the bus shown here: TLS with the generated CA (and nothing else gets in); in
both topologies a rogue node (valid certificate, another node's id in its topics) can neither read
another node's reply topic nor publish its meta or status; every identity gets exactly the access
of the table in this file, written from the issue (not from `broker.topology`), so the table, the
generated ACL files and Mosquitto's enforcement are checked against each other.

Mosquitto 2.0.11's file ACL never refuses a subscription: what a client may not read is dropped at
delivery, so reads are tested by "never arrives" after a fence message that did arrive. A denied
QoS 1 publish gets PUBACK reason 0x87.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import acl, topics
from broker import certs as certs_mod
from broker.certs import CertSet
from broker.client import MqttClient, Responder
from broker.errors import TopicError
from broker.launcher import PrivateMosquitto
from broker.mosquitto import CONF_DIR, acl_file_name, private, render
from broker.topology import kt_channel
from broker.wire import HelperList, HelpQuery, NodeMeta, decode, encode
from mds.service import MetadataService
from mds.store import NodeStore
from support import requires_mosquitto, requires_openssl, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    requires_mosquitto,
    requires_openssl,
]

NOT_AUTHORIZED = 0x87
#: PUBACK of an accepted publish that nobody was subscribed to.
NO_SUBSCRIBERS = 0x10
NODES = ("victim", "rogue", "other")


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs() -> Iterator[CertSet]:
    # Not pytest's tmp_path: its parents are 0700, and mosquitto reads the files as its own user.
    directory = tempfile.mkdtemp(prefix="clue-test-certs-")
    try:
        yield certs_mod.generate(directory, nodes=NODES)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", params=["relay", "direct"])
def secure(request: pytest.FixtureRequest, certs: CertSet) -> Iterator[PrivateMosquitto]:
    """A broker running secure.conf with the ACL of the parametrized topology."""
    with private("secure.conf", certs=certs, topology=request.param) as broker:
        broker.topology = request.param  # type: ignore[attr-defined]
        yield broker


class Raw:
    """A bare paho v5 client over TLS that records PUBACK reason codes and every message (retained
    ones apart: they are state left by earlier tests on the module's broker)."""

    def __init__(self, broker: PrivateMosquitto, certs: CertSet, identity: str, suffix: str, *, will: str | None = None):
        self.identity = identity
        self.pubacks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{identity}-{suffix}", protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(certs.ca), certfile=str(certs.cert(identity)), keyfile=str(certs.key(identity)))
        self.client.on_connect = lambda c, u, f, rc, p: rc.is_failure or self.connected.set()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        if will is not None:
            self.client.will_set(will, b"offline", 1, True)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{identity} could not connect"

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: mqtt.ReasonCode, props: object) -> None:
        with self._lock:
            self.pubacks[mid] = rc.value

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic_filter, 1)
        assert done.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        """Publish at QoS 1; return the mid (see `puback`)."""
        return self.client.publish(topic, payload, 1).mid

    def puback(self, mid: int, timeout: float = 10.0) -> int:
        wait_until(lambda: mid in self.pubacks, timeout, f"PUBACK {mid} for {self.identity}")
        return self.pubacks[mid]

    def received(self) -> list[tuple[str, bytes]]:
        """Messages delivered live (not retained state), as (topic, payload)."""
        with self._lock:
            return [(t, p) for t, p, retained in self.messages if not retained]

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker then publishes the will)."""
        self.client.loop_stop()
        self.client.socket().close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw(secure: PrivateMosquitto, certs: CertSet) -> Iterator[Callable[..., Raw]]:
    made: list[Raw] = []

    def factory(identity: str, suffix: str = "raw", **kw: object) -> Raw:
        made.append(Raw(secure, certs, identity, suffix, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield factory
    for r in made:
        r.close()


def tls_client(broker: PrivateMosquitto, certs: CertSet, identity: str, **kw: object) -> MqttClient:
    # A 1 s session: no offline session of one test lingers in a shared group of the next.
    return MqttClient.from_url(
        broker.url,
        client_id=identity,
        session_expiry=1,
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.5,
        **certs.client_kwargs(identity),
        **kw,
    )


def meta(node: str, hist: list[float]) -> NodeMeta:
    return NodeMeta(node_id=node, arch_id="mlp", lineage="base0", hist=hist)


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["relay", "direct"])
def test_shipped_acl_files_are_generated_from_the_tables(topology: str) -> None:
    assert (CONF_DIR / acl_file_name(topology)).read_text() == acl.acl_text(topology)  # type: ignore[arg-type]
    assert acl.main(["--check"]) == 0


def test_render_swaps_option_values_and_refuses_unknown_options() -> None:
    text = render("secure.conf", {"listener": "{port} 127.0.0.1", "log_type": ["all"]})
    assert "\nlistener {port} 127.0.0.1\n" in text and "listener 8883" not in text
    assert text.count("log_type") == 1
    with pytest.raises(KeyError):
        render("dev.conf", {"cafile": "/x"})


def test_kt_channel_maps_the_mode_to_a_topic() -> None:
    assert kt_channel("direct", "h1") == topics.node_kt("h1")
    assert kt_channel("relay", "h1") == kt_channel("relay") == topics.relay_kt()
    with pytest.raises(TopicError):
        kt_channel("direct")
    with pytest.raises(ValueError):
        kt_channel("mesh")  # type: ignore[arg-type]


def test_certs_refuse_reserved_node_ids_and_keep_keys_private(certs: CertSet) -> None:
    for bad in ("mds", "relay", "server", "ca", "a/b"):
        with pytest.raises(ValueError):
            certs_mod.generate(certs.directory, nodes=[bad])
    for identity in NODES:
        assert certs.key(identity).stat().st_mode & 0o777 == 0o600
    assert (certs.directory / "ca.key").stat().st_mode & 0o777 == 0o600
    assert certs.server_key.stat().st_mode & 0o777 == 0o600
    if os.geteuid() == 0:  # handed to the user mosquitto drops to, or it could not read it
        assert certs.server_key.stat().st_uid != 0


def test_make_certs_adds_to_the_same_ca(certs: CertSet) -> None:
    before = certs.ca.read_bytes()
    assert certs_mod.main([str(certs.directory), "--nodes", "late-node", "--roles", ""]) == 0
    assert certs.ca.read_bytes() == before
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs.ca), str(certs.cert("late-node"))], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(certs.cert("late-node"))], capture_output=True, text=True
    )
    assert "CN = late-node" in subject.stdout


# --- TLS -------------------------------------------------------------------------------------


def test_tls_with_the_generated_ca(secure: PrivateMosquitto, certs: CertSet, make_client) -> None:
    """Request/response between a node and the MdS identity works over TLS; a client without a
    certificate, one with a certificate of another CA, and one that does not trust our CA fail."""
    assert secure.url.startswith("mqtts://")
    mds = tls_client(secure, certs, "mds")
    mds.subscribe(topics.mds_query())
    responder = Responder(mds, lambda q, item: HelperList(corr=item.corr or "x", candidates=[])).start()
    node = tls_client(secure, certs, "other")
    try:
        mds.start()
        node.start()
        assert mds.wait_subscribed(10) and node.wait_subscribed(10)
        query = HelpQuery(node_id="other", arch_id="mlp", lineage="base0", classes=[1], hist=[1.0, 0.0])
        assert isinstance(node.request(topics.mds_query(), query, timeout=5), HelperList)
    finally:
        responder.stop()
        node.stop()
        mds.stop()

    stranger_dir = tempfile.mkdtemp(prefix="clue-test-stranger-")
    try:
        stranger = certs_mod.generate(stranger_dir, nodes=["victim"], roles=[], broker_key_owner=None)
        attempts = {
            "no client certificate": {"tls_ca": certs.ca},
            "certificate of another CA": {"tls_ca": certs.ca, "tls_cert": stranger.cert("victim"), "tls_key": stranger.key("victim")},
            "broker not trusted": stranger.client_kwargs("victim"),
        }
        # What Mosquitto logs when it (or, for the last, the client) breaks off each handshake.
        refusals = {
            "no client certificate": "peer did not return a certificate",
            "certificate of another CA": "certificate verify failed",
            "broker not trusted": "alert unknown ca",
        }
        mark = secure.log_path.stat().st_size

        def logged() -> str:
            with open(secure.log_path, "rb") as log:
                log.seek(mark)
                return log.read().decode(errors="replace")

        clients = {
            why: make_client(secure, client_id=f"victim-{i}", tls=True, **kw) for i, (why, kw) in enumerate(attempts.items())
        }
        wait_until(
            lambda: all(line in logged() for line in refusals.values()),
            what=lambda: f"a refused handshake of each client; the broker logged {logged()[-1500:]!r}",
        )
        for why, client in clients.items():
            assert not client.connected, why
            assert client.stats()["connects"] == 0, why
    finally:
        shutil.rmtree(stranger_dir, ignore_errors=True)


# --- the rogue node --------------------------------------------------------------------------


def test_rogue_node_cannot_read_anothers_reply_nor_publish_its_meta_or_status(
    secure: PrivateMosquitto, certs: CertSet, raw: Callable[..., Raw]
) -> None:
    """A rogue with a valid certificate of its own, in both topologies, against a real MdS."""
    store = NodeStore(":memory:")
    mds = tls_client(secure, certs, "mds")
    service = MetadataService(mds, store, shared_group=None).start()
    victim = tls_client(secure, certs, "victim", status_node_id="victim")
    victim.set_retained(topics.node_meta("victim"), meta("victim", [1.0, 0.0]))
    operator = raw("operator")
    operator.subscribe(topics.all_status())
    operator.subscribe(topics.all_meta())
    rogue = raw("rogue")
    for spy in (topics.node_reply("victim"), f"{topics.PREFIX}/node/+/reply", f"{topics.PREFIX}/#"):
        rogue.subscribe(spy)  # granted: Mosquitto 2.0 filters reads at delivery
    try:
        mds.start()
        victim.start()
        wait_until(lambda: (r := store.get("victim")) is not None and r.online and r.hist is not None, what="victim known")

        # The victim asks the MdS: the answer arrives on the victim's reply topic, not at the rogue.
        query = HelpQuery(node_id="victim", arch_id="mlp", lineage="base0", classes=[0], hist=[1.0, 0.0])
        assert isinstance(victim.request(topics.mds_query(), query, timeout=5), HelperList)

        # The rogue speaks as the victim: refused with 0x87, and nobody hears it.
        spoofed = meta("victim", [0.0, 9.0])
        assert rogue.puback(rogue.publish(topics.node_meta("victim"), encode(spoofed))) == NOT_AUTHORIZED
        assert rogue.puback(rogue.publish(topics.node_status("victim"), topics.STATUS_OFFLINE)) == NOT_AUTHORIZED
        # Its will, naming the victim's status topic, is dropped too when its connection breaks.
        raw("rogue", "will", will=topics.node_status("victim")).abort()
        gone = re.compile(r"Client rogue-will closed its connection|Socket error on client rogue-will")
        wait_until(lambda: gone.search(secure.log_text()) is not None, what="the broker to drop rogue-will")

        # Fence: the victim's own next meta arrives at the operator and the MdS...
        victim.publish_message(topics.node_meta("victim"), meta("victim", [2.0, 0.0]), retain=True).wait(5)
        wait_until(lambda: store.get("victim").hist.tolist() == [2.0, 0.0], what="fence meta at the MdS")
        wait_until(lambda: len(metas(operator)) >= 2, what="fence meta at the operator")
        # ...and the operator's patch of the rogue's own config at the rogue (after the victim's reply)...
        operator.publish(topics.node_config("rogue"), b"fence")
        wait_until(lambda: (topics.node_config("rogue"), b"fence") in rogue.received(), what="fence at the rogue")
        # ...and nothing the rogue sent did: no offline status, no spoofed histogram, no reply.
        assert (topics.node_status("victim"), topics.STATUS_OFFLINE) not in operator.received()
        assert [m.hist for m in metas(operator)] == [[1.0, 0.0], [2.0, 0.0]]
        assert store.get("victim").online
        assert [t for t, _ in rogue.received() if t.startswith(f"{topics.PREFIX}/node/victim/")] == []
        assert service.stats()["meta_rejected"] == 0
    finally:
        service.stop()
        victim.stop()
        mds.stop()
        store.close()


def metas(client: Raw) -> list[NodeMeta]:
    return [decode(p) for t, p in client.received() if t == topics.node_meta("victim")]  # type: ignore[misc]


def test_direct_lets_a_node_ask_another_relay_does_not(secure: PrivateMosquitto, raw: Callable[..., Raw]) -> None:
    """What direct means: writing another node's kt topic (never reading it)."""
    victim = raw("victim")
    victim.subscribe(topics.node_kt("victim"))
    rogue = raw("rogue")
    rogue.subscribe(topics.node_kt("victim"))
    rogue.subscribe(topics.node_kt("rogue"))
    code = rogue.puback(rogue.publish(topics.node_kt("victim"), b"ask"))
    if secure.topology == "direct":  # type: ignore[attr-defined]
        assert code == 0
        wait_until(lambda: (topics.node_kt("victim"), b"ask") in victim.received(), what="direct ask")
    else:
        assert code == NOT_AUTHORIZED
    # Fence: a request the relay forwards to the rogue arrives after anything of the ask would have.
    relay = raw("relay")
    relay.publish(topics.node_kt("rogue"), b"fence")
    wait_until(lambda: rogue.received(), what="fence at the rogue")
    assert rogue.received() == [(topics.node_kt("rogue"), b"fence")]


def test_mds_reads_queries_through_a_shared_subscription(secure: PrivateMosquitto, raw: Callable[..., Raw]) -> None:
    mds = raw("mds")
    mds.subscribe(topics.mds_query_shared("probe"))
    victim = raw("victim")
    assert victim.puback(victim.publish(topics.mds_query(), b"q")) == 0
    wait_until(lambda: (topics.mds_query(), b"q") in mds.received(), what="shared query")


# --- every identity, every topic -------------------------------------------------------------

LEAVES = tuple(topics.NODE_LEAVES)
PROBES = (
    *(f"node/{n}/{leaf}" for n in ("victim", "other") for leaf in LEAVES),
    "mds/query",
    "relay/kt",
    "relay/relay/reply",
    "fleet/config",
    "fl/j/update/victim",
    "fl/j/update/other",
    "fl/j/global",
    "app/app/reply",
    "app/other/reply",
)


def _nodes(*leaves: str) -> set[str]:
    return {f"node/{n}/{leaf}" for n in ("victim", "other") for leaf in leaves}


def expected_access(identity: str, topology: str) -> tuple[set[str], set[str]]:
    """(readable, writable) probes of `identity`, as the issue states them."""
    if identity == "victim":
        read = {f"node/victim/{leaf}" for leaf in ("batch", "labels", "config", "kt", "reply")} | {"fleet/config", "fl/j/global"}
        write = {f"node/victim/{leaf}" for leaf in ("prediction", "meta", "status", "events", "config/ack")}
        write |= {"mds/query", "relay/kt", "relay/relay/reply", "fl/j/update/victim", "app/app/reply", "app/other/reply"}
        if topology == "direct":
            write |= _nodes("kt", "reply")
        return read, write
    # Services; the extras marked "kept" are topics the service itself uses (see broker.acl).
    table: dict[str, tuple[set[str], set[str]]] = {
        "mds": (_nodes("meta", "status") | {"mds/query"}, _nodes("reply") | {"relay/relay/reply", "mds/query"}),
        "relay": (
            {"relay/kt", "relay/relay/reply"} | _nodes("meta"),
            {"mds/query"} | _nodes("kt", "reply") | {"relay/kt", "relay/relay/reply"},
        ),
        "operator": (_nodes("status", "meta", "events", "prediction", "config/ack") | {"fleet/config"}, _nodes("config") | {"fleet/config"}),
        "feeder": (set(), _nodes("batch", "labels")),
        # An application: batches and labels to any node, answers on its own reply topic; it keeps
        # the nodes' `app/+/reply` write, since a deny would take its own reply topic too.
        "app": ({"app/app/reply"}, _nodes("batch", "labels") | {"app/app/reply", "app/other/reply"}),
        # Status too: `clue-sim feed` waits until every node it feeds is online.
        "collector": (_nodes("prediction", "events", "status"), set()),
        "aggregator": ({"fl/j/update/victim", "fl/j/update/other", "fl/j/global"}, {"fl/j/global"}),
        "bridge": (set(PROBES), set(PROBES)),
    }
    return table[identity]


IDENTITIES = ("victim", "mds", "relay", "operator", "feeder", "app", "collector", "aggregator", "bridge")


def test_every_identity_gets_exactly_its_access(secure: PrivateMosquitto, raw: Callable[..., Raw]) -> None:
    topology = secure.topology  # type: ignore[attr-defined]
    full = {p: f"{topics.PREFIX}/{p}" for p in PROBES}

    # Reads: everyone subscribes to everything; the bridge identity (which may write anything)
    # publishes each probe once; each reader must get exactly its readable set.
    readers = {i: raw(i, "r") for i in IDENTITIES}
    for r in readers.values():
        r.subscribe(f"{topics.PREFIX}/#")
    publisher = raw("bridge", "p")
    for p in PROBES:
        assert publisher.puback(publisher.publish(full[p], p.encode())) != NOT_AUTHORIZED, p

    def got(i: str) -> set[str]:
        return {payload.decode() for _, payload in readers[i].received()}

    for i in IDENTITIES:
        wait_until(lambda: got(i) >= expected_access(i, topology)[0], what=f"{i}'s reads")
    # A grace period for a probe delivered where it must not be: no fence reaches every reader
    # (the feeder may read nothing at all).
    time.sleep(0.3)
    for i in IDENTITIES:
        assert got(i) == expected_access(i, topology)[0], f"{i} reads in {topology}"
    for r in readers.values():
        r.close()

    # Writes: each identity publishes each probe at QoS 1 and reads the PUBACK reason code.
    for i in IDENTITIES:
        writer = raw(i, "w")
        mids = {p: writer.publish(full[p]) for p in PROBES}
        codes = {p: writer.puback(mid) for p, mid in mids.items()}
        allowed = {p for p, code in codes.items() if code != NOT_AUTHORIZED}
        assert set(codes.values()) <= {0, NO_SUBSCRIBERS, NOT_AUTHORIZED}
        assert allowed == expected_access(i, topology)[1], f"{i} writes in {topology}"
