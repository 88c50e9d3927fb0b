"""The help coordinator alone: events in, commands out, no bus and no model."""

from __future__ import annotations

import pytest

from agent.kt.coordinator import (
    AskHelper,
    DriftReport,
    DroppedHelper,
    HelpCoordinator,
    HelpPolicy,
    Install,
    PoolState,
    QueryHelpers,
    Report,
    Status,
)
from agent.kt.helper_selection import CandidateInfo, HelperSelectionConfig

EMPTY = PoolState(frozenset(), 0, 4)


def _pool(*classes: int, size: int | None = None, max_size: int = 4) -> PoolState:
    return PoolState(frozenset(classes), len(classes) if size is None else size, max_size)


def _drift(batch: int, classes=(8, 9), baseline=0.1, pool=EMPTY) -> DriftReport:
    return DriftReport(batch_index=batch, classes=tuple(classes), reason="rolling_error", baseline=baseline, pool=pool)


def _of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def _reports(commands, kind=None):
    return [c for c in commands if isinstance(c, Report) and (kind is None or c.kind == kind)]


def _coordinator(**policy) -> HelpCoordinator:
    return HelpCoordinator(HelpPolicy(**policy), clock=lambda: 100.0)


def _install_first(help: HelpCoordinator, commands, candidates=("a",), pool=EMPTY):
    """Answer the query with ``candidates``, the first ask with a blob; returns the Install command."""
    (query,) = _of(commands, QueryHelpers)
    asked = help.on_candidates(query.flow, [CandidateInfo(c) for c in candidates], pool=pool)
    (ask,) = _of(asked, AskHelper)
    (install,) = help.on_answer(ask.flow, b"blob", pool=pool)
    assert isinstance(install, Install)
    return install


def test_a_drift_starts_a_query_then_asks_the_best_candidate_and_installs():
    help = _coordinator(k=3, z=0.4, value_codec="int8")
    commands = help.on_batch(50, drift=_drift(50), pool=EMPTY)
    assert [r.kind for r in _reports(commands)] == ["drift"]
    (query,) = _of(commands, QueryHelpers)
    assert query.classes == (8, 9) and query.k == 3 and (query.cover, query.rank) == ("any", "most_similar")
    asked = help.on_candidates(query.flow, [CandidateInfo("b", (8,)), CandidateInfo("a", (8, 9))], pool=EMPTY)
    (ask,) = _of(asked, AskHelper)
    assert (ask.helper, ask.classes, ask.z, ask.value_codec) == ("a", (8, 9), 0.4, "int8")
    (install,) = help.on_answer(ask.flow, b"blob", pool=EMPTY)
    assert (install.source, install.classes, install.baseline, install.detected_batch) == ("a", (8, 9), 0.1, 50)
    done = help.installed(install.flow, (8, 9), pool=_pool(8, 9))
    assert [r.kind for r in _reports(done)] == ["help_done"] and help.active is None
    assert _of(done, Status) == [Status("serving with 2 helper(s)")]


def test_the_same_classes_are_not_asked_again_within_the_cooldown():
    help = _coordinator(cooldown=10)
    first = help.on_batch(50, drift=_drift(50), pool=EMPTY)
    (query,) = _of(first, QueryHelpers)
    help.on_candidates(query.flow, [], pool=EMPTY)  # nobody: the flow ends
    assert help.on_batch(55, drift=_drift(55), pool=EMPTY) == []
    assert _of(help.on_batch(60, drift=_drift(60), pool=EMPTY), QueryHelpers)


def test_a_delayed_request_goes_out_delay_batches_after_its_drift():
    help = _coordinator(delay=3)
    assert help.on_batch(50, drift=_drift(50), pool=EMPTY) == []
    assert help.on_batch(51, drift=None, pool=EMPTY) == []
    assert help.on_batch(52, drift=None, pool=EMPTY) == []
    later = help.on_batch(53, drift=None, pool=EMPTY)
    (drift,) = _reports(later, "drift")
    assert drift.detail["batch"] == 53 and _of(later, QueryHelpers)


