"""What each topic takes, and how large, enforced by the bus (ARCHITECTURE.md §4), against a real
Mosquitto.

From a security review: a `KtRequest` published on a node's batch topic was handed to the agent,
which served it; a 31 MB batch sent in 121 chunks was reassembled past the agent's 16 MiB batch
limit; config topics were decoded under the client's general limit instead of 64 KiB; a helper
answered on whatever topic a request named; `mosquitto_pub -m 'z=0.3'` on a config topic
answered `ExtraData`. Each test here failed before the fix.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import topics
from broker.chunking import split
from broker.client import ErrorEvent, Inbound, MqttClient, Responder
from broker.errors import MessageTooLarge, SchemaError, UnknownMessageType, WireError
from broker.launcher import PrivateMosquitto
from broker.wire import (
    ArrayPayload,
    ConfigPatch,
    Event,
    GlobalModel,
    KtBlob,
    KtRequest,
    NamedArray,
    NodeMeta,
    RequestBatch,
    encode,
)
from support import requires_mosquitto, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60), requires_mosquitto]


# --- helpers ---------------------------------------------------------------------------------


def items(client: MqttClient, count: int, timeout: float = 10.0) -> list[Any]:
    """The next `count` inbox items (in arrival order)."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        item = client.get(timeout=max(0.0, deadline - time.monotonic()))
        if item is None:
            raise AssertionError(f"{len(out)} of {count} items arrived at {client.name}: {out}")
        out.append(item)
    return out


def quiet(client: MqttClient, seconds: float = 0.5) -> None:
    """Nothing more arrives within `seconds`."""
    item = client.get(timeout=seconds)
    assert item is None, f"unexpected {item}"


def listener(mosquitto: PrivateMosquitto, make_client, client_id: str, *subscriptions: tuple[str, dict]) -> MqttClient:
    client = make_client(mosquitto, client_id=client_id, start=False)
    for topic_filter, options in subscriptions:
        client.subscribe(topic_filter, 1, **options)
    client.start()
    assert client.wait_subscribed(10)
    return client


