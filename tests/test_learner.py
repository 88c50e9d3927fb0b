"""The learner: one per-batch pipeline, KT as helper and as target, atomic config changes."""

import copy

import pytest
import torch

from agent.config import LearnerConfig, help_policy
from agent.errors import ConfigError, KtRejected
from agent.kt.coordinator import HelpCoordinator, QueryHelpers
from agent.kt.selection import select
from agent.learner import Learner
from agent.models import build_model


class Blobs:
    """Gaussian class clusters in 784-d: learnable in a few batches, so tests stay fast."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(10, 784, generator=self.g)

    def batch(self, classes, n=100):
        y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=self.g)]
        return self.centres[y] + 1.5 * torch.randn(n, 784, generator=self.g), y


def _fleet(n=2, **cfg):
    base = build_model("mlp4", 10, seed=0).state_dict()
    learners = []
    for i in range(n):
        model = build_model("mlp4", 10)
        model.load_state_dict(copy.deepcopy(base))
        learners.append(Learner(model, num_classes=10, config=LearnerConfig(**cfg), base_state=base, seed=i))
    return learners


def _weights(learner):
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_unlabelled_batch_serves_without_learning():
    (node,) = _fleet(1)
    before = _weights(node)
    x, _ = Blobs().batch(range(8))
    result = node.process_batch(x)
    assert result.y_hat.shape == (100,) and result.served_error is None
    assert _same(before, _weights(node))
    assert node.histogram().sum() == 0


def test_labelled_batch_learns_and_counts():
    (node,) = _fleet(1)
    before = _weights(node)
    x, y = Blobs().batch(range(8))
    result = node.process_batch(x, y)
    assert 0.0 <= result.served_error <= 1.0 and result.target_error == result.served_error
    assert not _same(before, _weights(node))
    assert node.histogram().sum() == 100 and node.histogram()[8:].sum() == 0
    assert set(result.class_errors) == set(y.tolist())


@pytest.mark.parametrize(
    "labels", [torch.full((100,), 10), torch.full((100,), -1), torch.zeros(99, dtype=torch.int64), torch.zeros(100)]
)
def test_bad_labels_rejected(labels):
    (node,) = _fleet(1)
    before = _weights(node)
    x, _ = Blobs().batch(range(8))
    with pytest.raises(ValueError):
        node.process_batch(x, labels)
    assert _same(before, _weights(node))


def test_a_batch_of_another_sample_shape_is_refused_when_the_shape_is_declared():
    x, y = Blobs().batch(range(8))
    images = x.reshape(100, 1, 28, 28)  # mlp4 flattens these, so only a declared shape tells them apart
    Learner(build_model("mlp4", 10, seed=0), num_classes=10).process_batch(images, y)
    node = Learner(build_model("mlp4", 10, seed=0), num_classes=10, input_shape=(784,))
    before = _weights(node)
    with pytest.raises(ValueError, match=r"samples of shape \(1, 28, 28\), the model takes \(784,\)"):
        node.process_batch(images, y)
    assert _same(before, _weights(node)) and node.batch_index == 0
    assert node.process_batch(x, y).batch_index == 0


class Asking:
    """A target's learner with its help coordinator; each help request is recorded and the MdS
    stand-in finds nobody, so the next request starts at once."""

    def __init__(self, learner):
        self.learner = learner
        self.help = HelpCoordinator(help_policy(learner.config))

    def step(self, x, y):
        """Process one batch; returns (result, the help request it made or None)."""
        result = self.learner.process_batch(x, y)
        asked = None
        if result.learnt:
            pool = self.learner.pool_state()
            for command in self.help.on_batch(result.batch_index, drift=result.drift_report, dropped=result.dropped, pool=pool):
                if isinstance(command, QueryHelpers):
                    asked = self.help.active
                    self.help.on_candidates(command.flow, [], pool=pool)
        return result, asked


def _drift_until_help(target, helper, blobs):
    asking = target if isinstance(target, Asking) else Asking(target)
    for _ in range(15):
        helper.process_batch(*blobs.batch(range(10)))
        asking.step(*blobs.batch(range(8)))
    for _ in range(10):
        helper.process_batch(*blobs.batch(range(10)))
        result, asked = asking.step(*blobs.batch(list(range(8)) + [8, 9] * 2))
        if asked is not None:
            return result, asked
    raise AssertionError("no help request after the drift")


def test_drift_leads_to_help_request_and_helper_install():
    target, helper = _fleet(2)
    blobs = Blobs()
    result, asked = _drift_until_help(target, helper, blobs)
    assert result.drift and set(result.drift_report.classes) == {8, 9} and asked.classes == (8, 9)
    blob = helper.kt_blob(asked.classes, asked.z, asked.value_codec)
    installed = target.accept_kt_blob(blob, classes=asked.classes, z=asked.z, source="node-1", baseline=asked.baseline)
    assert installed.helper_id is not None and installed.classes == (8, 9)
    assert len(target.pool) == 1 and next(iter(target.pool)).baseline_error == asked.baseline
    x, y = blobs.batch([8, 9])
    served = target.process_batch(x, y)
    assert served.helpers == (installed.helper_id,)
    assert served.served_error < served.target_error


def test_same_request_not_repeated_within_cooldown():
    target, helper = _fleet(2, help_cooldown=50, kt_apply="replace")
    blobs = Blobs()
    asking = Asking(target)
    _, first = _drift_until_help(asking, helper, blobs)
    again = [asking.step(*blobs.batch(list(range(8)) + [8, 9] * 2)) for _ in range(5)]
    assert any(r.drift for r, _ in again), "the drift goes on: only the cooldown keeps it from asking"
    assert all(h is None or h.classes != first.classes for _, h in again)


def _hostile_blobs(helper):
    good = helper.kt_blob((8, 9), 0.5, "float32")
    foreign = Learner(build_model("mlp4", 5, seed=0), num_classes=5)
    foreign.process_batch(torch.rand(10, 784), torch.arange(10) % 5)
    other_lineage = Learner(build_model("mlp4", 10, seed=99), num_classes=10)
    other_lineage.process_batch(*Blobs().batch(range(10)))
    return {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x28\xb5\x2f\xfd" + b"\x00" * 64,
        "empty": b"",
        "flipped": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
        "other arch": foreign.kt_blob((1,), 0.5),
        "other lineage": other_lineage.kt_blob((8, 9), 0.5),
        "nan values": _with_nan(good),
    }


def _with_nan(blob):
    import msgpack
    import numpy as np
    import zstandard

    doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(blob), raw=False)
    t = doc["tensors"][0]
    vals = np.frombuffer(t["val"], dtype="<f4").copy()
    vals[0] = np.nan
    t["val"] = vals.tobytes()
    return zstandard.ZstdCompressor(write_checksum=True).compress(msgpack.packb(doc, use_bin_type=True))


def test_hostile_blobs_change_nothing():
    target, helper = _fleet(2)
    blobs = Blobs()
    _drift_until_help(target, helper, blobs)
    before = _weights(target)
    pool_before = target.pool.ids()
    for name, blob in _hostile_blobs(helper).items():
        with pytest.raises(KtRejected):
            target.accept_kt_blob(blob, classes=(8, 9), z=0.5)
        assert _same(before, _weights(target)), name
        assert target.pool.ids() == pool_before, name


def test_helper_refuses_bad_requests():
    (node,) = _fleet(1)
    with pytest.raises(KtRejected, match="no request batch"):
        node.kt_blob((1,), 0.5)
    node.process_batch(*Blobs().batch(range(10)))
    for classes, z in [((10,), 0.5), ((1, 1), 0.5), ((), 0.5), ((1,), 0.0), ((1,), 1.5)]:
        with pytest.raises(KtRejected):
            node.kt_blob(classes, z)


@pytest.mark.parametrize("mode", ["replace", "average"])
def test_replace_and_average_modify_target_and_pool_nothing(mode):
    target, helper = _fleet(2, kt_apply=mode)
    blobs = Blobs()
    _drift_until_help(target, helper, blobs)
    before = _weights(target)
    installed = target.accept_kt_blob(helper.kt_blob((8, 9), 0.5), classes=(8, 9), z=0.5)
    assert installed.helper_id is None and len(target.pool) == 0
    assert not _same(before, _weights(target))


def test_random_selection_sends_same_count():
    target, helper = _fleet(2)
    helper.process_batch(*Blobs().batch(range(10)))
    sens = helper.significant_for((8, 9), 0.3)
    helper.apply_config({"selection": "random"})
    rnd = helper.significant_for((8, 9), 0.3)
    assert sens.count == rnd.count
    assert any(not torch.equal(a.indices, b.indices) for a, b in zip(sens.tensors, rnd.tensors))


def test_continuous_picker_answers_from_the_map():
    (node,) = _fleet(1, picker="continuous")
    with pytest.raises(KtRejected):
        node.kt_blob((8,), 0.5)
    blobs = Blobs()
    node.process_batch(*blobs.batch(range(10)))
    assert node.sensitivity_source.map.updates == 1
    # Class 8 is not refreshed yet (one class per update, round-robin): the reservoir answers.
    assert not node.sensitivity_source.map.covers((8,))
    assert node.significant_for((8,), 0.5).count > 0
    for _ in range(8):
        node.process_batch(*blobs.batch(range(10)))
    assert node.sensitivity_source.map.covers((8,))
    from_map = select(node.sensitivity_source.map.lookup((8,)), 0.5)
    got = node.significant_for((8,), 0.5)
    assert all(torch.equal(t.indices, from_map[t.name]) for t in got.tensors)


def test_config_patch_is_atomic():
    (node,) = _fleet(1)
    old = node.config
    with pytest.raises(ConfigError, match="z"):
        node.apply_config({"z": 1.5, "pool_max": 2, "bogus": 1})
    with pytest.raises(ConfigError):
        node.apply_config({"z": 1.5})
    assert node.config is old
    new = node.apply_config({"z": 0.3, "drift": {"window": 5}, "operator": {"type": "mean"}, "lr": 0.01})
    assert node.config.z == 0.3 and node.config.drift.window == 5 and node.operator.name == "mean"
    assert node.optimizer.param_groups[0]["lr"] == 0.01
    assert new is node.config


def test_config_change_keeps_pooled_helpers_up_to_new_bound():
    target, helper = _fleet(2)
    blobs = Blobs()
    _drift_until_help(target, helper, blobs)
    for _ in range(3):
        target.accept_kt_blob(helper.kt_blob((8, 9), 0.5), classes=(8, 9), z=0.5)
    assert len(target.pool) == 3
    target.apply_config({"pool_max": 1})
    assert len(target.pool) == 1


def test_help_delay_postpones_the_request():
    target, helper = _fleet(2, help_delay=3)
    asking = Asking(target)
    blobs = Blobs()
    for _ in range(15):
        helper.process_batch(*blobs.batch(range(10)))
        asking.step(*blobs.batch(range(8)))
    results = [asking.step(*blobs.batch(list(range(8)) + [8, 9] * 2)) for _ in range(10)]
    first_drift = next(i for i, (r, _) in enumerate(results) if r.drift)
    helps = [i for i, (_, h) in enumerate(results) if h is not None]
    assert helps and helps[0] == first_drift + 3
    assert set(results[helps[0]][1].classes) == {8, 9}


def test_a_wrong_helper_is_dropped_and_another_node_asked_after_the_cooldown():
    target, right = _fleet(2, help_cooldown=8)
    asking = Asking(target)
    (wrong,) = _fleet(1)
    blobs = Blobs()
    for _ in range(15):
        wrong.process_batch(*blobs.batch(range(4)))  # never sees classes 8-9
    _, first = _drift_until_help(asking, right, blobs)
    blob = wrong.kt_blob(first.classes, 0.5)
    with pytest.raises(KtRejected, match="below chance"):
        target.accept_kt_blob(blob, classes=first.classes, z=0.5, source="wrong")
    # A helper that passes that first look and only later proves no better than the target:
    # the pool's probation must still catch it.
    target.install(target.decode_blob(blob), source="wrong")
    results = [asking.step(*blobs.batch(list(range(8)) + [8, 9] * 2)) for _ in range(12)]
    dropped = next(i for i, (r, _) in enumerate(results) if r.discarded)
    assert dropped == target.pool.window - 1, "judged after its first L batches holding its classes"
    assert [h.source for h in results[dropped][0].dropped] == ["wrong"]
    assert len(target.pool) == 0
    helps = [(i, h) for i, (_, h) in enumerate(results) if h is not None]
    assert helps, "no second request after the wrong helper left"
    i, retry = helps[0]
    assert first.batch_index + 8 <= retry.batch_index and i > dropped
    assert set(retry.classes) == {8, 9} and retry.avoid == ("wrong",) and retry.reason == "unhelpful_helper"


def test_a_right_helper_survives_its_probation():
    # The paper's frozen helper: it stays pooled, judged useful.
    target, helper = _fleet(2, kt_apply="boost")
    blobs = Blobs()
    _, first = _drift_until_help(target, helper, blobs)
    target.accept_kt_blob(helper.kt_blob(first.classes, 0.5), classes=first.classes, z=0.5, source="right")
    for _ in range(target.pool.window + 1):
        target.process_batch(*blobs.batch(list(range(8)) + [8, 9] * 2))
    assert [h.source for h in target.pool] == ["right"] and next(iter(target.pool)).judged


def test_a_right_helper_is_promoted_into_the_target():
    # The default (kt_apply = "branch"): the helper's live branch beats the target within L batches
    # and becomes the target; it is never dropped as unhelpful, and the target keeps what it learnt.
    target, helper = _fleet(2)
    blobs = Blobs()
    _, first = _drift_until_help(target, helper, blobs)
    target.accept_kt_blob(helper.kt_blob(first.classes, 0.5), classes=first.classes, z=0.5, source="right")
    results = [target.process_batch(*blobs.batch(list(range(8)) + [8, 9] * 2)) for _ in range(target.pool.window + 3)]
    assert not any(r.dropped for r in results)
    assert [r.batch_index for r in results if r.promoted], "the live branch was never promoted"
    promoted_at = next(i for i, r in enumerate(results) if r.promoted)
    after = [r.target_error for r in results[promoted_at + 1 :]]
    before = [r.target_error for r in results[: target.pool.window]]
    assert max(after) < min(before)


def test_a_full_pool_asks_for_no_more_help():
    target, helper = _fleet(2, pool_max=1, drop_unhelpful=False)
    asking = Asking(target)
    blobs = Blobs()
    _drift_until_help(asking, helper, blobs)
    target.accept_kt_blob(helper.kt_blob((8,), 0.5), classes=(8,), z=0.5, source="eight")
    # Class 9 is still missing, but taking its helper would evict the one serving class 8.
    later = [asking.step(*blobs.batch(list(range(8)) + [9] * 8)) for _ in range(12)]
    assert any(r.drift for r, _ in later)
    assert [h for _, h in later] == [None] * 12


def test_int4_delta_blobs_go_out_as_deltas_whatever_value_delta_says():
    target, helper = _fleet(2, value_delta=False)
    blobs = Blobs()
    _, first = _drift_until_help(target, helper, blobs)
    blob = helper.kt_blob(first.classes, 0.5, "int4_delta")
    installed = target.accept_kt_blob(blob, classes=first.classes, z=0.5, source="helper")
    assert installed.classes == (8, 9)
    assert len(blob) < 0.6 * len(helper.kt_blob(first.classes, 0.5, "int8"))
