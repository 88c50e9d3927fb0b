"""Topics, the wire codec and chunk reassembly: round trips, refusals, and fuzzing.

Every decoder (`decode`, `decode_config`, `ChunkAssembler.add`, `parse_node_topic`,
`parse_broker_url`) is fuzzed with `st.binary()`/`st.text()` and with mutated valid messages
(byte-level and structural): only our own error types may escape.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any, get_args

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker import topics
from broker.chunking import CHUNK_OVERHEAD, ChunkAssembler, encode_chunks, split
from broker.client import parse_broker_url
from broker.errors import (
    ChunkError,
    ChunkTooLarge,
    MessageTooLarge,
    SchemaError,
    TopicError,
    UnknownMessageType,
    UnsupportedVersion,
    WireError,
)
from broker.wire import (
    ArrayPayload,
    BlobChunk,
    Candidate,
    ConfigAck,
    ConfigPatch,
    ConfigRequest,
    ConfigState,
    Envelope,
    ErrorReply,
    Event,
    GlobalModel,
    HelperList,
    HelpQuery,
    KtBlob,
    KtRequest,
    Labels,
    LabelsAck,
    ModelUpdate,
    NamedArray,
    NodeMeta,
    Prediction,
    RequestBatch,
    decode,
    decode_config,
    encode,
    encode_json,
    from_obj,
    message_types,
)

FUZZ = settings(max_examples=int(os.environ.get("CLUE_FUZZ_EXAMPLES", "250")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- sample of every message type ------------------------------------------------------------


def _arr(a: Any) -> ArrayPayload:
    return ArrayPayload.from_numpy(np.asarray(a))


def sample_messages() -> dict[str, Envelope]:
    """One valid instance of every registered type (the fuzzers start from these)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    tensors = [NamedArray(name="fc1.weight", array=_arr(x)), NamedArray(name="fc1.bias", array=_arr(np.zeros(6)))]
    payload = b"kt-blob-bytes" * 10
    return {
        "batch": RequestBatch(batch_id=7, x=_arr(x), y=_arr(np.array([0, 1, 2, 1])), meta={"phase": "drift", "n": 4}),
        "prediction": Prediction(
            batch_id=7, y_hat=_arr(np.array([0, 1, 1, 1], dtype=np.int64)), helpers=["h1"], error=0.25, model_version=3,
            top_classes=_arr(np.array([[0, 2], [1, 0], [1, 2], [1, 0]], dtype=np.int64)),
            top_probs=_arr(np.array([[0.7, 0.2], [0.6, 0.3], [0.5, 0.4], [0.9, 0.1]], dtype=np.float32)), corr="c0ffee",
        ),
        "labels": Labels(batch_id=7, y=_arr(np.array([2, 0], dtype=np.uint8)), indices=_arr(np.array([3, 1], dtype=np.int16)),
                         reply_to=topics.app_reply("app"), corr="c0ffee"),
        "labels.ack": LabelsAck(batch_id=7, learnt=2, error=0.5, pending=2, corr="c0ffee"),
        "meta": NodeMeta(node_id="n1", arch_id="mlp-abc", lineage="base-1", hist=[0.5, 0.5, 0.0], rolling_error=0.1, batches=3),
        "event": Event(node_id="n1", kind="drift", detail={"error": 0.4, "classes": [3, 4], "note": None}),
        "config.patch": ConfigPatch(values={"z": 0.3, "drift.threshold": 0.4, "operator": "mean", "classes": [1, 2]}),
        "config.ack": ConfigAck(node_id="n1", ok=True, applied={"z": 0.3}, patch_id="abc123"),
        "config.request": ConfigRequest(),
        "config.state": ConfigState(
            node_id="n1", request_id="abc123", values={"z": 0.3, "drift": {"type": "novelty", "window": 3}}, patched=["z"],
            settings={"broker": "mqtt://broker:1883", "metrics_port": 9101, "password_file": "(set)"},
        ),
        "mds.query": HelpQuery(
            node_id="n1", arch_id="mlp-abc", lineage="base-1", classes=[3, 4], hist=[0.2, 0.8], k=2,
            cover="any", rank="least_similar", reply_to=topics.node_reply("n1"), corr="c0ffee",
        ),
        "mds.reply": HelperList(corr="c0ffee", candidates=[Candidate(node_id="h1", score=0.9, classes=[3])]),
        "kt.request": KtRequest(
            classes=[3], z=0.3, arch_id="mlp-abc", lineage="base-1", reply_to=topics.node_reply("n1"), corr="beef"
        ),
        "kt.blob": KtBlob(corr="beef", blob=payload, helper="h1", count=12),
        "error": ErrorReply(corr="beef", code="arch_mismatch", message="other architecture"),
        "fl.update": ModelUpdate(job="job1", round=2, node_id="n1", tensors=tensors, samples=400),
        "fl.global": GlobalModel(job="job1", round=2, tensors=tensors, samples=1200),
        "chunk": BlobChunk(
            transfer="0" * 32, index=0, count=1, total=len(payload), digest=hashlib.sha256(payload).digest(),
            cls="kt", data=payload,
        ),
    }


