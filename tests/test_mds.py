"""`mds.store.NodeStore`: metadata upserts, liveness, every exclusion rule, top-k order (checked
against the pure `mds.similarity` functions), persistence across reopening, WAL, bad input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from broker.errors import TopicError
from broker.wire import NodeMeta
from mds.similarity import SIMILARITIES, eligible_mask, top_k
from mds.store import MAX_CLASSES, Match, NodeStore, QueryRejected


def meta(node_id: str, hist, *, arch: str = "mlp", lineage: str = "b0", ts: float = 1.0, **fields) -> NodeMeta:
    return NodeMeta(node_id=node_id, arch_id=arch, lineage=lineage, hist=[float(x) for x in hist], ts=ts, **fields)


def unchecked_meta(node_id: str, hist: list[float]) -> NodeMeta:
    """A NodeMeta that skipped validation, as an in-process caller could build one."""
    return NodeMeta.model_construct(
        node_id=node_id, arch_id="mlp", lineage="b0", hist=hist, ts=1.0, batches=0, helpers=0, rolling_error=None
    )


def add(store: NodeStore, node_id: str, hist, *, online: bool = True, **kw) -> None:
    store.upsert_meta(meta(node_id, hist, **kw))
    store.set_online(node_id, online)


def ids(found: list[Match]) -> list[str]:
    return [m.node_id for m in found]


@pytest.fixture
def store() -> NodeStore:
    with NodeStore(":memory:") as s:
        yield s


# --- metadata and liveness -------------------------------------------------------------------


def test_upsert_stores_every_field(store: NodeStore) -> None:
    store.upsert_meta(meta("n1", [3, 1, 0], rolling_error=0.25, batches=7, helpers=1, ts=5.0))
    record = store.get("n1")
    assert record is not None
    fields = (record.arch_id, record.lineage, record.rolling_error, record.batches, record.helpers)
    assert fields == ("mlp", "b0", 0.25, 7, 1)
    np.testing.assert_array_equal(record.hist, [3.0, 1.0, 0.0])
    assert record.meta_ts == 5.0 and not record.online
    assert store.get("nobody") is None


def test_the_latest_meta_wins_whatever_its_ts(store: NodeStore) -> None:
    store.upsert_meta(meta("n1", [1, 0], ts=1e18))  # a sender's stamp orders nothing
    store.upsert_meta(meta("n1", [0, 1], ts=9.0))
    record = store.get("n1")
    np.testing.assert_array_equal(record.hist, [0, 1])
    assert record.meta_ts == 9.0
    store.upsert_meta(meta("n1", [0, 5], ts=11.0))
    np.testing.assert_array_equal(store.get("n1").hist, [0, 5])


def test_online_only_after_an_online_status(store: NodeStore) -> None:
    add(store, "a", [1, 0], online=False)
    store.upsert_meta(meta("b", [1, 0]))  # metadata alone: not a helper
    assert store.query("x", "mlp", "b0", [], [1, 0], 5) == []
    assert store.set_online("b", True)
    assert not store.set_online("b", True)  # no change
    assert ids(store.query("x", "mlp", "b0", [], [1, 0], 5)) == ["b"]
    store.set_online("b", False)
    assert store.query("x", "mlp", "b0", [], [1, 0], 5) == []
    assert store.count() == 2 and store.count(online=True) == 0 and store.count(online=False) == 2


def test_status_before_meta_is_kept(store: NodeStore) -> None:
    store.set_online("early", True)
    assert store.count() == 0  # no metadata yet: not counted, not a helper
    store.upsert_meta(meta("early", [2, 2]))
    assert ids(store.query("x", "mlp", "b0", [], [1, 1], 1)) == ["early"]


def test_remove_forgets_a_node(store: NodeStore) -> None:
    add(store, "a", [1, 0])
    add(store, "b", [1, 1])
    assert store.remove("a") and not store.remove("a")
    assert store.get("a") is None
    assert ids(store.query("x", "mlp", "b0", [], [1, 0], 5)) == ["b"]


# --- exclusion rules and order ---------------------------------------------------------------


def test_every_exclusion_rule(store: NodeStore) -> None:
    add(store, "asker", [5, 5, 0, 0])
    add(store, "good", [4, 4, 2, 0])
    add(store, "offline", [4, 4, 2, 0], online=False)
    add(store, "other-arch", [4, 4, 2, 0], arch="cnn")
    add(store, "other-lineage", [4, 4, 2, 0], lineage="b1")
    add(store, "lacks-class", [4, 4, 0, 0])
    add(store, "too-little", [1000, 1000, 1, 0])  # 0.05% of class 2, below the 1% share
    add(store, "also-good", [0, 0, 5, 5])
    found = store.query("asker", "mlp", "b0", [2], [5, 5, 0, 0], 10)
    assert set(ids(found)) == {"good", "also-good"}
    # With a share of 0 the class rule lets everyone through, best match first.
    assert ids(store.query("asker", "mlp", "b0", [2], [5, 5, 0, 0], 10, min_class_share=0.0)) == [
        "lacks-class",
        "too-little",
        "good",
        "also-good",
    ]
    # Without required classes every online node of the group but the asker qualifies.
    assert set(ids(store.query("asker", "mlp", "b0", [], [5, 5, 0, 0], 10))) == {
        "good",
        "lacks-class",
        "too-little",
        "also-good",
    }


def test_top_k_order_and_k(store: NodeStore) -> None:
    add(store, "same", [9, 1, 0])
    add(store, "close", [7, 3, 0])
    add(store, "far", [1, 1, 8])
    add(store, "empty", [0, 0, 0])  # has seen nothing: never a helper
    found = store.query("x", "mlp", "b0", [], [9, 1, 0], 3)
    assert ids(found) == ["same", "close", "far"]
    assert found[0][1] == pytest.approx(1.0)
    assert [m.score for m in found] == sorted((m.score for m in found), reverse=True)
    assert ids(store.query("x", "mlp", "b0", [], [9, 1, 0], 1)) == ["same"]
    assert store.query("x", "mlp", "b0", [], [9, 1, 0], 0) == []


@pytest.mark.parametrize("metric", sorted(SIMILARITIES))
def test_query_agrees_with_the_pure_functions(metric: str) -> None:
    """Random fleet with churn (growth past the initial rows, removals, moves, liveness): the
    store's answer equals `eligible_mask` + `top_k` over its snapshot."""
    rng = np.random.default_rng(7)
    with NodeStore(":memory:") as store:
        for i in range(300):
            hist = rng.random(6) * (rng.random(6) > 0.4)
            arch, lineage = str(rng.choice(["mlp", "mlp", "cnn"])), str(rng.choice(["b0", "b0", "b1"]))
            add(store, f"n{i}", hist, arch=arch, lineage=lineage, online=bool(rng.random() < 0.8))
        for i in rng.choice(300, 60, replace=False):
            store.remove(f"n{i}")
        for i in range(300, 340):
            add(store, f"n{i}", rng.random(6), ts=2.0)
        for _ in range(10):
            q = rng.random(6)
            classes = sorted(set(rng.integers(0, 6, int(rng.integers(0, 3))).tolist()))
            snap = store.snapshot()
            mask = eligible_mask(
                node_ids=snap.node_ids,
                online=snap.online,
                arch_ids=snap.arch_ids,
                lineages=snap.lineages,
                asker_id="n310",
                arch_id="mlp",
                lineage="b0",
                hists=snap.hists,
                required_classes=classes,
                min_class_share=0.05,
            )
            idx, scores = top_k(q, snap.hists, 8, eligible=mask, metric=metric)
            found = store.query("n310", "mlp", "b0", classes, q, 8, metric=metric, min_class_share=0.05)
            assert ids(found) == snap.node_ids[idx].tolist()
            np.testing.assert_allclose([m.score for m in found], scores, rtol=1e-12)