def batch_of(nbytes: int, batch_id: int = 1) -> RequestBatch:
    x = np.random.default_rng(batch_id).standard_normal(nbytes // 4).astype(np.float32).reshape(-1, 1)
    return RequestBatch(batch_id=batch_id, x=ArrayPayload.from_numpy(x))


def model_of(nbytes: int, job: str) -> GlobalModel:
    w = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    return GlobalModel(job=job, round=1, samples=1, tensors=[NamedArray(name="w", array=ArrayPayload.from_numpy(w))])


def kt_request(reply_to: str | None = None) -> KtRequest:
    return KtRequest(classes=[3], z=0.3, arch_id="mlp", lineage="base0", reply_to=reply_to, corr="c1" if reply_to else None)


def refused(item: Any, context: str, error: type[BaseException], topic: str) -> bool:
    return isinstance(item, ErrorEvent) and item.context == context and isinstance(item.error, error) and item.topic == topic


# --- each topic takes only its own message types ---------------------------------------------


def test_each_topic_takes_only_its_own_types(mosquitto: PrivateMosquitto, make_client, unique_id: str) -> None:
    """The review's case: a KtRequest on a batch topic reached the agent, which served it. Also
    a chunked message is checked once whole, and a valid one of each kind still comes through."""
    batch_t, kt_t = topics.node_batch(unique_id), topics.node_kt(unique_id)
    node = listener(mosquitto, make_client, unique_id, (batch_t, {}), (kt_t, {}))
    sender = make_client(mosquitto, client_id=f"{unique_id}-x")
    assert sender.wait_connected(10)

    sender.publish_message(batch_t, kt_request(topics.node_reply(f"{unique_id}-x"))).wait()
    sender.publish_message(kt_t, batch_of(64)).wait()
    assert len(sender.publish_message(batch_t, model_of(600_000, unique_id)).infos) == 3  # chunked
    got = items(node, 3)
    assert [(refused(i, "decode", UnknownMessageType, i.topic), i.topic) for i in got] == [
        (True, batch_t), (True, kt_t), (True, batch_t)
    ]
    assert "'kt.request'" in str(got[0].error) and batch_t in str(got[0].error) and "['batch']" in str(got[0].error)
    assert "'batch'" in str(got[1].error) and "['kt.request']" in str(got[1].error)
    assert "'fl.global'" in str(got[2].error)

    batch = batch_of(64, batch_id=2)
    sender.publish_message(batch_t, batch).wait()
    sender.publish_message(kt_t, kt_request()).wait()
    ok = items(node, 2)
    assert [type(i.message) for i in ok if isinstance(i, Inbound)] == [RequestBatch, KtRequest]
    assert ok[0].message == batch
    stats = node.stats()
    assert (stats["type_refused"], stats["decode_errors"], stats["callback_errors"]) == (3, 0, 0)


def test_explicit_accept_overrides_the_topic_default(mosquitto: PrivateMosquitto, make_client, unique_id: str) -> None:
    events = topics.node_events(unique_id)
    node = listener(mosquitto, make_client, unique_id, (events, {"accept": (NodeMeta,)}))
    sender = make_client(mosquitto, client_id=f"{unique_id}-x")
    assert sender.wait_connected(10)
    meta = NodeMeta(node_id=unique_id, arch_id="mlp", lineage="b", hist=[1.0])
    sender.publish_message(events, Event(node_id=unique_id, kind="drift")).wait()
    sender.publish_message(events, meta).wait()
    first, second = items(node, 2)
    assert refused(first, "decode", UnknownMessageType, events) and "'event'" in str(first.error)
    assert isinstance(second, Inbound) and second.message == meta
    for bad in ({"accept": ()}, {"accept": (int,)}, {"max_bytes": 0}, {"max_bytes": node.max_blob_bytes + 1}):
        with pytest.raises(ValueError):
            node.subscribe(events, 1, **bad)


def test_a_reply_counts_only_on_the_reply_topic_its_request_named(
    mosquitto: PrivateMosquitto, make_client, unique_id: str
) -> None:
    helper_id = f"{unique_id}-h"
    helper = listener(mosquitto, make_client, helper_id, (topics.node_kt(helper_id), {}))
    target = listener(
        mosquitto, make_client, unique_id,
        (topics.node_batch(unique_id), {}), (topics.node_events(unique_id), {"accept": (KtBlob,)}),
    )
    future = target.send_request(topics.node_kt(helper_id), kt_request(), timeout=20, retries=0)
    request = items(helper, 1)[0]
    blob = KtBlob(corr=request.corr, blob=b"params")
    helper.publish_message(topics.node_batch(unique_id), blob).wait()  # not a type a batch topic takes
    assert refused(items(target, 1)[0], "decode", UnknownMessageType, topics.node_batch(unique_id))
    helper.publish_message(topics.node_events(unique_id), blob).wait()  # taken there, but not a reply there
    elsewhere = items(target, 1)[0]
    assert isinstance(elsewhere, Inbound) and elsewhere.topic == topics.node_events(unique_id)
    assert not future.done()
    helper.publish_message(request.reply_to, blob).wait()
    assert future.result(10) == blob
    assert target.stats()["replies"] == 1


# --- limits apply to the whole message, as the receiver sets them ----------------------------


def test_a_chunked_batch_above_the_limit_is_refused_at_its_first_chunk(
    mosquitto: PrivateMosquitto, make_client, unique_id: str
) -> None:
    """The review's 31 MB batch in 121 chunks, scaled down: the limit is the subscription's, the
    sender's `cls` does not matter, nothing is buffered, and one error per transfer."""
    batch_t = topics.node_batch(unique_id)
    node = listener(mosquitto, make_client, unique_id, (batch_t, {"max_bytes": 1 << 20}))
    sender = make_client(mosquitto, client_id=f"{unique_id}-x")
    assert sender.wait_connected(10)
    big = encode(batch_of(3 << 20))
    sent = 0
    for cls in ("batch", "kt", "other"):  # the class a sender claims sets no limit
        chunks = split(big, chunk_bytes=256 << 10, cls=cls)
        for chunk in chunks:
            sender.publish(batch_t, encode(chunk), topic_class="batch")
        sent += len(chunks)
        event = items(node, 1)[0]
        assert refused(event, "size", MessageTooLarge, batch_t) and str(1 << 20) in str(event.error)
    wait_until(lambda: node.stats()["chunks_refused"] == sent - 3, 10, "later chunks dropped")
    stats = node.stats()
    assert (stats["too_large"], stats["transfers_pending"], stats["chunk_errors"]) == (3, 0, 0)
    quiet(node)

    fits = batch_of(900_000, batch_id=5)
    assert len(sender.publish_message(batch_t, fits).infos) == 4
    item = items(node, 1)[0]
    assert isinstance(item, Inbound) and item.message == fits


def test_the_topics_default_limit_refuses_the_first_chunk(
    mosquitto: PrivateMosquitto, make_client, unique_id: str
) -> None:
    """No `max_bytes` given: a KT request topic takes 1 MiB, so 2 MB of chunks never buffer."""
    kt_t = topics.node_kt(unique_id)
    node = listener(mosquitto, make_client, unique_id, (kt_t, {}))
    sender = make_client(mosquitto, client_id=f"{unique_id}-x")
    assert sender.wait_connected(10)
    chunks = sender.publish_blob(kt_t, encode(batch_of(2 << 20)), topic_class="kt").infos
    assert refused(items(node, 1)[0], "size", MessageTooLarge, kt_t)
    wait_until(lambda: node.stats()["chunks_refused"] == len(chunks) - 1, 10, "later chunks dropped")
    quiet(node)


def test_config_topics_take_64_kib_whatever_the_clients_limit(
    mosquitto: PrivateMosquitto, make_client, unique_id: str
) -> None:
    config_t = topics.node_config(unique_id)
    node = make_client(mosquitto, client_id=unique_id, max_message_bytes=16 << 20, start=False)
    node.subscribe(config_t)
    node.start()
    assert node.wait_subscribed(10)
    sender = make_client(mosquitto, client_id=f"{unique_id}-x")
    assert sender.wait_connected(10)
    large = ConfigPatch(values={f"k{i}": ["a" * 1000] * 40 for i in range(3)})  # valid, about 120 kB
    small = ConfigPatch(values={"k0": ["a" * 1000] * 40})  # about 40 kB
    sender.publish(config_t, encode(large)).wait_for_publish(5)
    sender.publish(config_t, b'{"k": "' + b"a" * (64 << 10) + b'"}').wait_for_publish(5)
    sender.publish(config_t, encode(small)).wait_for_publish(5)
    too_large, too_large_json, ok = items(node, 3)
    assert refused(too_large, "size", MessageTooLarge, config_t) and str(64 << 10) in str(too_large.error)
    assert refused(too_large_json, "size", MessageTooLarge, config_t)
    assert isinstance(ok, Inbound) and ok.message == small


def test_config_from_mosquitto_pub_says_what_is_wrong(mosquitto: PrivateMosquitto, make_client, unique_id: str) -> None:
    config_t = topics.node_config(unique_id)
    node = listener(mosquitto, make_client, unique_id, (config_t, {}))
    for text in ("z=0.3", '{"z": 0.3, "z": 0.4}', '{"v": 1, "type": "config.ack", "node_id": "n", "ok": true}'):
        subprocess.run(
            ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-q", "1", "-t", config_t, "-m", text],
            check=True, timeout=10,
        )
    neither, twice, ack = items(node, 3)
    assert refused(neither, "decode", WireError, config_t)
    assert "config message is neither JSON (an object) nor msgpack" in str(neither.error)
    assert refused(twice, "decode", SchemaError, config_t) and "duplicate key 'z'" in str(twice.error)
    assert refused(ack, "decode", UnknownMessageType, config_t)  # an ack is not a patch


# --- a responder answers only on reply topics ------------------------------------------------


def test_a_responder_answers_only_on_reply_topics(mosquitto: PrivateMosquitto, make_client, unique_id: str) -> None:
    """The review's case: a feeder names a topic it can read (here a node's events) as the reply
    topic of a KT request, and the helper publishes its model there."""
    helper_id = f"{unique_id}-h"
    kt_t, events = topics.node_kt(helper_id), topics.node_events(unique_id)
    calls: list[str] = []
    others: list[Any] = []
    helper = listener(mosquitto, make_client, helper_id, (kt_t, {}))
    responder = Responder(
        helper, lambda req, item: calls.append(item.corr) or KtBlob(corr=item.corr, blob=b"model"), on_other=others.append
    ).start()
    watcher = listener(mosquitto, make_client, f"{unique_id}-w", (events, {"decoding": "raw"}))
    feeder = make_client(mosquitto, client_id=unique_id)
    assert feeder.wait_subscribed(10)
    try:
        # Through the v5 properties (no reply_to in the envelope) ...
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = events
        props.CorrelationData = b"steal1"
        feeder.publish(kt_t, encode(kt_request()), properties=props).wait_for_publish(5)
        wait_until(lambda: responder.bad_reply_to == 1, 10, "the request refused")
        # ... and through the envelope, which does not even decode.
        doc = {**kt_request(topics.node_reply(unique_id)).model_dump(), "reply_to": events, "corr": "steal2"}
        feeder.publish(kt_t, msgpack.packb(doc, use_bin_type=True)).wait_for_publish(5)
        wait_until(lambda: len(others) == 1, 10, "the envelope refused")
        assert isinstance(others[0], ErrorEvent) and "reply topic" in str(others[0].error)
        quiet(watcher)
        assert calls == [] and responder.handled == 0
        reply = feeder.request(kt_t, kt_request(), timeout=5, retries=0)  # a proper request still works
    finally:
        responder.stop()
    assert isinstance(reply, KtBlob) and reply.blob == b"model" and len(calls) == 1