SAMPLES = sample_messages()
SAMPLE_BYTES = [encode(m) for m in SAMPLES.values()]


# --- topics ----------------------------------------------------------------------------------


def test_topic_names() -> None:
    assert topics.node_batch("a") == "clue/v1/node/a/batch"
    assert topics.node_prediction("a") == "clue/v1/node/a/prediction"
    assert topics.node_meta("a") == "clue/v1/node/a/meta"
    assert topics.node_status("a") == "clue/v1/node/a/status"
    assert topics.node_events("a") == "clue/v1/node/a/events"
    assert topics.node_config("a") == "clue/v1/node/a/config"
    assert topics.node_config_ack("a") == "clue/v1/node/a/config/ack"
    assert topics.node_kt("a") == "clue/v1/node/a/kt"
    assert topics.node_reply("a") == "clue/v1/node/a/reply"
    assert topics.fleet_config() == "clue/v1/fleet/config"
    assert topics.mds_query() == "clue/v1/mds/query"
    assert topics.mds_query_shared() == "$share/mds/clue/v1/mds/query"
    assert topics.relay_kt() == "clue/v1/relay/kt"
    assert topics.fl_update("j", "a") == "clue/v1/fl/j/update/a"
    assert topics.fl_global("j") == "clue/v1/fl/j/global"
    assert topics.all_meta() == "clue/v1/node/+/meta"
    assert topics.all_status() == "clue/v1/node/+/status"
    assert not topics.PREFIX.startswith("/")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "sp ace", "..", "ünï", "a\x00"])
def test_invalid_node_ids_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.node_meta(bad)
    assert not topics.is_valid_node_id(bad)


@pytest.mark.parametrize("bad", [".", "..", "a/b", "x" * 65, ""])
def test_wire_node_ids_follow_the_topics_rule(bad: str) -> None:
    """`--node-id ..` used to pass every pattern and then die building a topic: one rule now."""
    with pytest.raises(ValidationError):
        NodeMeta(node_id=bad, arch_id="mlp", lineage="b", hist=[])
    with pytest.raises(SchemaError):
        decode(msgpack.packb({**SAMPLES["meta"].model_dump(), "node_id": bad}))
    for ok in ("...", "a.b", "-_-", "x" * 64):
        assert NodeMeta(node_id=ok, arch_id="mlp", lineage="b", hist=[]).node_id == ok == topics.validate_node_id(ok)


def test_parse_node_topic_round_trip() -> None:
    for leaf in topics.NODE_LEAVES:
        topic = f"clue/v1/node/edge-7/{leaf}"
        assert topics.parse_node_topic(topic) == ("edge-7", leaf)
    for bad in ["clue/v1/node/edge-7", "clue/v1/node/edge-7/nope", "clue/v2/node/a/meta", "clue/v1/node//meta"]:
        with pytest.raises(TopicError):
            topics.parse_node_topic(bad)