def test_a_second_drift_during_a_transfer_is_queued_and_asked_after_it():
    """The lost request of 5d8537a: the learner had recorded the second request (cooldown) and the
    daemon dropped it, then installed the first helper against the second request's baseline."""
    help = _coordinator()
    first = help.on_batch(50, drift=_drift(50, (8,), baseline=0.10), pool=EMPTY)
    second = help.on_batch(52, drift=_drift(52, (9,), baseline=0.30), pool=EMPTY)
    assert [r.kind for r in _reports(second)] == ["help_queued"] and not _of(second, QueryHelpers)
    assert [q.classes for q in help.queued] == [(9,)]
    install = _install_first(help, first)
    assert install.baseline == 0.10 and install.classes == (8,)
    after = help.installed(install.flow, (8,), pool=_pool(8))
    assert [r.kind for r in _reports(after)] == ["help_done", "drift"]
    (query,) = _of(after, QueryHelpers)
    assert query.classes == (9,) and query.flow != install.flow
    install = _install_first(help, after)
    assert install.baseline == 0.30


def test_a_queued_request_asks_only_for_classes_still_missing_and_none_when_all_arrived():
    help = _coordinator()
    first = help.on_batch(50, drift=_drift(50, (8, 9)), pool=EMPTY)
    help.on_batch(51, drift=_drift(51, (9,)), pool=EMPTY)
    install = _install_first(help, first)
    after = help.installed(install.flow, (8, 9), pool=_pool(8, 9))
    assert [r.kind for r in _reports(after)] == ["help_done"] and help.active is None and not help.queued


def test_a_full_pool_or_classes_already_served_ask_nobody():
    help = _coordinator()
    full = _pool(1, 2, max_size=2)
    assert help.on_batch(50, drift=_drift(50, pool=full), pool=full) == []
    assert help.on_batch(51, drift=_drift(51, (8,), pool=_pool(8)), pool=_pool(8)) == []
    assert _coordinator(enabled=False).on_batch(50, drift=_drift(50), pool=EMPTY) == []


def test_an_unhelpful_helper_is_asked_for_again_after_the_cooldown_avoiding_its_source():
    help = _coordinator(cooldown=8)
    install = _install_first(help, help.on_batch(50, drift=_drift(50), pool=EMPTY), candidates=("bad", "good"))
    help.installed(install.flow, (8, 9), pool=_pool(8, 9))
    dropped = DroppedHelper("h0", (8, 9), "bad", installed_at=52, baseline=0.1)
    assert help.on_batch(55, drift=None, dropped=[dropped], pool=EMPTY) == []
    assert help.on_batch(59, drift=None, pool=EMPTY) == []
    retry = help.on_batch(60, drift=None, pool=EMPTY)
    (drift,) = _reports(retry, "drift")
    assert drift.detail == {"batch": 60, "classes": [8, 9], "reason": "unhelpful_helper", "avoid": ["bad"]}
    (query,) = _of(retry, QueryHelpers)
    asked = help.on_candidates(query.flow, [CandidateInfo("bad"), CandidateInfo("good")], pool=EMPTY)
    assert [a.helper for a in _of(asked, AskHelper)] == ["good"]


def test_only_avoided_candidates_end_the_transfer_with_no_helper():
    help = _coordinator(cooldown=0)
    dropped = DroppedHelper("h0", (8,), "bad", installed_at=40, baseline=0.1)
    retry = help.on_batch(50, drift=None, dropped=[dropped], pool=EMPTY)
    assert retry == []
    retry = help.on_batch(51, drift=None, pool=EMPTY)
    (query,) = _of(retry, QueryHelpers)
    ended = help.on_candidates(query.flow, [CandidateInfo("bad")], pool=EMPTY)
    assert [(r.kind, r.detail) for r in _reports(ended)] == [("help_failed", {"stage": "query", "error": "no candidates"})]


def test_knowledge_spread_over_nodes_is_asked_of_each_in_turn():
    help = _coordinator(split_helpers=4)
    (query,) = _of(help.on_batch(50, drift=_drift(50, (7, 8, 9)), pool=EMPTY), QueryHelpers)
    candidates = [CandidateInfo("a", (8,)), CandidateInfo("b", (7, 9))]
    (ask,) = _of(help.on_candidates(query.flow, candidates, pool=EMPTY), AskHelper)
    assert (ask.helper, ask.classes) == ("b", (7, 9))
    (install,) = help.on_answer(ask.flow, b"b", pool=EMPTY)
    (ask,) = _of(help.installed(install.flow, (7, 9), pool=_pool(7, 9)), AskHelper)
    assert (ask.helper, ask.classes) == ("a", (8,))
    (install,) = help.on_answer(ask.flow, b"a", pool=_pool(7, 9))
    done = help.installed(install.flow, (8,), pool=_pool(7, 8, 9))
    assert [(r.kind, r.detail["helpers"]) for r in _reports(done)] == [("help_done", 2)]


