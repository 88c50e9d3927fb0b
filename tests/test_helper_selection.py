"""Helper selection strategies: pure, candidates in, the next ask out."""

import pytest
from pydantic import ValidationError

from agent.kt.helper_selection import Ask, CandidateInfo, HelperSelectionConfig, LeastSimilarFirst, MostSimilar

SPLIT = [CandidateInfo("both", (8, 9)), CandidateInfo("eight", (8,)), CandidateInfo("nine", (9,))]


def test_most_similar_asks_the_best_cover_then_the_rest_of_the_missing_classes():
    sel = MostSimilar()
    assert sel.query(0) == ("any", "most_similar")
    assert sel.next_ask(SPLIT, {8, 9}, [], 0) == Ask("both", (8, 9))
    # "both" failed: the one holding most of what is missing next, asked only for what it holds.
    assert sel.next_ask(SPLIT, {8, 9}, ["both"], 0) == Ask("eight", (8,))
    # 8 installed from "eight": 9 is still missing.
    assert sel.next_ask(SPLIT, {9}, ["both", "eight"], 0) == Ask("nine", (9,))
    assert sel.next_ask(SPLIT, {9}, ["both", "eight", "nine"], 0) is None


def test_most_similar_keeps_the_mds_order_among_equal_covers():
    cands = [CandidateInfo("first", (8,)), CandidateInfo("second", (8,))]
    assert MostSimilar().next_ask(cands, {8, 9}, [], 0) == Ask("first", (8,))


def test_a_candidate_holding_none_of_the_missing_classes_is_never_asked():
    assert MostSimilar().next_ask([CandidateInfo("nine", (9,))], {8}, [], 0) is None


def test_candidates_without_classes_are_vouched_for_every_class():
    assert MostSimilar().next_ask([CandidateInfo("old-mds")], {8, 9}, [], 0) == Ask("old-mds", (8, 9))


def test_least_similar_first_stages_one_wrong_pick_then_behaves_like_most_similar():
    sel = LeastSimilarFirst()
    assert sel.query(0) == ("none", "least_similar")
    wrong = [CandidateInfo("far"), CandidateInfo("near", (8, 9))]
    assert sel.next_ask(wrong, {8, 9}, [], 0) == Ask("far", (8, 9))
    assert sel.query(1) == ("any", "most_similar")
    assert sel.next_ask(SPLIT, {8, 9}, [], 1) == Ask("both", (8, 9))


def test_a_selection_is_built_from_its_config_given_by_name_or_as_a_table():
    assert HelperSelectionConfig.model_validate("least_similar_first").build().name == "least_similar_first"
    assert HelperSelectionConfig.model_validate({"type": "most_similar"}).build().name == "most_similar"
    assert HelperSelectionConfig().model_dump() == "most_similar"
    with pytest.raises(ValidationError, match="most_similar"):
        HelperSelectionConfig.model_validate("random")