def test_topic_classes() -> None:
    tc = topics.topic_class
    assert tc(topics.node_meta("a")) == "meta"
    assert tc(topics.all_meta()) == "meta"
    assert tc(topics.mds_query()) == tc(topics.mds_query_shared()) == "query"
    assert tc(topics.node_kt("a")) == tc(topics.relay_kt()) == "kt"
    assert tc(topics.fl_update("j", "a")) == tc(topics.fl_global("j")) == "fl"
    assert tc(topics.node_batch("a")) == "batch"
    assert tc(topics.node_config("a")) == tc(topics.node_config_ack("a")) == tc(topics.fleet_config()) == "config"
    assert tc(topics.node_prediction("a")) == "prediction"
    assert tc(topics.node_events("a")) == "events"
    assert tc(topics.node_status("a")) == "status"
    assert tc(topics.node_reply("a")) == tc(topics.relay_reply("r")) == "reply"
    assert tc("something/else") == tc("clue/v1/unknown") == "other"
    # Message types override the topic's class: a KT blob on a reply topic counts as kt.
    assert KtBlob.byte_class == KtRequest.byte_class == "kt"
    assert HelperList.byte_class == HelpQuery.byte_class == "query"


def test_every_topic_kind_has_a_rule_naming_registered_types() -> None:
    """A typo in the table would refuse every message on that topic: names must be real types."""
    registered = set(message_types())
    assert set(topics.TOPIC_RULES) == set(get_args(topics.TopicKind))
    for kind, rule in topics.TOPIC_RULES.items():
        assert rule.accepts is None or (rule.accepts and set(rule.accepts) <= registered), kind
    kinds = {
        topics.node_batch("a"): ("node/batch", ("batch",)),
        topics.node_kt("a"): ("node/kt", ("kt.request",)),
        topics.relay_kt(): ("relay/kt", ("kt.request",)),
        topics.node_config("a"): ("node/config", ("config.patch", "config.request")),
        topics.fleet_config(): ("fleet/config", ("config.patch",)),
        topics.node_config_ack("a"): ("node/config/ack", ("config.ack", "config.state")),
        topics.mds_query_shared(): ("mds/query", ("mds.query",)),
        topics.node_reply("a"): ("node/reply", ("mds.reply", "kt.blob", "error")),
        topics.relay_reply("r"): ("relay/reply", ("mds.reply", "kt.blob", "error")),
        topics.fl_updates("j"): ("fl/update", ("fl.update",)),
        topics.fl_global("j"): ("fl/global", ("fl.global",)),
    }
    for topic, (kind, accepts) in kinds.items():
        assert (topics.topic_kind(topic), topics.topic_rule(topic).accepts) == (kind, accepts), topic
    for leaf in topics.NODE_LEAVES:
        assert topics.topic_kind(f"clue/v1/node/x/{leaf}") == f"node/{leaf}"
    assert topics.topic_rule(topics.node_config("a")).max_bytes == topics.topic_rule(topics.fleet_config()).max_bytes
    assert topics.topic_rule(topics.fleet_config()).max_bytes == topics.MAX_CONFIG_BYTES == 64 << 10
    for other in ("test/x/batch", "clue/v1/node/a", "clue/v1/unknown", "clue/v1/node/a/b/batch"):
        assert topics.topic_kind(other) is None and topics.topic_rule(other) == topics.TopicRule()


def test_is_reply_topic_is_exact() -> None:
    assert topics.is_reply_topic(topics.node_reply("a")) and topics.is_reply_topic(topics.relay_reply("r1"))
    for bad in [topics.node_events("a"), topics.node_kt("a"), "clue/v1/node/../reply", "clue/v1/node/+/reply",
                "clue/v1/node/a/reply/x", "clue/v1/node/a/b/reply", "x/clue/v1/node/a/reply", "clue/v1/relay/kt", None]:
        assert not topics.is_reply_topic(bad), bad  # type: ignore[arg-type]