def test_split_helpers_one_stops_after_the_first_install():
    help = _coordinator(split_helpers=1)
    (query,) = _of(help.on_batch(50, drift=_drift(50, (8, 9)), pool=EMPTY), QueryHelpers)
    (ask,) = _of(help.on_candidates(query.flow, [CandidateInfo("a", (8,)), CandidateInfo("b", (9,))], pool=EMPTY), AskHelper)
    (install,) = help.on_answer(ask.flow, b"x", pool=EMPTY)
    done = help.installed(install.flow, (8,), pool=_pool(8))
    assert [(r.kind, r.detail["missing"]) for r in _reports(done)] == [("help_done", [9])]


def test_failures_move_to_the_next_candidate_and_the_flow_ends_once():
    help = _coordinator()
    (query,) = _of(help.on_batch(50, drift=_drift(50), pool=EMPTY), QueryHelpers)
    (ask,) = _of(help.on_candidates(query.flow, [CandidateInfo("a"), CandidateInfo("b")], pool=EMPTY), AskHelper)
    moved = help.on_answer(ask.flow, None, error="timeout", pool=EMPTY)
    assert _reports(moved, "kt_failed")[0].detail == {"helper": "a", "error": "timeout"}
    (ask,) = _of(moved, AskHelper)
    (install,) = help.on_answer(ask.flow, b"poison", pool=EMPTY)
    refused = help.install_refused(install.flow, "values out of range", pool=EMPTY)
    assert [(r.kind, r.detail) for r in _reports(refused)] == [
        ("rejected", {"reason": "KT blob from b: values out of range"}),
        ("help_failed", {"stage": "kt", "tried": ["a", "b"]}),
    ]
    assert help.active is None


def test_replies_that_are_not_awaited_change_nothing():
    help = _coordinator()
    (query,) = _of(help.on_batch(50, drift=_drift(50), pool=EMPTY), QueryHelpers)
    assert help.on_answer(query.flow, b"early blob", pool=EMPTY) == []
    assert help.installed(query.flow, (8, 9), pool=EMPTY) == []
    (ask,) = _of(help.on_candidates(query.flow, [CandidateInfo("a")], pool=EMPTY), AskHelper)
    assert help.on_candidates(query.flow, [CandidateInfo("z")], pool=EMPTY) == []
    assert help.on_answer(ask.flow + 1, b"other flow", pool=EMPTY) == []
    assert help.active is not None and help.active.classes == (8, 9)


def test_relay_mode_asks_the_relay_for_every_class_without_querying():
    help = _coordinator(relay="relay")
    commands = help.on_batch(50, drift=_drift(50), pool=EMPTY)
    assert not _of(commands, QueryHelpers)
    (ask,) = _of(commands, AskHelper)
    assert (ask.helper, ask.classes) == ("relay", (8, 9))


def test_least_similar_first_queries_any_node_only_for_the_first_request():
    help = _coordinator(selection=HelperSelectionConfig(type="least_similar_first"), cooldown=0)
    (first,) = _of(help.on_batch(50, drift=_drift(50), pool=EMPTY), QueryHelpers)
    assert (first.cover, first.rank) == ("none", "least_similar")
    help.on_candidates(first.flow, [], pool=EMPTY)
    (second,) = _of(help.on_batch(51, drift=_drift(51), pool=EMPTY), QueryHelpers)
    assert (second.cover, second.rank) == ("any", "most_similar")


@pytest.mark.parametrize("kind", ["help_done", "help_failed"])
def test_status_follows_the_end_of_a_transfer(kind):
    help = _coordinator()
    commands = help.on_batch(50, drift=_drift(50), pool=EMPTY)
    assert Status("asking the MdS for classes [8, 9]") in commands
    if kind == "help_failed":
        (query,) = _of(commands, QueryHelpers)
        ended = help.on_candidates(query.flow, None, error="timeout", pool=EMPTY)
        assert Status("serving (no helper found)") in ended
        assert _reports(ended, "help_failed")[0].detail == {"stage": "query", "error": "timeout"}
    else:
        install = _install_first(help, commands)
        assert Status("serving with 1 helper(s)") in help.installed(install.flow, (8, 9), pool=_pool(8, size=1))
