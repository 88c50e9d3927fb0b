import math

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from agent.ensemble import ClassAwareOperator, MeanOperator, OperatorConfig
from agent.kt.pool import (
    DiscardConfig,
    DynamicDiscard,
    HelperPool,
    PooledHelper,
    StaticDiscard,
)


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_mean_is_the_mean_of_softmaxes():
    t, h1, h2 = _probs([[0.6, 0.4]]), _probs([[0.0, 1.0]]), _probs([[0.3, 0.7]])
    out = MeanOperator().combine(t, [h1, h2], [[1], [1]])
    assert torch.allclose(out, _probs([[0.3, 0.7]]))
    assert MeanOperator().combine(t, [], []) is t


def test_class_aware_one_helper_weights():
    op = ClassAwareOperator(w=0.9)
    t = _probs([[0.5, 0.3, 0.2]])
    h = _probs([[0.1, 0.1, 0.8]])
    out = op.combine(t, [h], [[2]])
    raw = torch.tensor([0.9 * 0.5 + 0.1 * 0.1, 0.9 * 0.3 + 0.1 * 0.1, 0.1 * 0.2 + 0.9 * 0.8])
    assert torch.allclose(out[0], raw / raw.sum())
    assert torch.allclose(out.sum(dim=1), torch.ones(1))


def test_class_aware_keeps_target_on_classes_the_helper_never_saw():
    """A helper built for class 2 that is confidently wrong elsewhere barely moves the target there."""
    t = _probs([[0.7, 0.1, 0.2]])
    bad_helper = _probs([[0.0, 1.0, 0.0]])
    assert ClassAwareOperator(0.9).combine(t, [bad_helper], [[2]]).argmax().item() == 0
    assert MeanOperator().combine(t, [bad_helper], [[2]]).argmax().item() == 1


def test_class_aware_several_helpers_sum_to_one():
    g = torch.Generator().manual_seed(0)
    rows = [torch.softmax(torch.randn(5, 4, generator=g), dim=1) for _ in range(3)]
    out = ClassAwareOperator(0.8).combine(rows[0], rows[1:], [[1], [2, 3]])
    assert torch.allclose(out.sum(dim=1), torch.ones(5), atol=1e-6)
    assert (out >= 0).all()


def test_operator_config_by_type():
    adapter = TypeAdapter(OperatorConfig)
    assert adapter.validate_python({"type": "mean"}).build().name == "mean"
    op = adapter.validate_python({"type": "class_aware", "w": 0.7}).build()
    assert op.name == "class_aware" and op.w == 0.7
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "class_aware", "w": 1.5})
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "median"})
    with pytest.raises(ValueError):
        ClassAwareOperator(0.2)


def _helper(hid, installed_at, baseline=0.2, classes=(8, 9)):
    return PooledHelper(helper_id=hid, model=nn.Identity(), classes=classes, installed_at=installed_at, baseline_error=baseline)


def test_dynamic_discard_waits_for_recovery_and_min_batches():
    pool = HelperPool(DynamicDiscard(tolerance=0.02, min_batches=3), max_size=4)
    pool.add(_helper("a", installed_at=10))
    assert pool.discard_check(batch_index=11, target_rolling_error=0.1) == []  # too soon
    assert pool.discard_check(batch_index=14, target_rolling_error=0.3) == []  # not recovered
    assert pool.discard_check(batch_index=14, target_rolling_error=None) == []
    assert pool.discard_check(batch_index=14, target_rolling_error=0.21) == ["a"]
    assert len(pool) == 0


def test_dynamic_discard_drops_worst_first_one_per_batch():
    pool = HelperPool(DynamicDiscard(), max_size=4, window=3)
    pool.add(_helper("good", 0))
    pool.add(_helper("bad", 0))
    for e_good, e_bad in [(0.1, 0.9), (0.2, 0.8), (0.1, 0.7)]:
        pool.record_error("good", e_good)
        pool.record_error("bad", e_bad)
    assert pool.discard_check(batch_index=10, target_rolling_error=0.1) == ["bad"]
    assert pool.discard_check(batch_index=11, target_rolling_error=0.1) == ["good"]


def test_static_discard_after_n_batches():
    pool = HelperPool(StaticDiscard(5), max_size=4)
    pool.add(_helper("a", 0))
    pool.add(_helper("b", 3))
    assert pool.discard_check(batch_index=4, target_rolling_error=None) == []
    assert pool.discard_check(batch_index=5, target_rolling_error=None) == ["a"]
    assert pool.discard_check(batch_index=8, target_rolling_error=0.9) == ["b"]


def test_pool_bound_evicts_worst():
    pool = HelperPool(StaticDiscard(100), max_size=2, window=2)
    pool.add(_helper("a", 0))
    pool.add(_helper("b", 1))
    pool.record_error("a", 0.1)
    pool.record_error("b", 0.6)
    assert pool.add(_helper("c", 2)) == ["b"]
    assert pool.ids() == ["a", "c"] and len(pool) == 2
    with pytest.raises(ValueError):
        pool.add(_helper("a", 3))
    assert math.isinf(_helper("x", 0).recent_error())


def test_discard_config_by_type():
    adapter = TypeAdapter(DiscardConfig)
    assert adapter.validate_python({"type": "static", "n_batches": 7}).build().n_batches == 7
    assert adapter.validate_python({"type": "dynamic"}).build().name == "dynamic"
    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "dynamic", "tolerance": -1})


def test_unhelpful_helpers_are_judged_once_after_l_batches():
    pool = HelperPool(StaticDiscard(100), max_size=4, window=3)
    pool.add(_helper("useful", 0))
    pool.add(_helper("wrong", 0))
    pool.add(_helper("untested", 0))
    for _ in range(2):
        pool.record_error("useful", 0.3, 0.9)
        pool.record_error("wrong", 0.95, 0.9)
    assert pool.drop_unhelpful() == []  # two batches of three: not judged yet
    pool.record_error("useful", 0.3, 0.9)
    pool.record_error("wrong", 0.9, 0.9)  # no better than the target: as good as no helper
    assert [h.helper_id for h in pool.drop_unhelpful()] == ["wrong"]
    assert pool.ids() == ["useful", "untested"]
    # Judged once: a target that later catches up does not make a proven helper "unhelpful".
    for _ in range(3):
        pool.record_error("useful", 0.3, 0.1)
    assert pool.drop_unhelpful() == [] and "useful" in pool.ids()
    # Without the target's own error (the caller had none) nothing is judged.
    pool.record_error("untested", 0.9)
    assert pool.drop_unhelpful() == []
