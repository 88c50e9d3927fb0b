"""Helper selection: which MdS candidates a target asks, and for which of its missing classes.

A strategy says how to query the MdS (which nodes qualify, in which order) and, given the
candidates it returned, which one to ask next and for which classes. It is pure: candidates in,
a choice out; the daemon owns the conversation.

``most_similar`` (the default) asks the candidate holding the most of the classes still missing,
the most similar first among equals, for the missing classes it holds; when it delivers and
classes are still missing the next one is asked, so knowledge spread over several nodes ends up
in a pool of helpers (paper §7.3, Fig. 8). ``least_similar_first`` stages the paper's Fig. 10(a):
the node's first request goes to the least similar node, whatever it knows; later ones behave
like ``most_similar``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from agent.kt.strategy import NamedStrategyConfig

Cover = Literal["all", "any", "none"]
Rank = Literal["most_similar", "least_similar"]


@dataclass(frozen=True)
class CandidateInfo:
    """One MdS candidate: its id and the requested classes it holds (empty: unknown or none)."""

    node_id: str
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Ask:
    """Ask ``helper`` for ``classes``."""

    helper: str
    classes: tuple[int, ...]


class HelperSelection(ABC):
    """Base of every strategy; ``name`` is its config value."""

    name: ClassVar[str]

    @abstractmethod
    def query(self, request_number: int) -> tuple[Cover, Rank]:
        """How to ask the MdS for this node's ``request_number``-th help request (0 is the first)."""

    @abstractmethod
    def next_ask(
        self,
        candidates: Sequence[CandidateInfo],
        missing: Collection[int],
        tried: Collection[str],
        request_number: int,
    ) -> Ask | None:
        """The next candidate to ask for some of ``missing``, never one in ``tried``; None: nobody left."""


def _greedy_cover(candidates: Sequence[CandidateInfo], missing: Collection[int], tried: Collection[str]) -> Ask | None:
    want = set(missing)
    best: tuple[int, CandidateInfo] | None = None
    for candidate in candidates:
        if candidate.node_id in tried:
            continue
        # An MdS that names no classes (an older one, or cover="all") vouches for all of them.
        held = len(want.intersection(candidate.classes)) if candidate.classes else len(want)
        if held and (best is None or held > best[0]):
            best = (held, candidate)
    if best is None:
        return None
    chosen = best[1]
    classes = sorted(want.intersection(chosen.classes)) if chosen.classes else sorted(want)
    return Ask(chosen.node_id, tuple(classes))


class MostSimilar(HelperSelection):
    name = "most_similar"

    def query(self, request_number):
        return "any", "most_similar"

    def next_ask(self, candidates, missing, tried, request_number):
        return _greedy_cover(candidates, missing, tried)


class LeastSimilarFirst(HelperSelection):
    name = "least_similar_first"

    def query(self, request_number):
        return ("none", "least_similar") if request_number == 0 else ("any", "most_similar")

    def next_ask(self, candidates, missing, tried, request_number):
        if request_number > 0:
            return _greedy_cover(candidates, missing, tried)
        for candidate in candidates:
            if candidate.node_id not in tried:
                return Ask(candidate.node_id, tuple(sorted(missing)))
        return None


SELECTIONS: dict[str, type[HelperSelection]] = {cls.name: cls for cls in (MostSimilar, LeastSimilarFirst)}


class HelperSelectionConfig(NamedStrategyConfig):
    """Which helper selection a node uses (``helper_selection`` in its config)."""

    type: Literal["most_similar", "least_similar_first"] = "most_similar"

    def build(self) -> HelperSelection:
        return SELECTIONS[self.type]()