def test_moving_to_another_group_and_changing_width_alone(store: NodeStore) -> None:
    add(store, "a", [1, 0, 0])
    add(store, "b", [1, 0, 0])
    store.upsert_meta(meta("a", [1, 0, 0, 0], arch="cnn", ts=2.0))
    assert ids(store.query("x", "mlp", "b0", [], [1, 0, 0], 5)) == ["b"]
    assert ids(store.query("x", "cnn", "b0", [], [1, 0, 0, 0], 5)) == ["a"]
    store.upsert_meta(meta("a", [1, 0], arch="cnn", ts=3.0))  # its group's only node: the width may change
    assert ids(store.query("x", "cnn", "b0", [], [1, 0], 5)) == ["a"]


def test_snapshot_pads_narrower_groups(store: NodeStore) -> None:
    add(store, "a", [1, 2], arch="small")
    add(store, "b", [1, 2, 3], arch="wide", online=False)
    snap = store.snapshot()
    assert snap.hists.shape == (2, 3)
    rows = dict(zip(snap.node_ids.tolist(), snap.hists.tolist()))
    assert rows == {"a": [1, 2, 0], "b": [1, 2, 3]}
    assert dict(zip(snap.node_ids.tolist(), snap.online.tolist())) == {"a": True, "b": False}
    assert store.snapshot(arch_id="wide").node_ids.tolist() == ["b"]


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hist",
    [[], [float("nan"), 1.0], [float("inf")], [-1.0, 2.0], [1.0] * (MAX_CLASSES + 1)],
    ids=["empty", "nan", "inf", "negative", "too-wide"],
)
def test_bad_histograms_are_rejected(store: NodeStore, hist: list[float]) -> None:
    bad = unchecked_meta("n1", hist)
    with pytest.raises(ValueError):
        store.upsert_meta(bad)
    assert store.get("n1") is None
    add(store, "ok", [1.0])
    with pytest.raises(QueryRejected) as info:
        store.query("x", "mlp", "b0", [], hist, 1)
    assert info.value.code == "bad_request"


