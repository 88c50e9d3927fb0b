"""Peers a target agent meets over the bus: rogues answering with what the test chooses, the blobs
a target must refuse, a well-formed source of blobs, and an in-process victim agent."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import numpy as np
import torch

from broker import topics
from broker.client import Responder
from broker.wire import KtBlob, KtRequest, NodeMeta
from support.fleet import Clusters, Fleet, learner_settings


def rogue(
    fleet: Fleet, node_id: str, meta_like: dict[str, str], hist: list[float], answer: Callable[[KtRequest], bytes] | None
) -> tuple[list[KtRequest], threading.Event]:
    """A node that advertises ``hist`` and answers every KT request with ``answer(request)``.

    It is a real MQTT client speaking the real protocol; it stands for a broken or malicious peer.
    ``answer=None`` makes it silent: it receives requests and never answers. Returns the requests
    it has seen and the event that stops it.
    """
    client = fleet.client(client_id=node_id, status_node_id=node_id)
    client.subscribe(topics.node_kt(node_id), 1)
    assert client.wait_subscribed(10)
    client.set_retained(
        topics.node_meta(node_id),
        NodeMeta(node_id=node_id, arch_id=meta_like["arch_id"], lineage=meta_like["lineage"], hist=hist),
    )
    seen: list[KtRequest] = []
    responder = Responder(client, lambda request, item: KtBlob(corr=request.corr, blob=answer(request)))
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            item = client.get(timeout=0.1)
            request = getattr(item, "message", None)
            if request is None or not request.is_request:
                continue
            seen.append(request)
            if answer is not None:
                responder.handle(item)

    threading.Thread(target=run, daemon=True).start()
    return seen, stop


def hostile_blobs(learner) -> dict[str, bytes]:
    """Blobs a target must refuse, each for a different reason."""
    import msgpack
    import zstandard

    from agent.kt import codec
    from agent.learner import Learner
    from agent.models import build_model

    sig = learner.significant_for((8, 9), 0.5)
    good = codec.encode_blob(sig, value_codec="float32")
    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(good), raw=False)

    def repack(mutate):
        d = msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False)
        mutate(d)
        return zstandard.ZstdCompressor(write_checksum=True).compress(msgpack.packb(d, use_bin_type=True))

    def nan(d):
        vals = np.frombuffer(d["tensors"][0]["val"], dtype="<f4").copy()
        vals[3] = np.nan
        d["tensors"][0]["val"] = vals.tobytes()

    def wrong_shape(d):
        d["tensors"][0]["shape"] = [d["tensors"][0]["shape"][0] + 1, d["tensors"][0]["shape"][1]]

    other = build_model("mlp4", 5, seed=0)
    foreign = Learner(other, num_classes=5)
    foreign.process_batch(torch.rand(8, 784), torch.arange(8) % 5)
    # A real frame that declares (and holds) 1 GiB of zeros: a few KiB on the wire.
    bomb = zstandard.ZstdCompressor(write_checksum=True).compressobj(size=1 << 30)
    zeros = bytes(1 << 20)
    bomb_blob = b"".join(bomb.compress(zeros) for _ in range(1024)) + bomb.flush()
    return {
        "nan": repack(nan),
        "wrong_shape": repack(wrong_shape),
        "wrong_arch": foreign.kt_blob((1,), 0.5),
        "truncated": good[: len(good) // 3],
        "zstd_bomb": bomb_blob,
    }


def peer_for_blobs(learner, data: Clusters):
    """A peer of the same lineage that has seen classes 8-9: the source of well-formed blobs."""
    from agent.learner import Learner

    peer = Learner(copy.deepcopy(learner.model), num_classes=10, base_state=learner._base_params)
    peer.lineage = learner.lineage
    peer.process_batch(torch.from_numpy(data.batch(range(10))[0]), torch.from_numpy(data.batch(range(10))[1]))
    return peer


def start_victim(fleet: Fleet, k: int):
    """An in-process agent named ``victim`` (so the test can look at its weights), and the MdS."""
    from agent.daemon import AgentDaemon
    from agent.settings import load_settings

    fleet.mds()
    settings = load_settings(
        node_id="victim", broker=fleet.broker_url, state_dir=str(fleet.state),
        learner=learner_settings(k=k), daemon={"meta_interval": 0.0, "kt_timeout": 5.0},
    )
    victim = AgentDaemon(settings)
    victim.start()
    return victim
