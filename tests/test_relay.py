"""The trusted relay against a real Mosquitto (secure.conf, relay ACL), the real MdS
(`mds.service.MetadataService`), and real nodes (`MqttClient`s with their own certificates).

Every MQTT message the target and the helpers receive is recorded at the wire (chunks included)
and after reassembly; the done-when item is that the helper never sees the target's id and the
target never sees a helper's id: not in a topic, a payload's bytes, a decoded field, nor an MQTT
property. The helpers even name themselves in their `KtBlob`, which the relay must strip.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.properties import Properties

from broker import certs as certs_mod
from broker import topics
from broker.certs import CertSet
from broker.client import ClientSettings, Inbound, MqttClient, Responder
from broker.errors import RemoteError, RequestRejected
from broker.launcher import PrivateMosquitto
from broker.mosquitto import private
from broker.relay import Relay, RelayConfig
from broker.relay import main as relay_main
from broker.topology import kt_channel
from broker.wire import Envelope, KtBlob, KtRequest, NodeMeta, decode
from mds.service import MetadataService
from mds.store import NodeStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not (shutil.which("mosquitto") or os.access("/usr/sbin/mosquitto", os.X_OK)) or not shutil.which("openssl"),
        reason="needs mosquitto and openssl (Debian packages 'mosquitto', 'openssl')",
    ),
]

# Ids that cannot occur by chance in an envelope (a field is even called `target`).
TARGET = "n-tgt-7f3a"
HELPER_A = "n-hlp-a91c"  # the better match for the target
HELPER_B = "n-hlp-b27d"
SPY = "n-spy-c05e"
#: Above the 256 KiB chunk size: the blob crosses both hops in chunks.
BLOB = os.urandom(600_000)
CLASSES = [2, 3]
#: A class the target has seen a little of and no helper at all.
UNKNOWN_CLASS = 4
TARGET_HIST = [5.0, 5.0, 1.0, 1.0, 1.0]


class Recording(MqttClient):
    """An `MqttClient` that records every MQTT message it receives, at the wire (chunks included)
    and once reassembled, as (topic, payload, properties)."""

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self.wire: list[tuple[str, bytes, Properties | None]] = []
        self.whole: list[tuple[str, bytes, Properties | None]] = []
        # Tap the two stages of the client's receiver: each MQTT message, each whole message.
        receiver = self._receiver
        handle, deliver = receiver.handle, receiver.deliver

        def on_wire(topic: str, payload: bytes, props: Properties | None, *args: Any) -> None:
            self.wire.append((topic, payload, props))
            handle(topic, payload, props, *args)

        def on_whole(topic: str, message: Envelope, payload: bytes, props: Properties | None, *args: Any, **kw: Any) -> None:
            self.whole.append((topic, payload, props))
            deliver(topic, message, payload, props, *args, **kw)

        receiver.handle, receiver.deliver = on_wire, on_whole  # type: ignore[method-assign]

    def forget(self) -> None:
        self.wire.clear()
        self.whole.clear()


def leaks(client: Recording, secret: str) -> list[str]:
    """Where `secret` appears in what `client` received."""
    raw = secret.encode()
    found = []
    for where, records in (("wire", client.wire), ("whole", client.whole)):
        for topic, payload, props in records:
            if secret in topic:
                found.append(f"{where}: topic {topic}")
            if raw in payload:
                found.append(f"{where}: payload bytes on {topic}")
            for name in props.json() if props is not None else ():
                value = getattr(props, name)
                if (raw in value) if isinstance(value, bytes) else (secret in str(value)):
                    found.append(f"{where}: property {name} on {topic}")
            try:
                fields = decode(payload, max_bytes=1 << 24).model_dump()
            except Exception:  # noqa: BLE001 - a status payload, say: its bytes were searched above
                continue
            if secret in repr(fields):
                found.append(f"{where}: decoded {fields.get('type')} on {topic}")
    return found


# --- the fleet: broker, MdS, helpers, target --------------------------------------------------


class Helper:
    """A helper node answering KT requests; `mode` is `ok`, `slow` (answers after `delay` s) or
    `reject`. It names itself in its blob envelope and its errors, which the relay must strip."""

    def __init__(self, broker: PrivateMosquitto, certs: CertSet, node_id: str, hist: list[float]) -> None:
        self.node_id = node_id
        self.mode = "ok"
        self.delay = 0.0
        self.requests: list[KtRequest] = []
        self.client = node(broker, certs, node_id, hist)
        self.client.subscribe(topics.node_kt(node_id))
        self.responder = Responder(self.client, self._serve)

    def _serve(self, request: KtRequest, item: Inbound) -> KtBlob:
        self.requests.append(request)
        if self.mode == "reject":
            raise RequestRejected("rejected", f"{self.node_id} has too little data")
        if self.mode == "slow":
            time.sleep(self.delay)
        return KtBlob(corr=item.corr or "none", blob=BLOB, helper=self.node_id, count=7)


def node(broker: PrivateMosquitto, certs: CertSet, node_id: str, hist: list[float]) -> Recording:
    client = Recording(
        ClientSettings(
            client_id=node_id,
            host=broker.host,
            port=broker.port,
            status_node_id=node_id,
            reconnect_min_delay=0.05,
            **certs.client_kwargs(node_id),
        )
    )
    client.set_retained(topics.node_meta(node_id), NodeMeta(node_id=node_id, arch_id="mlp", lineage="b0", hist=hist))
    return client


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, Any]]:
    directory = tempfile.mkdtemp(prefix="clue-test-certs-")  # 0755 parents: mosquitto reads these
    certs = certs_mod.generate(directory, nodes=[TARGET, HELPER_A, HELPER_B, SPY], roles=["mds", "relay"])
    broker = private("secure.conf", certs=certs, topology="relay").start()
    store = NodeStore(":memory:")
    mds_client = MqttClient(ClientSettings(client_id="mds", host=broker.host, port=broker.port, **certs.client_kwargs("mds")))
    service = MetadataService(mds_client, store).start()
    helpers = {
        HELPER_A: Helper(broker, certs, HELPER_A, [4.0, 4.0, 2.0, 2.0, 0.0]),
        HELPER_B: Helper(broker, certs, HELPER_B, [1.0, 1.0, 5.0, 5.0, 0.0]),
    }
    target = node(broker, certs, TARGET, TARGET_HIST)
    spy = Recording(ClientSettings(client_id=SPY, host=broker.host, port=broker.port, **certs.client_kwargs(SPY)))
    spy.subscribe(f"{topics.PREFIX}/#")  # granted, but the ACL delivers none of the others' topics
    clients = [mds_client, *(h.client for h in helpers.values()), target, spy]
    try:
        for c in clients:
            c.start()
        for h in helpers.values():
            h.responder.start()
        assert all(c.wait_subscribed(10) for c in clients)
        deadline = time.monotonic() + 10
        while store.count(online=True) < 3:
            assert time.monotonic() < deadline, "the MdS never saw the fleet online"
            time.sleep(0.02)
        yield {"broker": broker, "certs": certs, "helpers": helpers, "target": target, "spy": spy}
    finally:
        for h in helpers.values():
            h.responder.stop()
        service.stop()
        for c in clients:
            c.stop()
        store.close()
        broker.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_relay(fleet: dict[str, Any]) -> Iterator[Callable[..., Relay]]:
    """Start a relay of this test's own (own id and share group: no session of another test's
    relay sits in its shared subscription); reset the helpers and the recordings."""
    for h in fleet["helpers"].values():
        h.mode, h.delay = "ok", 0.0
        h.requests.clear()
        h.client.forget()
    fleet["target"].forget()
    fleet["spy"].forget()
    started: list[tuple[Relay, MqttClient]] = []

    def factory(**settings: Any) -> Relay:
        name = f"relay-{uuid.uuid4().hex[:8]}"
        config = RelayConfig(relay_id=name, share_group=name, **settings)
        client = MqttClient(
            ClientSettings(
                client_id=name,
                host=fleet["broker"].host,
                port=fleet["broker"].port,
                reply_topic=topics.relay_reply(name),
                session_expiry=1,
                **fleet["certs"].client_kwargs("relay"),
            )
        )
        relay = Relay(client, config).start()
        client.start()
        assert client.wait_subscribed(10)
        deadline = time.monotonic() + 10
        while relay.stats()["nodes"] < 3:  # the retained metadata of the fleet has arrived
            assert time.monotonic() < deadline, "the relay never got the fleet's metadata"
            time.sleep(0.02)
        started.append((relay, client))
        return relay

    yield factory
    for relay, client in started:
        relay.stop()
        client.stop()


def ask(target: MqttClient, classes: list[int] = CLASSES, timeout: float = 10.0) -> Envelope:
    request = KtRequest(classes=classes, z=0.3, arch_id="mlp", lineage="b0", target=TARGET)
    return target.request(kt_channel("relay"), request, timeout=timeout, retries=0)


# --- tests -----------------------------------------------------------------------------------


def test_relay_passes_the_blob_and_neither_side_learns_the_others_id(fleet: dict[str, Any], start_relay) -> None:
    relay = start_relay()
    target, helpers = fleet["target"], fleet["helpers"]

    reply = ask(target)

    assert isinstance(reply, KtBlob) and reply.blob == BLOB and reply.helper is None and reply.count == 7
    helper = helpers[HELPER_A]  # the MdS's best match answered; B was never asked
    assert len(helper.requests) == 1 and helpers[HELPER_B].requests == []
    forwarded = helper.requests[0]
    assert forwarded.target is None and forwarded.reply_to == topics.relay_reply(relay.config.relay_id)
    assert forwarded.corr != reply.corr and forwarded.classes == CLASSES
    assert len([t for t, *_ in target.wire if t == topics.node_reply(TARGET)]) > 2  # chunked
    assert len([t for t, *_ in helper.client.wire if t == topics.node_kt(HELPER_A)]) == 1

    time.sleep(0.3)
    assert leaks(target, HELPER_A) == [] and leaks(target, HELPER_B) == []
    # The search works: each side does see its own id (in its own topics).
    assert leaks(target, TARGET) and leaks(helper.client, HELPER_A)
    for h in helpers.values():
        assert leaks(h.client, TARGET) == []
    # The ACL: a node subscribed to everything gets none of it.
    assert [t for t, *_ in fleet["spy"].wire if not t.startswith(f"{topics.PREFIX}/node/{SPY}/")] == []
    assert relay.stats()["forwarded"] == 1


def test_relay_tries_the_next_candidate_and_drops_the_late_reply(fleet: dict[str, Any], start_relay) -> None:
    relay = start_relay(helper_timeout=1.0)
    target, helpers = fleet["target"], fleet["helpers"]
    helpers[HELPER_A].mode, helpers[HELPER_A].delay = "slow", 2.0

    reply = ask(target)

    assert isinstance(reply, KtBlob) and reply.blob == BLOB and reply.helper is None
    assert len(helpers[HELPER_A].requests) == 1 and len(helpers[HELPER_B].requests) == 1
    deadline = time.monotonic() + 5
    while relay.stats()["late_replies"] < 1:  # A's blob, after its timeout: dropped by the relay
        assert time.monotonic() < deadline, "the late reply never reached the relay"
        time.sleep(0.02)
    time.sleep(0.3)
    blobs_to_target = [p for t, p, _ in target.whole if t == topics.node_reply(TARGET)]
    assert len(blobs_to_target) == 1
    assert target.stats()["late_replies"] == 0 and target.stats()["duplicate_replies"] == 0
    assert leaks(target, HELPER_A) == [] and leaks(target, HELPER_B) == []


def test_relay_answers_with_typed_errors_that_name_nobody(fleet: dict[str, Any], start_relay) -> None:
    start_relay(helper_timeout=0.5)
    target, helpers = fleet["target"], fleet["helpers"]
    for h in helpers.values():
        h.mode = "reject"
    with pytest.raises(RemoteError) as info:
        ask(target)
    assert info.value.code == "rejected" and "2 helper(s)" in str(info.value)
    with pytest.raises(RemoteError) as info:  # the MdS finds nobody who has seen the class
        ask(target, classes=[UNKNOWN_CLASS])
    assert info.value.code == "no_helpers"
    time.sleep(0.2)
    assert leaks(target, HELPER_A) == [] and leaks(target, HELPER_B) == []


def test_relay_without_the_askers_metadata_says_not_found(fleet: dict[str, Any], start_relay) -> None:
    relay = start_relay()
    target = fleet["target"]
    target.clear_retained(topics.node_meta(TARGET))  # the node withdrew its metadata
    try:
        deadline = time.monotonic() + 5
        while relay.stats()["nodes"] > 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(RemoteError) as info:
            ask(target)
        assert info.value.code == "not_found"
    finally:
        target.set_retained(topics.node_meta(TARGET), NodeMeta(node_id=TARGET, arch_id="mlp", lineage="b0", hist=TARGET_HIST))
        deadline = time.monotonic() + 5
        while relay.stats()["nodes"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_relay_holds_at_most_max_transfers(fleet: dict[str, Any], start_relay) -> None:
    relay = start_relay(max_transfers=1, helper_timeout=5.0)
    target, helpers = fleet["target"], fleet["helpers"]
    helpers[HELPER_A].mode, helpers[HELPER_A].delay = "slow", 1.0
    request = KtRequest(classes=CLASSES, z=0.3, arch_id="mlp", lineage="b0")
    first = target.send_request(kt_channel("relay"), request, timeout=10, retries=0)
    deadline = time.monotonic() + 5
    while relay.stats()["active"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = target.send_request(kt_channel("relay"), request, timeout=10, retries=0)
    done, _ = concurrent.futures.wait([first, second], timeout=15)
    assert len(done) == 2
    assert isinstance(first.result(), KtBlob)
    with pytest.raises(RemoteError) as info:
        second.result()
    assert info.value.code == "busy"
    assert relay.stats()["busy"] == 1 and relay.stats()["active"] == 0


def test_relay_drops_a_repeated_request(fleet: dict[str, Any], start_relay) -> None:
    relay = start_relay()
    target = fleet["target"]
    request = KtRequest(classes=CLASSES, z=0.3, arch_id="mlp", lineage="b0", corr="repeat0001")
    future = target.send_request(kt_channel("relay"), request, timeout=10, retries=0)
    assert isinstance(future.result(timeout=15), KtBlob)
    # A QoS 1 redelivery of the same request: no second transfer.
    target.publish_message(topics.relay_kt(), request.evolve(reply_to=topics.node_reply(TARGET)))
    deadline = time.monotonic() + 5
    while relay.stats()["duplicates"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(fleet["helpers"][HELPER_A].requests) == 1


def test_relay_refuses_a_target_that_is_not_the_reply_topics_owner(fleet: dict[str, Any], start_relay) -> None:
    start_relay()
    request = KtRequest(classes=CLASSES, z=0.3, arch_id="mlp", lineage="b0", target=HELPER_B)
    with pytest.raises(RemoteError) as info:
        fleet["target"].request(kt_channel("relay"), request, timeout=5, retries=0)
    assert info.value.code == "bad_request"


def test_clue_relay_refuses_a_bad_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert relay_main(["--candidates", "0"]) == 78
    assert relay_main(["--broker", "ftp://x"]) == 78
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("clue-relay: error: invalid settings: candidates:"), err
    assert err[1].startswith("clue-relay: error: unsupported broker URL scheme in 'ftp://x'"), err


def test_clue_relay_serves_until_sigterm(fleet: dict[str, Any]) -> None:
    """The console script as a process: serves a transfer, then exits 0 on SIGTERM."""
    broker, certs = fleet["broker"], fleet["certs"]
    for h in fleet["helpers"].values():
        h.mode = "ok"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "broker.relay", "--broker", broker.url, "--tls-ca", str(certs.ca),
            "--tls-cert", str(certs.cert("relay")), "--tls-key", str(certs.key("relay")),
            "--relay-id", "cli", "--share-group", "cli", "--log-level", "WARNING",
        ],  # fmt: skip
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = ask(fleet["target"], timeout=1.0)
                break
            except (RemoteError, TimeoutError):  # not up yet, or its metadata cache still filling
                assert time.monotonic() < deadline and proc.poll() is None, "clue-relay never answered"
        assert isinstance(reply, KtBlob) and reply.blob == BLOB
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