def test_width_must_match_the_group(store: NodeStore) -> None:
    add(store, "a", [1, 0, 0])
    add(store, "b", [1, 0, 0])
    with pytest.raises(ValueError, match="3"):
        store.upsert_meta(meta("c", [1, 0], ts=2.0))
    with pytest.raises(ValueError):
        store.upsert_meta(meta("a", [1, 0], ts=2.0))  # not alone in its group
    assert store.get("c") is None and store.get("a").hist.size == 3


def test_bad_node_ids_are_rejected(store: NodeStore) -> None:
    with pytest.raises(TopicError):
        store.set_online("a/b", True)
    with pytest.raises(TopicError):
        store.upsert_meta(unchecked_meta("+", [1.0]))


def test_bad_queries_are_rejected_with_a_code(store: NodeStore) -> None:
    add(store, "a", [1, 0, 0])

    def code(**kw) -> str:
        args = {"asker": "x", "arch_id": "mlp", "lineage": "b0", "classes": [], "hist": [1, 0, 0], "k": 1} | kw
        with pytest.raises(QueryRejected) as info:
            store.query(**args)
        return info.value.code

    assert code(arch_id="cnn") == "arch_mismatch"
    assert code(lineage="b9") == "lineage_mismatch"
    assert code(hist=[1, 0]) == "bad_request"
    assert code(classes=[3]) == "bad_request"
    assert code(classes=[-1]) == "bad_request"
    assert code(k=-1) == "bad_request"
    assert code(k=True) == "bad_request"
    with pytest.raises(ValueError, match="metric"):
        store.query("x", "mlp", "b0", [], [1, 0, 0], 1, metric="euclid")
    with pytest.raises(ValueError, match="min_class_share"):
        store.query("x", "mlp", "b0", [], [1, 0, 0], 1, min_class_share=1.5)