def test_filters_and_matching() -> None:
    assert topics.matches(topics.all_meta(), topics.node_meta("x"))
    assert not topics.matches(topics.all_meta(), topics.node_status("x"))
    assert topics.matches(topics.mds_query_shared(), topics.mds_query())
    assert topics.matches("clue/v1/#", topics.node_config_ack("x"))
    assert not topics.matches("#", "$SYS/broker/uptime")
    for bad in ["a/#/b", "a/b+", "", "a#"]:
        with pytest.raises(TopicError):
            topics.validate_filter(bad)
    for bad in ["a/+/b", "a/#", "", "$SYS/x"]:
        with pytest.raises(TopicError):
            topics.validate_publish_topic(bad)


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_topic_parsers(text: str) -> None:
    try:
        node_id, leaf = topics.parse_node_topic(text)
        assert topics.is_valid_node_id(node_id) and leaf in topics.NODE_LEAVES
    except TopicError:
        pass
    assert topics.topic_class(text) in topics.TOPIC_CLASSES
    try:
        out = parse_broker_url(text)
        assert isinstance(out, dict)
    except ValueError:
        pass


# --- wire: round trips and refusals ----------------------------------------------------------


def test_every_registered_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(message_types())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(name: str) -> None:
    msg = SAMPLES[name]
    data = encode(msg)
    back = decode(data)
    assert back == msg and type(back) is type(msg)
    assert decode(data, expect=type(msg)) == msg
    assert back.v == 1 and back.type == name and len(back.msg_id) == 32 and back.sent_at > 0


def test_expect_restricts_types() -> None:
    with pytest.raises(UnknownMessageType):
        decode(encode(SAMPLES["meta"]), expect=(HelpQuery, KtRequest))


def test_unknown_fields_types_and_versions_are_refused() -> None:
    obj = SAMPLES["meta"].model_dump()
    with pytest.raises(SchemaError):
        decode(msgpack.packb({**obj, "surprise": 1}))
    with pytest.raises(SchemaError):
        decode(msgpack.packb({**obj, "batches": "3"}))  # strict: no str -> int coercion
    with pytest.raises(SchemaError):
        decode(msgpack.packb({**obj, "hist": [float("nan")]}))
    with pytest.raises(UnsupportedVersion):
        decode(msgpack.packb({**obj, "v": 2}))
    with pytest.raises(UnsupportedVersion):
        decode(msgpack.packb({**obj, "v": True}))
    with pytest.raises(UnknownMessageType):
        decode(msgpack.packb({**obj, "type": "pickle"}))
    with pytest.raises(SchemaError):
        decode(msgpack.packb([1, 2, 3]))
    with pytest.raises(SchemaError):
        decode(msgpack.packb({**obj, "node_id": "bad/id"}))


def test_reply_topic_must_be_ours() -> None:
    q = SAMPLES["mds.query"].model_dump()
    for bad in ["elsewhere/topic", "clue/v1/node/+/reply", "$SYS/x"]:
        with pytest.raises(SchemaError):
            decode(msgpack.packb({**q, "reply_to": bad}))


@pytest.mark.parametrize(
    "bad", ["clue/v1/node/n1/events", "clue/v1/fl/j/global", "clue/v1/node/../reply", "clue/v1/node/n1/reply/x"]
)
def test_reply_to_must_be_a_reply_topic(bad: str) -> None:
    """A request naming another node's events topic would have its helper publish a whole model
    there: only `node/{id}/reply` and `relay/{id}/reply` are places to answer."""
    for name in ("mds.query", "kt.request"):
        with pytest.raises(SchemaError, match="reply topic"):
            decode(msgpack.packb({**SAMPLES[name].model_dump(), "reply_to": bad}))
    via_relay = SAMPLES["kt.request"].evolve(reply_to=topics.relay_reply("r1"))
    assert decode(encode(via_relay)).reply_to == "clue/v1/relay/r1/reply"


def test_a_key_given_twice_is_refused() -> None:
    """Readers disagree on which of two values wins; refuse rather than pick one."""
    fields = SAMPLES["meta"].model_dump()
    assert len(fields) < 15  # a fixmap: its header byte is 0x80 + the number of pairs
    twice = bytes([0x80 + len(fields) + 1]) + msgpack.packb(fields)[1:] + msgpack.packb("node_id") + msgpack.packb("n2")
    with pytest.raises(SchemaError, match="duplicate key 'node_id'"):
        decode(twice)
    nested = msgpack.packb({"v": 1, "type": "config.patch", "values": {"z": 0.3}})
    nested = nested.replace(b"\x81\xa1z\xcb", b"\x82\xa1z\xc3\xa1z\xcb")  # values: {"z": true, "z": 0.3}
    with pytest.raises(SchemaError, match="duplicate key 'z'"):
        decode_config(nested)


