"""Helper selection: similarity values, top-k order and ties, and every eligibility rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mds.similarity import SIMILARITIES, eligible_mask, top_k

METRICS = sorted(SIMILARITIES)


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


# --- similarity values ---------------------------------------------------------------------------


def test_identical_is_one_disjoint_is_zero(metric: str) -> None:
    q = np.array([3, 1, 0, 0])
    H = np.array([[3, 1, 0, 0], [0, 0, 5, 2]])
    np.testing.assert_allclose(SIMILARITIES[metric](q, H), [1.0, 0.0], atol=1e-12)


def test_scale_invariant(metric: str) -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 50, 6)
    H = rng.integers(0, 50, (20, 6))
    sim = SIMILARITIES[metric]
    np.testing.assert_allclose(sim(q, H), sim(7 * q, H * 0.5), atol=1e-12)


def test_known_values() -> None:
    q = np.array([1, 0])
    H = np.array([[1, 1]])
    assert SIMILARITIES["cosine"](q, H)[0] == pytest.approx(1 / np.sqrt(2))
    # (1, 0) vs (1/2, 1/2): the midpoint is (3/4, 1/4); JS divergence in bits is the mean of the
    # two KL divergences to it.
    kl_q = np.log2(1 / 0.75)
    kl_h = 0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)
    js_distance = np.sqrt(0.5 * (kl_q + kl_h))
    assert SIMILARITIES["jensen_shannon"](q, H)[0] == pytest.approx(1 - js_distance)
    assert SIMILARITIES["hellinger"](q, H)[0] == pytest.approx(1 - np.sqrt(1 - np.sqrt(0.5)))


def test_empty_histograms_score_zero(metric: str) -> None:
    H = np.array([[0, 0, 0], [1, 2, 3]])
    np.testing.assert_allclose(SIMILARITIES[metric](np.array([1, 2, 3]), H), [0.0, 1.0])
    assert SIMILARITIES[metric](np.zeros(3), H).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "q, H",
    [
        (np.ones(3), np.ones((2, 4))),
        (np.ones((1, 3)), np.ones((2, 3))),
        (np.ones(3), np.ones(3)),
        (np.array([1.0, -1.0, 0.0]), np.ones((2, 3))),
        (np.ones(3), np.array([[1.0, np.nan, 0.0]])),
    ],
)
def test_bad_shapes_and_values_raise(metric: str, q: np.ndarray, H: np.ndarray) -> None:
    with pytest.raises(ValueError):
        SIMILARITIES[metric](q, H)


# --- top_k ---------------------------------------------------------------------------------------


def test_top_k_order(metric: str) -> None:
    q = np.array([10, 0, 0])
    H = np.array([[0, 0, 9], [6, 4, 0], [10, 0, 0], [8, 2, 0], [3, 3, 3]])
    idx, scores = top_k(q, H, 3, eligible=np.ones(5, bool), metric=metric)
    assert idx.tolist() == [2, 3, 1]
    assert np.all(np.diff(scores) <= 0)
    np.testing.assert_allclose(scores, SIMILARITIES[metric](q, H)[idx])


def test_top_k_ties_go_to_lower_index(metric: str) -> None:
    q = np.array([1, 1])
    H = np.array([[1, 0], [2, 2], [0, 5], [1, 1], [7, 7], [3, 3]])
    idx, _ = top_k(q, H, 2, eligible=np.ones(6, bool), metric=metric)
    assert idx.tolist() == [1, 3]  # 1, 3, 4, 5 tie at 1.0
    idx, _ = top_k(q, H, 5, eligible=np.ones(6, bool), metric=metric)
    assert idx.tolist() == [1, 3, 4, 5, 0]  # rows 0 and 2 tie below: lower index first


def test_top_k_respects_eligible_and_skips_empty_rows() -> None:
    q = np.array([1, 0])
    H = np.array([[1, 0], [0, 0], [1, 1], [1, 0]])
    idx, _ = top_k(q, H, 4, eligible=np.array([False, True, True, True]))
    assert idx.tolist() == [3, 2]


def test_top_k_more_than_eligible_and_zero() -> None:
    H = np.eye(4)
    idx, scores = top_k(np.ones(4), H, 10, eligible=np.array([True, False, True, False]))
    assert idx.tolist() == [0, 2] and scores.shape == (2,)
    idx, scores = top_k(np.ones(4), H, 0, eligible=np.ones(4, bool))
    assert idx.size == 0 and scores.size == 0
    idx, _ = top_k(np.ones(4), np.zeros((0, 4)), 3, eligible=np.zeros(0, bool))
    assert idx.size == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": -1},
        {"k": 1.5},
        {"metric": "euclid"},
        {"eligible": np.ones(3, bool)},
        {"eligible": np.ones(4, int)},
    ],
)
def test_top_k_bad_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"k": 2, "eligible": np.ones(4, bool), "metric": "cosine"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        top_k(np.ones(3), np.ones((4, 3)), **args)


def test_top_k_large_fleet() -> None:
    rng = np.random.default_rng(0)
    H = rng.integers(0, 1000, (100_000, 10))
    q = rng.integers(0, 1000, 10)
    for metric in METRICS:
        idx, scores = top_k(q, H, 5, eligible=rng.random(100_000) < 0.9, metric=metric)
        assert idx.shape == (5,) and np.all(np.diff(scores) <= 0)


# --- properties ----------------------------------------------------------------------------------


Fleet = tuple[np.ndarray, np.ndarray, np.ndarray, int]


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    n = draw(st.integers(0, 30))
    c = draw(st.integers(1, 6))
    # Small counts make exact ties (and all-zero rows) common.
    counts = st.integers(0, 4)
    q = draw(hnp.arrays(np.int64, c, elements=counts))
    H = draw(hnp.arrays(np.int64, (n, c), elements=counts))
    eligible = draw(hnp.arrays(np.bool_, n))
    k = draw(st.integers(0, n + 2))
    return q, H, eligible, k


@settings(max_examples=150, deadline=None)
@given(fleet=fleets(), metric=st.sampled_from(METRICS))
def test_scores_in_unit_interval(fleet: Fleet, metric: str) -> None:
    q, H, _, _ = fleet
    scores = SIMILARITIES[metric](q, H)
    assert scores.shape == (H.shape[0],)
    assert np.all((scores >= 0) & (scores <= 1))


@settings(max_examples=150, deadline=None)
@given(fleet=fleets(), metric=st.sampled_from(METRICS))
def test_top_k_matches_full_sort(fleet: Fleet, metric: str) -> None:
    q, H, eligible, k = fleet
    scores = SIMILARITIES[metric](q, H)
    rows = [i for i in range(H.shape[0]) if eligible[i] and H[i].sum() > 0]
    expected = sorted(rows, key=lambda i: (-scores[i], i))[:k]
    idx, got = top_k(q, H, k, eligible=eligible, metric=metric)
    assert idx.tolist() == expected
    assert got.tolist() == scores[expected].tolist()


# --- eligible_mask -------------------------------------------------------------------------------


def fleet_kwargs(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node_ids": ["a", "b", "c", "d", "e"],
        "online": [True, True, True, False, True],
        "arch_ids": ["mlp", "mlp", "cnn", "mlp", "mlp"],
        "lineages": ["L1", "L1", "L1", "L1", "L2"],
        "asker_id": "a",
        "arch_id": "mlp",
        "lineage": "L1",
    }
    base.update(over)
    return base


def test_eligible_excludes_self_offline_other_arch_other_lineage() -> None:
    # a: the asker; c: other architecture; d: offline; e: other lineage.
    assert eligible_mask(**fleet_kwargs()).tolist() == [False, True, False, False, False]


def test_eligible_each_rule_alone() -> None:
    same = {"arch_ids": ["mlp"] * 5, "lineages": ["L1"] * 5, "online": [True] * 5}
    assert eligible_mask(**fleet_kwargs(**same)).tolist() == [False, True, True, True, True]
    off = dict(same, online=np.array([True, False, True, True, True]))
    assert eligible_mask(**fleet_kwargs(**off)).tolist() == [False, False, True, True, True]
    arch = dict(same, arch_ids=["mlp", "mlp", "mlp", "cnn", "mlp"])
    assert eligible_mask(**fleet_kwargs(**arch)).tolist() == [False, True, True, False, True]
    lin = dict(same, lineages=["L1", "L1", "L1", "L1", "L9"])
    assert eligible_mask(**fleet_kwargs(**lin)).tolist() == [False, True, True, True, False]


def test_eligible_requires_every_asked_class() -> None:
    same = {"arch_ids": ["mlp"] * 5, "lineages": ["L1"] * 5, "online": [True] * 5}
    hists = np.array(
        [
            [50, 50, 0, 0],  # the asker
            [40, 40, 10, 10],  # has both 2 and 3
            [45, 45, 10, 0],  # lacks 3
            [98, 1, 0.5, 0.5],  # 0.5 % of each: below 1 %
            [0, 0, 0, 0],  # has seen nothing
        ]
    )
    kw = fleet_kwargs(**same, hists=hists, required_classes=[2, 3])
    assert eligible_mask(**kw).tolist() == [False, True, False, False, False]
    kw = fleet_kwargs(**same, hists=hists, required_classes=[2, 3], min_class_share=0.005)
    assert eligible_mask(**kw).tolist() == [False, True, False, True, False]
    kw = fleet_kwargs(**same, hists=hists, required_classes=[2])
    assert eligible_mask(**kw).tolist() == [False, True, True, False, False]
    kw = fleet_kwargs(**same, hists=hists)  # nothing required: histogram not consulted
    assert eligible_mask(**kw).tolist() == [False, True, True, True, True]


@pytest.mark.parametrize(
    "over",
    [
        {"online": [True, True]},
        {"arch_ids": ["mlp"] * 4},
        {"online": [1, 1, 1, 0, 1]},
        {"required_classes": [1]},  # no hists
        {"required_classes": [9], "hists": np.ones((5, 4))},
        {"required_classes": [1], "hists": np.ones((4, 4))},
        {"min_class_share": 1.5},
    ],
)
def test_eligible_bad_input(over: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        eligible_mask(**fleet_kwargs(**over))


def test_eligible_empty_fleet() -> None:
    mask = eligible_mask(
        node_ids=[], online=[], arch_ids=[], lineages=[], asker_id="a", arch_id="mlp", lineage="L1"
    )
    assert mask.shape == (0,) and mask.dtype == bool