# --- persistence -----------------------------------------------------------------------------


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "mds.db"
    with NodeStore(path) as store:
        add(store, "a", [9, 1, 0], ts=5.0, rolling_error=0.1, batches=3)
        add(store, "b", [1, 1, 8])
        add(store, "c", [5, 5, 0], online=False)
        store.set_online("status-only", True)
        before = store.query("x", "mlp", "b0", [], [9, 1, 0], 5)
    with NodeStore(path) as store:
        assert store.count() == 3 and store.count(online=True) == 2
        assert store.query("x", "mlp", "b0", [], [9, 1, 0], 5) == before
        record = store.get("a")
        assert (record.meta_ts, record.rolling_error, record.batches, record.online) == (5.0, 0.1, 3, True)
        store.upsert_meta(meta("a", [0, 0, 1], ts=4.0))  # an older stamp than on disk still replaces it
        np.testing.assert_array_equal(store.get("a").hist, [0, 0, 1])
        store.upsert_meta(meta("status-only", [1, 0, 0]))
        assert "status-only" in ids(store.query("x", "mlp", "b0", [], [1, 0, 0], 5))


def test_a_future_stamp_on_disk_does_not_pin_the_node(tmp_path: Path) -> None:
    path = tmp_path / "mds.db"
    with NodeStore(path) as store:
        add(store, "a", [0, 0])
    with sqlite3.connect(path) as db:  # as an older version, which compared stamps, left it
        db.execute("UPDATE nodes SET meta_ts = 1e18 WHERE node_id = 'a'")
    with NodeStore(path) as store:
        store.upsert_meta(meta("a", [9, 1], ts=2.0))
        assert ids(store.query("x", "mlp", "b0", [0], [9, 1], 5)) == ["a"]
    with NodeStore(path) as store:
        assert store.get("a").meta_ts == 2.0


def test_wal_mode_on(tmp_path: Path) -> None:
    path = tmp_path / "mds.db"
    with NodeStore(path) as store:
        add(store, "a", [1.0])
        assert Path(f"{path}-wal").exists()
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_corrupt_rows_are_skipped_on_load(tmp_path: Path) -> None:
    path = tmp_path / "mds.db"
    with NodeStore(path) as store:
        add(store, "good", [1.0, 2.0])
        add(store, "bad", [1.0, 2.0])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE nodes SET hist = ? WHERE node_id = 'bad'", (b"\x00" * 7,))
    with NodeStore(path) as store:
        assert store.skipped_rows == 1
        assert ids(store.query("x", "mlp", "b0", [], [1, 2], 5)) == ["good"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mds.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ValueError, match="schema"):
        NodeStore(path)


def test_cover_any_ranks_by_classes_held_then_similarity(store: NodeStore) -> None:
    add(store, "holds-8", [5, 5, 0, 0, 4, 0])
    add(store, "holds-9", [5, 5, 0, 0, 0, 4])
    add(store, "holds-both-far", [0, 0, 5, 5, 1, 1])
    add(store, "holds-neither", [5, 5, 0, 0, 0, 0])
    query = ("asker", "mlp", "b0", [4, 5], [5, 5, 0, 0, 1, 1], 10)
    assert ids(store.query(*query)) == ["holds-both-far"]
    found = store.query(*query, cover="any")
    assert ids(found) == ["holds-both-far", "holds-8", "holds-9"]
    assert [m.classes for m in found] == [(4, 5), (4,), (5,)]
    everyone = store.query(*query, cover="none")
    assert set(ids(everyone)) == {"holds-8", "holds-9", "holds-both-far", "holds-neither"}
    assert everyone[-1].node_id == "holds-both-far" and everyone[-1].classes == (4, 5)


def test_rank_least_similar_turns_the_order_round(store: NodeStore) -> None:
    add(store, "same", [9, 1, 0])
    add(store, "close", [7, 3, 0])
    add(store, "far", [1, 1, 8])
    found = store.query("x", "mlp", "b0", [], [9, 1, 0], 2, cover="none", rank="least_similar")
    assert ids(found) == ["far", "close"]
    assert found[0].score < found[1].score
    with pytest.raises(QueryRejected):
        store.query("x", "mlp", "b0", [], [9, 1, 0], 2, cover="some")