def test_size_depth_and_ext_limits() -> None:
    data = encode(SAMPLES["kt.blob"])
    with pytest.raises(MessageTooLarge):
        decode(data, max_bytes=len(data) - 1)
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(SchemaError, match="deeper"):
        decode(msgpack.packb({"v": 1, "type": "event", "detail": deep}))
    with pytest.raises(WireError):
        decode(b"\x91" * 5000)  # msgpack's own stack limit
    with pytest.raises(WireError):
        decode(msgpack.packb({"v": 1, "type": "meta", "t": msgpack.Timestamp(1)}))
    with pytest.raises(WireError):
        decode(msgpack.packb({1: 2}))  # non-string map key
    with pytest.raises(WireError):
        decode(encode(SAMPLES["meta"]) + b"\x00")  # trailing bytes
    with pytest.raises(WireError):
        decode("not bytes")  # type: ignore[arg-type]


def test_no_pickle_anywhere() -> None:
    import broker

    root = os.path.dirname(broker.__file__)
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name), encoding="utf-8").read()
            assert "import pickle" not in text and "cloudpickle" not in text, name


# --- arrays ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"])
def test_array_round_trip_any_byte_order(dtype: str) -> None:
    a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    for arr in (a, a.astype(np.dtype(dtype).newbyteorder(">")), a[:, ::2]):
        p = ArrayPayload.from_numpy(arr)
        out = p.to_numpy()
        np.testing.assert_array_equal(out, arr)
        assert not out.flags.writeable
        back = decode(encode(RequestBatch(batch_id=0, x=p)), expect=RequestBatch)
        np.testing.assert_array_equal(back.x.to_numpy(), arr)


