"""Hostile KT blobs, config patches, batches and metadata, over the broker, to a live agent.

The agent (an in-process ``AgentDaemon``, so its weights can be read) drifts and asks rogue peers —
real MQTT clients advertising the classes it lacks — each answering with one hostile blob. Each
class of defect of issue 7/13 has cases here:

- crash: a batch without a feature axis (raised deep in the model and killed the worker);
- non-finite training: finite inputs so large that a step overflows (3e38, 1e30), raw 0–255 pixels;
- poisoned helper: an empty tensor list, one tensor of six, every value 3e38, other classes than
  asked (besides the codec's cases: NaN, wrong shape, another architecture, truncated, a huge
  declared shape or count, unknown dtypes, 100,000-deep msgpack);
- topic/role confusion: a KT request or a config patch on the batch topic, another message type on
  the config topic;
- limit bypass: a chunked batch above the batch limit, a transfer declaring 1 GiB, an oversized
  config;
- out-of-range knobs: denormal z and kt_timeout, lr = 1, duplicate JSON keys, non-JSON;
- future timestamps: a metadata message stamped 1e18 on a helper's own meta topic;
- decompression size: a zstd frame of a few KiB that holds 1 GiB.

Each must be refused with a ``rejected`` or ``config_refused`` event (the metadata by the MdS,
which keeps offering the helper), the agent must keep serving, and its weights, optimiser state and
config must stay bit-identical.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from agent.daemon import AgentDaemon
from broker import topics
from broker.chunking import split
from broker.wire import ConfigAck, ConfigPatch, Event, HelpQuery, KtRequest, NodeMeta, encode
from support import next_message, wait_until
from support.fleet import Clusters
from support.peers import hostile_blobs, peer_for_blobs, rogue, start_victim

from .conftest import record

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

DEEP = b"\x91" * 100_000 + b"\xc0"  # 100,000 nested one-element arrays around a nil


def _more_hostile_blobs(learner) -> dict[str, bytes]:
    """Blobs beyond the end-to-end cases, built from a well-formed one."""
    from agent.kt import codec

    good = codec.encode_blob(learner.significant_for((8, 9), 0.5), value_codec="float32")
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(good), raw=False)
    pack = zstandard.ZstdCompressor(write_checksum=True).compress

    def variant(mutate) -> bytes:
        d = msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False)
        mutate(d["tensors"][0])
        return pack(msgpack.packb(d, use_bin_type=True))

    def whole(mutate) -> bytes:
        d = msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False)
        mutate(d)
        return pack(msgpack.packb(d, use_bin_type=True))

    def huge_values(d) -> None:
        for t in d["tensors"]:
            t["val"] = np.full(len(t["val"]) // 4, 3e38, dtype="<f4").tobytes()

    return {
        # poisoned helpers: well-formed, and still no answer to the request or garbage
        "empty_tensor_list": whole(lambda d: d.update(tensors=[])),
        "one_tensor_of_six": whole(lambda d: d.update(tensors=d["tensors"][:1])),
        "all_values_3e38": whole(huge_values),
        "other_classes": codec.encode_blob(learner.significant_for((4, 6), 0.5), value_codec="float32"),
        "huge_shape": variant(lambda t: t.update(shape=[1 << 31, 1 << 31])),
        "huge_count": variant(lambda t: t.update(n=1 << 40)),
        "unknown_dtype": variant(lambda t: t.update(dtype="f8")),
        "unknown_index_encoding": variant(lambda t: t.update(enc="rle")),
        "deep_msgpack": pack(DEEP),
        "deep_inside_tensors": pack(msgpack.packb({**doc, "tensors": []}, use_bin_type=True)[:-1] + b"\x91" + DEEP),
    }


def _config_cases() -> dict[str, bytes]:
    return {
        "invalid_value": b'{"z": 7, "pool_max": 2}',
        "not_json": b"not json at all",
        "unknown_knob": b'{"no_such_knob": 1}',
        "nan": b'{"z": NaN}',
        "integer_past_64_bits": b'{"help_cooldown": ' + b"7" * 46 + b"}",
        "dotted_too_deep": b'{"drift.window.x": 3}',
        "deep_json": b'{"z": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        "deep_msgpack": b"\x91" * 60_000 + b"\xc0",
        "deep_msgpack_100k_oversized": DEEP,
        "oversized": b'{"z": "' + b"a" * 70_000 + b'"}',
        "another_message_type": encode(Event(node_id="victim", kind="drift")),
        "duplicate_keys": b'{"z": 0.3, "z": 0.4}',
        "neither_json_nor_msgpack": b"z=0.3",
        "z_denormal": b'{"z": 1e-320}',
        "kt_timeout_denormal": b'{"kt_timeout": 1e-300}',
        "lr_that_wrecks_the_model": b'{"lr": 1.0}',
    }


def _batch_cases(victim: str, ids: dict[str, str]) -> dict[str, list[bytes]]:
    def batch(y: np.ndarray | None = None, **x) -> bytes:
        labels = None if y is None else {"dtype": "int64", "shape": [len(y)], "data": y.astype("<i8").tobytes()}
        return msgpack.packb({"v": 1, "type": "batch", "batch_id": 999, "x": x, "y": labels}, use_bin_type=True)

    def filled(value, dtype: str, n: int = 8) -> dict:
        return {"dtype": dtype, "shape": [n, 784], "data": np.full((n, 784), value, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()}

    labels = np.arange(8) % 8
    transfer = split(b"\0" * 1024, chunk_bytes=700)[0].model_dump()
    oversized = {**transfer, "total": 1 << 30, "count": 1 << 15}
    # Above the agent's 16 MiB batch limit, below the bus's 64 MiB blob limit: once reassembled
    # unchecked, now refused at the first chunk.
    over_batch_limit = {**split(b"\1" * 1024, chunk_bytes=700)[0].model_dump(), "total": 20 << 20, "count": 80}
    kt_request = KtRequest(classes=[1], z=1.0, value_codec="float32", reply_to=topics.node_reply("spy"), corr="c1", **ids)
    return {
        "huge_shape": [batch(dtype="float32", shape=[1 << 28, 1 << 28], data=b"\0" * 16)],
        "unknown_dtype": [batch(dtype="complex64", shape=[2, 2], data=b"\0" * 32)],
        "deep_msgpack": [DEEP],
        "oversized_transfer": [msgpack.packb(oversized, use_bin_type=True)],
        # crash: the model cannot take a sample without a feature axis
        "one_dimensional_x": [batch(dtype="float32", shape=[784], data=np.zeros(784, "<f4").tobytes())],
        # non-finite training: finite inputs that overflow the network
        "huge_finite_labelled": [batch(labels, **filled(3e38, "float32"))],
        "1e30_labelled": [batch(labels, **filled(1e30, "float32"))],
        "raw_uint8_pixels": [batch(labels, **filled(255, "uint8"))],
        # topic/role confusion: a helper's request where batches go
        "kt_request_on_batch_topic": [encode(kt_request)],
        "config_patch_on_batch_topic": [encode(ConfigPatch(values={"z": 0.3}))],
        # limit bypass through chunking
        "chunked_over_batch_limit": [msgpack.packb(over_batch_limit, use_bin_type=True)],
    }


def _state(daemon: AgentDaemon) -> dict[str, torch.Tensor]:
    learner = daemon.learner
    out = {f"model/{k}": v.clone() for k, v in learner.model.state_dict().items()}
    for index, entry in learner.optimizer.state_dict()["state"].items():
        out.update({f"optim/{index}/{k}": v.clone() for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return out


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(400)
def test_hostile_blobs_configs_and_batches_are_refused_and_state_stays_bit_identical(fleet):
    victim = start_victim(fleet, k=16)
    try:
        assert victim.wait_ready(20)
        learner = victim.learner
        feeder, collector = fleet.observer()
        acks = fleet.client()
        acks.subscribe(topics.node_config_ack("victim"), 1)
        assert acks.wait_subscribed(10)
        data = Clusters(1)
        for t in range(10):
            assert feeder.step(t, [("victim", *data.batch(range(8)))])

        # 1. Blobs, each from a rogue helper the MdS offers for the drifted classes.
        peer = peer_for_blobs(learner, data)
        blobs = {**hostile_blobs(peer), **_more_hostile_blobs(peer)}
        snapshots: list[dict[str, torch.Tensor]] = []

        def answer_with(name):
            def answer(request):
                if not snapshots:
                    snapshots.append(_state(victim))
                return blobs[name]
            return answer

        hist = [0.0] * 8 + [50.0, 50.0]
        ids = {"arch_id": learner.arch_id, "lineage": learner.lineage}
        names = [f"rogue-{name.replace('_', '-')}" for name in blobs]
        rogues = [rogue(fleet, node_id, ids, hist, answer_with(name)) for node_id, name in zip(names, blobs)]
        fleet.wait_offered(names, **ids)  # the MdS has the rogues' retained meta and status
        t = 10
        while not collector.events_of("victim", "help_failed"):
            assert t < 20, "no drift"
            assert feeder.step(t, [("victim", *data.batch(list(range(8)) + [8, 9] * 2))], timeout=120)
            t += 1
        for _, stop in rogues:
            stop.set()
        rejected_blobs = collector.events_of("victim", "rejected")
        assert all(seen for seen, _ in rogues), "a rogue was never asked"
        assert len(rejected_blobs) == len(blobs), [e.detail for e in rejected_blobs]
        assert snapshots and _identical(snapshots[0], _state(victim))
        assert len(learner.pool) == 0

        # 2. Config patches and 3. hostile batch-topic messages, with no valid batch in between.
        before, config_before, batches_before = _state(victim), victim.config_values(), learner.batch_index
        configs = _config_cases()
        refused_configs = []
        for name, payload in configs.items():
            acks.publish(topics.node_config("victim"), payload)
            ack = next_message(acks, ConfigAck, timeout=20)
            assert not ack.ok, (name, ack)
            refused_configs.append(name)
        assert collector.wait_for(lambda: len(collector.events_of("victim", "config_refused")) == len(configs), 30)

        sender = fleet.client()
        cases = _batch_cases("victim", ids)
        for payloads in cases.values():
            for payload in payloads:
                sender.publish(topics.node_batch("victim"), payload)
        expected = len(blobs) + len(cases)
        assert collector.wait_for(lambda: len(collector.events_of("victim", "rejected")) >= expected, 30)
        rejected_batches = collector.events_of("victim", "rejected")[len(blobs):]
        assert len(rejected_batches) == len(cases), [e.detail for e in rejected_batches]

        assert _identical(before, _state(victim)), "weights or optimiser state changed"
        assert victim.config_values() == config_before and learner.batch_index == batches_before
        assert victim.worker.alive() and victim.crashed is None
        assert feeder.step(t, [("victim", *data.batch(range(8)))]), "the agent no longer serves"

        # 4. A forged metadata message from the future on a helper's own meta topic must not
        # hide that helper from the MdS.
        helper_id = f"rogue-{sorted(blobs)[0].replace('_', '-')}"
        forged = NodeMeta(node_id=helper_id, hist=[0.0] * 10, ts=1e18, **ids)
        sender.publish(topics.node_meta(helper_id), encode(forged), 1, retain=True)
        mds_log = fleet.mds_child.log_text
        wait_until(lambda: f"metadata of {helper_id} refused" in mds_log(), 30, what="the MdS to refuse the forged metadata")
        query = HelpQuery(node_id="victim", classes=[8, 9], hist=[1.0] * 10, k=16, **ids)
        found = [c.node_id for c in sender.request(topics.mds_query(), query, timeout=10).candidates]
        future_refused = helper_id in found
        assert future_refused, found
        sender.clear_retained(topics.node_meta(helper_id))
    finally:
        victim.stop()
    record(
        "hostile",
        f"hostile inputs to a live agent: {len(blobs)} KT blobs rejected of {len(blobs)}, {len(refused_configs)} config "
        f"patches refused of {len(configs)}, {len(rejected_batches)} batch-topic messages rejected of {len(cases)}, "
        f"{int(future_refused)} future-stamped metadata refused of 1; "
        "weights, optimiser state and config bit-identical; agent still serving",
        {"blobs": sorted(blobs), "configs": refused_configs, "batch_topic": sorted(cases),
         "blob_rejections": [e.detail.get("reason", "")[:200] for e in rejected_blobs],
         "batch_rejections": [e.detail.get("reason", "")[:200] for e in rejected_batches]},
    )
