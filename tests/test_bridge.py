"""Request/response across a Mosquitto bridge: a site broker (dev.conf + bridge.conf) bridged over
TLS to a regional broker (secure.conf, relay ACL), the shipped files rendered onto free ports.

A node on the site asks the MdS identity on the regional broker and gets its answer, once, with
`bridge_protocol_version mqttv50` (the v5 properties cross) and with `mqttv311` (they are
stripped, and it still works because the envelope carries `reply_to` and `corr`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from broker import certs as certs_mod
from broker import topics
from broker.certs import CertSet
from broker.client import ClientSettings, Inbound, MqttClient, Responder
from broker.launcher import PrivateMosquitto
from broker.mosquitto import private, render
from broker.wire import Event, HelperList, HelpQuery

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not (shutil.which("mosquitto") or os.access("/usr/sbin/mosquitto", os.X_OK)) or not shutil.which("openssl"),
        reason="needs mosquitto and openssl (Debian packages 'mosquitto', 'openssl')",
    ),
]


@pytest.fixture(scope="module")
def certs() -> Iterator[CertSet]:
    directory = tempfile.mkdtemp(prefix="clue-test-certs-")  # 0755 parents: mosquitto reads these
    try:
        yield certs_mod.generate(directory, nodes=["n1"], roles=["mds", "bridge"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bridged(certs: CertSet, protocol: str) -> tuple[PrivateMosquitto, PrivateMosquitto]:
    """A started regional broker and a started site broker bridged to it."""
    regional = private("secure.conf", certs=certs, topology="relay").start()
    bridge = render(
        "bridge.conf",
        {
            "address": f"127.0.0.1:{regional.port}",
            "bridge_protocol_version": protocol,
            "bridge_cafile": str(certs.ca),
            "bridge_certfile": str(certs.cert("bridge")),
            "bridge_keyfile": str(certs.key("bridge")),
        },
    )
    try:
        site = private("dev.conf", append=bridge).start()
    except BaseException:
        regional.close()
        raise
    return regional, site


def wait_for(client: MqttClient, topic: str, timeout: float = 10.0) -> Inbound:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = client.get(timeout=0.05)
        if isinstance(item, Inbound) and item.topic == topic:
            return item
    raise AssertionError(f"nothing on {topic} within {timeout} s")


@pytest.mark.parametrize("protocol", ["mqttv50", "mqttv311"])
def test_request_response_across_the_bridge(certs: CertSet, protocol: str) -> None:
    regional, site = bridged(certs, protocol)
    seen: list[Inbound] = []

    def answer(query: HelpQuery, item: Inbound) -> HelperList:
        seen.append(item)
        return HelperList(corr=item.corr or "none", candidates=[])

    mds = MqttClient(
        ClientSettings(client_id="mds", host=regional.host, port=regional.port, reconnect_min_delay=0.05, **certs.client_kwargs("mds"))
    )
    mds.subscribe(topics.mds_query_shared())
    node = MqttClient(ClientSettings(client_id="n1", host=site.host, port=site.port, reconnect_min_delay=0.05))
    node.subscribe(topics.node_events("n1"))
    responder = Responder(mds, answer)
    try:
        mds.start()
        node.start()
        assert mds.wait_subscribed(10) and node.wait_subscribed(10)
        # The bridge is up and subscribed on the regional side once a regional message reaches the
        # site: the MdS identity may not write node events, so the bridge identity probes.
        probe = MqttClient(ClientSettings(client_id="probe", host=regional.host, port=regional.port, **certs.client_kwargs("bridge")))
        probe.start()
        try:
            deadline = time.monotonic() + 15
            while True:
                probe.publish_message(topics.node_events("n1"), Event(node_id="n1", kind="state"))
                try:
                    wait_for(node, topics.node_events("n1"), timeout=0.3)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, f"bridge never came up:\n{site.log_tail()}"
        finally:
            probe.stop()
        responder.start()

        query = HelpQuery(node_id="n1", arch_id="mlp", lineage="base0", classes=[1], hist=[0.5, 0.5], k=2)
        reply = node.request(topics.mds_query(), query, timeout=5, retries=0)

        assert isinstance(reply, HelperList)
        assert len(seen) == 1 and seen[0].message.reply_to == topics.node_reply("n1")  # type: ignore[union-attr]
        props = seen[0].properties
        if protocol == "mqttv50":
            assert props.ResponseTopic == topics.node_reply("n1")  # type: ignore[union-attr]
            assert props.CorrelationData == reply.corr.encode()  # type: ignore[union-attr]
        else:  # stripped by the v3.1.1 bridge: the envelope alone carried the way back
            assert not hasattr(props, "ResponseTopic") and not hasattr(props, "CorrelationData")
        time.sleep(0.3)  # no echo of the request or the reply comes round the bridge
        assert responder.handled == 1 and responder.duplicates == 0
        assert node.stats()["duplicate_replies"] == 0 and node.stats()["late_replies"] == 0
    finally:
        responder.stop()
        node.stop()
        mds.stop()
        site.close()
        regional.close()