def test_array_refusals() -> None:
    with pytest.raises(ValueError):
        ArrayPayload(dtype="float32", shape=[3], data=b"\x00" * 8)
    with pytest.raises(ValueError):
        ArrayPayload(dtype="complex64", shape=[1], data=b"\x00" * 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ArrayPayload(dtype="uint8", shape=[1] * 9, data=b"\x00")
    with pytest.raises(ValueError):
        ArrayPayload(dtype="uint8", shape=[1 << 20, 1 << 20], data=b"")
    with pytest.raises(ValueError):
        ArrayPayload(dtype="float32", shape=[2], data=np.array([1.0, np.inf], dtype="<f4").tobytes())
    with pytest.raises(WireError):
        ArrayPayload.from_numpy(np.array(["a"]))
    with pytest.raises(WireError):
        ArrayPayload.from_numpy(np.array([np.nan]))
    with pytest.raises(ValueError):  # labels must match the samples
        RequestBatch(batch_id=0, x=_arr(np.zeros((3, 2))), y=_arr(np.array([1, 2])))
    with pytest.raises(ValueError):
        Prediction(batch_id=0, y_hat=_arr(np.array([1.0])))


# --- config topics ---------------------------------------------------------------------------


def test_decode_config_accepts_json_shorthand_envelope_and_msgpack() -> None:
    assert decode_config(b'{"z": 0.3}').values == {"z": 0.3}
    assert decode_config(b'  \n{"operator": "mean", "k": 2, "drift": {"window": 5}}').values == {
        "operator": "mean", "k": 2, "drift": {"window": 5}
    }
    patch = SAMPLES["config.patch"]
    assert decode_config(encode(patch)) == patch
    assert decode_config(encode_json(patch)) == patch
    ack = SAMPLES["config.ack"]
    assert decode_config(encode_json(ack), expect=None) == ack
    with pytest.raises(UnknownMessageType):
        decode_config(encode_json(ack))  # default expect: ConfigPatch only
    # `mosquitto_pub -m '{"v": 1, "type": "config.request"}'` asks a node for its config.
    request = decode_config(b'{"v": 1, "type": "config.request"}', expect=(ConfigPatch, ConfigRequest))
    assert isinstance(request, ConfigRequest)


@pytest.mark.parametrize(
    "bad",
    [b'{"z": NaN}', b'{"z": Infinity}', b'{"z": 1e999}', b"[1, 2]", b'"z"', b'{"z": {"a": {"b": 1}}}',
     b'{"bad key": 1}', b'{"z": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"{\xff}", b"{", b'{"v": 1, "type": "meta"}'],
)
def test_decode_config_refusals(bad: bytes) -> None:
    with pytest.raises(WireError):
        decode_config(bad)


def test_decode_config_refuses_integers_msgpack_cannot_carry() -> None:
    """Found by `bench.fuzz` (config target): JSON integers are unbounded, so a patch that
    decoded could not be encoded again (the ack, a relay, `clue-ctl` all re-encode)."""
    for big in (b"7" * 46, str(1 << 64).encode(), str(-(1 << 63) - 1).encode()):
        with pytest.raises(SchemaError):
            decode_config(b'{"z": 0.3, "o": ' + big + b"}")
    edge = decode_config(b'{"a": %d, "b": %d}' % ((1 << 64) - 1, -(1 << 63)))
    assert decode(encode(edge)) == edge


def test_decode_config_size_limit() -> None:
    with pytest.raises(MessageTooLarge):
        decode_config(b'{"z": "' + b"a" * 70000 + b'"}')


@pytest.mark.parametrize("text", [b"z=0.3", b"z: 0.3", b"5", b"[1, 2]", b"true"])
def test_decode_config_says_what_it_expected(text: bytes) -> None:
    """`mosquitto_pub -m 'z=0.3'` answered `ExtraData: unpack(b) received extra data`."""
    with pytest.raises(WireError, match=r"config message is neither JSON \(an object\) nor msgpack"):
        decode_config(text)


@pytest.mark.parametrize("text", [b'{"z": 0.3, "z": 0.4}', b'{"drift": {"window": 5, "window": 6}}'])
def test_decode_config_refuses_duplicate_json_keys(text: bytes) -> None:
    with pytest.raises(SchemaError, match="duplicate key"):
        decode_config(text)


# --- chunking --------------------------------------------------------------------------------


def test_split_respects_chunk_size_and_reassembles() -> None:
    payload = os.urandom(300_000)
    enc = encode_chunks(payload, chunk_bytes=64 << 10, cls="kt")
    assert len(enc) == 5 and max(len(e) for e in enc) <= 64 << 10
    asm = ChunkAssembler()
    out = [asm.add(decode(e, expect=BlobChunk)) for e in enc]
    assert out[:-1] == [None] * 4 and out[-1] == payload
    assert split(b"", chunk_bytes=CHUNK_OVERHEAD + 1)[0].count == 1
    assert ChunkAssembler().add(split(b"", chunk_bytes=1000)[0]) == b""


@FUZZ
@given(st.binary(max_size=5000), st.integers(CHUNK_OVERHEAD + 1, CHUNK_OVERHEAD + 700), st.randoms())
def test_reassembly_out_of_order_with_duplicates(payload: bytes, chunk_bytes: int, rnd: random.Random) -> None:
    chunks = split(payload, chunk_bytes=chunk_bytes)
    order = chunks + [rnd.choice(chunks) for _ in range(rnd.randint(0, len(chunks)))]
    rnd.shuffle(order)
    order += chunks[:2]  # duplicates of a finished transfer are ignored too
    asm = ChunkAssembler()
    results = [asm.add(c) for c in order]
    done = [r for r in results if r is not None]
    assert done == [payload]
    assert asm.pending == 0 and asm.buffered_bytes == 0


def test_reassembly_refusals_and_deadline() -> None:
    payload = os.urandom(5000)
    chunks = split(payload, chunk_bytes=1512)
    # A forged chunk with the right header but wrong data: checksum refuses the whole.
    asm = ChunkAssembler()
    forged = chunks[1].model_copy(update={"data": bytes(len(chunks[1].data))})
    for c in [chunks[0], forged, *chunks[2:]]:
        out = None
        try:
            out = asm.add(c)
        except ChunkError as exc:
            assert "checksum" in str(exc)
        assert out is None
    # Header disagreement.
    asm = ChunkAssembler()
    asm.add(chunks[0])
    with pytest.raises(ChunkError):
        asm.add(chunks[1].model_copy(update={"total": 4999}))
    # Limits: total size, concurrent transfers, buffered bytes.
    with pytest.raises(ChunkError):
        ChunkAssembler(max_bytes=4000).add(chunks[0])
    asm = ChunkAssembler(max_transfers=1)
    asm.add(chunks[0])
    with pytest.raises(ChunkError):
        asm.add(split(payload, chunk_bytes=1512)[0])
    asm = ChunkAssembler(max_buffered_bytes=1500)
    with pytest.raises(ChunkError):
        for c in chunks:
            asm.add(c)
    assert asm.buffered_bytes <= 1500
    # Deadline: incomplete transfers are discarded.
    now = [0.0]
    asm = ChunkAssembler(deadline_s=5.0, clock=lambda: now[0])
    asm.add(chunks[0])
    assert asm.expire() == [] and asm.next_deadline() == 5.0
    now[0] = 5.5
    dropped = asm.expire()
    assert len(dropped) == 1 and dropped[0].received_chunks == 1 and asm.pending == 0 and asm.buffered_bytes == 0
    assert asm.add(chunks[1]) is None and asm.duplicates == 1  # late chunk of a discarded transfer


def test_reassembly_is_bounded_by_the_receivers_limit_per_call() -> None:
    """The limit is where the chunks arrive, checked on the first chunk, before anything is
    buffered; one error per transfer, its later chunks dropped and counted."""
    payload = os.urandom(5000)
    chunks = split(payload, chunk_bytes=1512, cls="other")
    asm = ChunkAssembler(max_bytes=1 << 20)
    with pytest.raises(ChunkTooLarge) as info:
        asm.add(chunks[0], max_bytes=4999)
    assert isinstance(info.value, MessageTooLarge) and isinstance(info.value, ChunkError)
    assert asm.pending == 0 and asm.buffered_bytes == 0
    assert [asm.add(c, max_bytes=4999) for c in chunks[1:]] == [None] * (len(chunks) - 1)
    assert asm.refused_chunks == len(chunks) - 1 and asm.duplicates == 0 and asm.rejected == 1
    # The assembler's own bound still holds when a call asks for more.
    with pytest.raises(ChunkTooLarge):
        ChunkAssembler(max_bytes=4000).add(chunks[0], max_bytes=1 << 30)
    asm = ChunkAssembler()
    assert [asm.add(c, max_bytes=5000) for c in chunks][-1] == payload  # exactly at the limit


def test_a_transfer_belongs_to_the_topic_its_chunks_arrive_on() -> None:
    """Chunks sent to another topic (with another limit and other accepted types) can neither
    complete a transfer nor disturb it."""
    payload = os.urandom(5000)
    chunks = split(payload, chunk_bytes=1512)
    asm = ChunkAssembler()
    assert [asm.add(c, source="a/batch") for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert asm.add(chunks[-1], source="a/reply") is None
    assert asm.add(chunks[0].model_copy(update={"total": 4999}), source="a/other") is None  # no "disagrees"
    assert asm.pending == 3
    assert asm.add(chunks[-1], source="a/batch") == payload
    discarded = asm.expire(now=1e18)
    assert {d.source for d in discarded} == {"a/reply", "a/other"} and asm.pending == 0


# --- fuzzing ---------------------------------------------------------------------------------


def _check_decoded(msg: Envelope) -> None:
    """A message that decoded must be usable: re-encodable, arrays readable."""
    assert type(msg) in message_types().values()
    assert decode(encode(msg), max_bytes=1 << 30) == msg
    for value in msg.__dict__.values():
        if isinstance(value, ArrayPayload):
            value.to_numpy()


def _try_all_decoders(data: bytes) -> None:
    for call in (
        lambda: decode(data),
        lambda: decode(data, expect=(HelpQuery, KtRequest), max_bytes=256),
        lambda: decode_config(data),
        lambda: decode_config(data, expect=None),
    ):
        try:
            msg = call()
        except WireError:
            continue
        _check_decoded(msg)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_decoders_with_random_bytes(data: bytes) -> None:
    _try_all_decoders(data)


@FUZZ
@given(st.sampled_from(SAMPLE_BYTES), st.lists(st.tuples(st.sampled_from("fitdr"), st.integers(0, 4096), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
def test_fuzz_decoders_with_mutated_bytes(data: bytes, ops: list[tuple[str, int, bytes]]) -> None:
    buf = bytearray(data)
    for op, pos, blob in ops:
        if not buf:
            break
        i = pos % len(buf)
        if op == "f":
            buf[i] ^= blob[0] or 1  # flip bits
        elif op == "i":
            buf[i:i] = blob  # insert
        elif op == "t":
            del buf[i:]  # truncate
        elif op == "d":
            del buf[i : i + len(blob)]  # delete a range
        else:
            buf[i : i + len(blob)] = blob  # replace
    _try_all_decoders(bytes(buf))


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_fuzz_decoders_with_mutated_structure(name: str, data: st.DataObject) -> None:
    obj = msgpack.unpackb(encode(SAMPLES[name]), raw=False)
    paths = [p for p in _paths(obj) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = obj
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = data.draw(_msgpack_values)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(st.text(max_size=8))] = data.draw(_msgpack_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation changed the shape under this path
    raw = msgpack.packb(obj, use_bin_type=True)
    _try_all_decoders(raw)
    try:
        _check_decoded(from_obj(obj))
    except WireError:
        pass
    if isinstance(obj, dict):
        try:
            text = json.dumps(obj, default=lambda b: b.hex()).encode()
        except (ValueError, TypeError):
            return
        _try_all_decoders(text)


@FUZZ
@given(st.binary(max_size=3000), st.randoms(), st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["index", "count", "total", "data", "digest", "transfer"]), _msgpack_values), max_size=4))
def test_fuzz_chunk_reassembly(payload: bytes, rnd: random.Random, tweaks: list[tuple[int, str, Any]]) -> None:
    asm = ChunkAssembler(max_bytes=2500, max_transfers=2, max_buffered_bytes=4000)
    objs = [msgpack.unpackb(e, raw=False) for e in encode_chunks(payload, chunk_bytes=1024)]
    for pos, key, value in tweaks:
        objs[pos % len(objs)][key] = value
    objs += [rnd.choice(objs) for _ in range(rnd.randint(0, 3))]
    rnd.shuffle(objs)
    for obj in objs:
        try:
            chunk = decode(msgpack.packb(obj, use_bin_type=True), expect=BlobChunk)
            out = asm.add(chunk)
        except WireError:  # ChunkError included
            continue
        if out is not None:
            assert out == payload  # sha256 lets nothing else through
    asm.expire(now=1e18)
    assert asm.pending == 0 and asm.buffered_bytes == 0


def test_zero_dim_array_keeps_its_shape():
    """BatchNorm's num_batches_tracked is 0-d: it must come back 0-d, not shape (1,)."""
    payload = ArrayPayload.from_numpy(np.array(7, dtype=np.int64))
    assert payload.shape == [] and payload.to_numpy().shape == () and int(payload.to_numpy()) == 7


@pytest.mark.parametrize(
    "bad",
    [{"cover": "some"}, {"rank": "random"}, {"cover": 1}],
)
def test_help_query_refuses_unknown_cover_and_rank(bad: dict) -> None:
    doc = {"v": 1, "type": "mds.query", "node_id": "n1", "arch_id": "a", "lineage": "b", "classes": [1], "hist": [1.0, 0.0], **bad}
    with pytest.raises(SchemaError):
        decode(msgpack.packb(doc))


def test_candidate_classes_are_bounded() -> None:
    doc = {"v": 1, "type": "mds.reply", "corr": "c", "candidates": [{"node_id": "h", "score": 0.5, "classes": [70000]}]}
    with pytest.raises(SchemaError):
        decode(msgpack.packb(doc))
