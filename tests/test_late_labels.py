"""Labels that come after their batch: the learner, the served-batch store, the wire.

In process: labels given later teach exactly what they teach with the batch; partial labels in
any order; every bad case is refused and changes nothing; the store stays within its bounds and
the daemon's memory stays flat over 100,000 unlabelled batches; a full batch's labels fit 1 KB.
The agents over MQTT are in ``tests/test_late_labels_e2e.py``.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from agent.config import LearnerConfig
from agent.learner import Learner
from agent.models import build_model
from agent.served import LabelsRefused, ServedStore
from broker import topics
from broker.app_client import smallest_int_array
from broker.wire import ArrayPayload, Labels, decode_app, encode

C = 6


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))


def _learner(seed: int = 0) -> Learner:
    model = _model()
    return Learner(model, num_classes=C, config=LearnerConfig(lr=1e-2), base_state=copy.deepcopy(model.state_dict()), seed=seed)


def _batches(n: int, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, 8)).astype(np.float32)
    out = []
    for _ in range(n):
        y = rng.integers(0, C, size=size)
        x = centres[y] + 0.5 * rng.normal(size=(size, 8)).astype(np.float32)
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


def _weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_labels_given_later_teach_exactly_what_they_teach_with_the_batch():
    batches = _batches(12)
    now, later = _learner(), _learner()
    for x, y in batches:
        now.process_batch(x, y)
    served = [later.serve(x) for x, _ in batches[:3]]
    for i, (_, y) in enumerate(batches):
        if i + 3 < len(batches):
            served.append(later.serve(batches[i + 3][0]))
        later.learn(served[i], y)
    # Served before any of the labels came, so the predictions differ; the labels' lessons do not
    # depend on the model that served: the same steps on the same samples, in the same order.
    assert _same(_weights(now), _weights(later))
    assert np.array_equal(now.histogram(), later.histogram())
    assert now.model_version == later.model_version == len(batches)


def test_partial_labels_in_any_order_learn_only_those_samples():
    learner = _learner()
    (x, y), = _batches(1, size=10)
    served = learner.serve(x)
    first = learner.learn(served, y[[7, 2, 5]], torch.tensor([7, 2, 5]))
    assert first.learnt and first.y_hat.shape == (3,)
    assert first.served_error == float((served.result.y_hat[[7, 2, 5]] != y[[7, 2, 5]]).float().mean())
    assert learner.histogram().sum() == 3
    learner.learn(served, y[[0, 9]], torch.tensor([0, 9]))
    assert learner.histogram().sum() == 5 and learner.model_version == 2


@pytest.mark.parametrize(
    ("labels", "indices", "match"),
    [
        (torch.tensor([0, 1, 2]), None, "labels must be int of shape"),
        (torch.tensor([0, 1]), torch.tensor([0, 0]), "an index is given twice"),
        (torch.tensor([0, 1]), torch.tensor([0, 10]), r"indices outside \[0, 10\)"),
        (torch.tensor([0, 1]), torch.tensor([0]), "2 labels for 1 indices"),
        (torch.tensor([0, C]), torch.tensor([0, 1]), r"labels outside \[0, 6\)"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "labels must be int"),
    ],
)
def test_bad_labels_are_refused_and_change_nothing(labels, indices, match):
    learner = _learner()
    (x, _), = _batches(1, size=10)
    served = learner.serve(x)
    before = (_weights(learner), learner.histogram(), learner.batch_index, learner.model_version)
    with pytest.raises(ValueError, match=match):
        learner.learn(served, labels, indices)
    assert _same(before[0], _weights(learner))
    assert np.array_equal(before[1], learner.histogram())
    assert (learner.batch_index, learner.model_version) == before[2:]


def test_the_store_refuses_unknown_expired_finished_and_twice_labelled_batches():
    learner = _learner()
    store = ServedStore(max_batches=2, max_bytes=1 << 30)
    batches = _batches(3, size=4)
    for batch_id, (x, _) in enumerate(batches):
        store.put(batch_id, learner.serve(x))
    assert len(store) == 2 and store.expired_batches == 1 and store.expired_samples == 4
    with pytest.raises(LabelsRefused, match="batch 0 expired"):
        store.lookup(0, 4, None)
    with pytest.raises(LabelsRefused, match="batch 99 is unknown"):
        store.lookup(99, 4, None)
    with pytest.raises(LabelsRefused, match="3 labels for batch 1 of 4 samples"):
        store.lookup(1, 3, None)
    store.lookup(1, 2, np.array([3, 1]))
    assert not store.mark(1, np.array([3, 1]))
    with pytest.raises(LabelsRefused, match=r"samples \[1\] of batch 1 are labelled already"):
        store.lookup(1, 2, np.array([0, 1]))
    with pytest.raises(LabelsRefused, match="2 samples of batch 1 are labelled already"):
        store.lookup(1, 4, None)
    assert store.mark(1, np.array([0, 2])) and 1 not in store
    with pytest.raises(LabelsRefused, match="every sample of batch 1 is labelled already"):
        store.lookup(1, 2, np.array([0, 2]))
    # The partly labelled batch 2 expires with its 4 unlabelled samples, counted.
    store.resize(0, 0)
    assert len(store) == 0 and store.nbytes == 0 and (store.expired_batches, store.expired_samples) == (2, 8)


def test_the_store_keeps_to_its_byte_bound():
    learner = _learner()
    (x, _), = _batches(1, size=50)
    one = learner.serve(x)
    store = ServedStore(max_batches=1000, max_bytes=5 * (one.nbytes + 50))
    for batch_id in range(20):
        store.put(batch_id, learner.serve(x))
        assert store.nbytes <= store.max_bytes
    assert len(store) == 5 and store.expired_batches == 15


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_a_hundred_thousand_unlabelled_batches_keep_memory_flat(one_torch_thread):
    learner = _learner()
    store = ServedStore(max_batches=256, max_bytes=1 << 20)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)).clamp(-5, 5)
    rss = {}
    for batch_id in range(100_000):
        store.put(batch_id, learner.serve(x.clone()))
        if batch_id in (20_000, 99_999):
            rss[batch_id] = _rss()
    assert len(store) == 256 and store.expired_batches == 100_000 - 256
    assert rss[99_999] - rss[20_000] < 8 << 20, f"grew {(rss[99_999] - rss[20_000]) >> 10} KiB"


def test_the_default_bounds_cost_at_most_64_mb_for_the_default_model_and_batch():
    from agent.settings import DaemonKnobs

    knobs = DaemonKnobs()
    model = build_model("mlp4", 10)
    learner = Learner(model, num_classes=10, base_state=copy.deepcopy(model.state_dict()))
    store = ServedStore(knobs.served_max_batches, int(knobs.served_max_mb * (1 << 20)))
    rng = np.random.default_rng(0)
    learner.serve(torch.from_numpy(rng.random((200, 784), dtype=np.float32)))  # torch's one-time set-up is not the store's
    before = _rss()
    for batch_id in range(knobs.served_max_batches + 20):
        x = torch.from_numpy(rng.random((200, 784), dtype=np.float32))
        store.put(batch_id, learner.serve(x))
    grown = _rss() - before
    assert store.nbytes <= knobs.served_max_mb * (1 << 20) and store.expired_batches > 0, "the byte bound is what binds"
    print(f"served-batch store at its default bounds: {len(store)} batches, {store.nbytes / 1e6:.1f} MB kept, resident memory +{grown / 1e6:.1f} MB")
    assert grown <= 64e6, f"the store's batches took {grown / 1e6:.1f} MB"


def test_a_full_batchs_labels_fit_in_a_kilobyte():
    labels = Labels(batch_id=(1 << 52) + 12345, y=ArrayPayload.from_numpy(smallest_int_array(np.arange(200) % 10)), reply_to=topics.app_reply("app"),
                    corr="0123456789abcdef0123456789abcdef")
    assert len(encode(labels)) <= 1024
    as_json = b'{"batch_id": 7, "y": [' + b", ".join(b"%d" % (i % 10) for i in range(200)) + b"]}"
    assert len(as_json) <= 1024 and decode_app(as_json, bare_type="labels").y.shape == [200]


def test_labels_take_the_smallest_integer_type():
    assert smallest_int_array([1, 2]).dtype == np.uint8
    assert smallest_int_array([1, 300]).dtype == np.int16
    assert smallest_int_array([-1, 2]).dtype == np.int32
    with pytest.raises(ValueError):
        smallest_int_array([0.5])


def test_labels_after_a_promotion_judge_each_model_by_what_it_predicted():
    """A live branch promoted between a batch's serving and its labels is the target now: the
    target's prediction then is the old target's, which took the branch's member id."""
    learner = _learner()
    (x, _), = _batches(1, size=4)
    served = learner.serve(x)
    old_target, branch = torch.full((4, C), 0.1), torch.full((4, C), 0.2)
    served.target_p, served.member_ps = old_target, {"h0": torch.zeros(4, C), "h0+": branch}
    learner._promoted_members.append("h0+")
    learner._promotions += 1
    now_target, members = learner._as_now(served)
    assert now_target is branch and members["h0+"] is old_target and members["h0"] is served.member_ps["h0"]
    served.promotions = 1
    assert learner._as_now(served)[0] is old_target, "no promotion since it was served"


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"batch_id": 1, "y": [1.5]}', "whole numbers"),
        (b'{"batch_id": 1, "y": [[1], [2, 3]]}', "rectangular"),
        (b'{"batch_id": 1, "y": [true]}', "bool"),
        (b'{"batch_id": 1, "y": ["1"]}', "str"),
        (b'{"batch_id": 1, "y": [1e30]}', "whole numbers"),
        (b'{"batch_id": 1, "y": []}', "no label"),
        (b'{"batch_id": 1, "y": [1], "y": [2]}', "duplicate key"),
        (b'{"batch_id": 1, "y": [1, 2], "indices": [0]}', "2 labels for 1 indices"),
        (b'{"batch_id": 1, "y": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}", "deeper"),
        (b'{"batch_id": 1, "y": [NaN]}', "NaN"),
        (b'{"batch_id": -1, "y": [1]}', "batch_id"),
        (b'{"batch_id": 1, "y": [1], "extra": 2}', "extra"),
        (b"[1, 2]", "neither|msgpack|map"),
    ],
)
def test_json_labels_that_do_not_fit_are_refused_with_why(payload, match):
    from broker.errors import WireError

    with pytest.raises(WireError, match=match):
        decode_app(payload, bare_type="labels")


def test_a_json_batch_becomes_float32_samples_and_the_size_limit_comes_first():
    from broker.errors import MessageTooLarge, WireError

    batch = decode_app(b'{"batch_id": 2, "x": [[1, 2.5], [0, -1]], "top_k": 1}', bare_type="batch")
    assert batch.x.dtype == "float32" and batch.x.shape == [2, 2] and batch.top_k == 1
    with pytest.raises(MessageTooLarge):
        decode_app(b'{"batch_id": 2, "x": [[' + b"0," * 1000 + b"0]]}", bare_type="batch", max_bytes=1024)
    with pytest.raises(WireError, match="beyond float32's range"):
        decode_app(b'{"batch_id": 2, "x": [[1e39]]}', bare_type="batch")
