"""The helper pool and its discard policies (paper §5.3): helpers are ephemeral.

A helper is dropped once the target alone is back at its pre-drift error (``dynamic``) or after a
fixed number of batches (``static``); with several helpers, the one worst on its own classes over
the last L batches goes first. The pool never holds more than ``max_size`` helpers. A helper
that, over its first L batches, was no better than the target on its own classes can be dropped
at once (``HelperPool.drop_unhelpful``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from torch import nn


@dataclass
class PooledHelper:
    """One boosted helper model and what the pool tracks about it."""

    helper_id: str
    model: nn.Module
    classes: tuple[int, ...]
    installed_at: int
    baseline_error: float
    source: str = ""
    recent_errors: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    #: (helper error, target error) on the helper's classes over its first L batches that held them.
    probation: list[tuple[float, float]] = field(default_factory=list)
    judged: bool = False
    #: A live copy of the helper that learns from every labelled batch beside the target (``kt_apply = "branch"``).
    branch: nn.Module | None = None
    #: The live branch's optimiser.
    optimizer: Any = None
    #: Error on whole labelled batches since it arrived (the live branch's, if any), most recent last.
    batch_errors: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def recent_error(self) -> float:
        """Mean error on its own classes over the last L batches that held them (inf if none yet)."""
        return sum(self.recent_errors) / len(self.recent_errors) if self.recent_errors else math.inf


class DiscardPolicy(ABC):
    """Decides, after each batch, which helpers leave the pool."""

    name: ClassVar[str]

    @abstractmethod
    def to_discard(
        self, helpers: Sequence[PooledHelper], *, batch_index: int, target_rolling_error: float | None
    ) -> list[str]:
        """Ids of the helpers to drop now."""


class DynamicDiscard(DiscardPolicy):
    """Drop a helper once the target's own rolling error is back within ``tolerance`` of its pre-drift level.

    (With live branches, ``kt_apply = "branch"``, the learner also drops a helper as soon as the
    target alone was as good as the served ensemble over the last L batches.)

    The target's rolling error only counts once ``min_batches`` batches have passed since the
    helper arrived, so the window holds no pre-drift batches. One helper leaves per batch: the
    worst on its own classes first.
    """

    name = "dynamic"

    def __init__(self, tolerance: float = 0.02, min_batches: int = 3) -> None:
        self.tolerance = tolerance
        self.min_batches = min_batches

    def to_discard(self, helpers, *, batch_index, target_rolling_error):
        if target_rolling_error is None:
            return []
        ready = [
            h
            for h in helpers
            if batch_index - h.installed_at >= self.min_batches
            and target_rolling_error <= h.baseline_error + self.tolerance
        ]
        if not ready:
            return []
        worst = max(ready, key=lambda h: (h.recent_error(), -h.installed_at))
        return [worst.helper_id]


class StaticDiscard(DiscardPolicy):
    """Drop every helper ``n_batches`` batches after it arrived."""

    name = "static"

    def __init__(self, n_batches: int = 20) -> None:
        self.n_batches = n_batches

    def to_discard(self, helpers, *, batch_index, target_rolling_error):
        return [h.helper_id for h in helpers if batch_index - h.installed_at >= self.n_batches]


class DynamicDiscardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["dynamic"] = "dynamic"
    tolerance: float = Field(0.02, ge=0.0, le=1.0, description="error above the pre-drift level still counted as recovered")
    min_batches: int = Field(3, ge=1, le=10_000, description="batches a helper serves before it may be dropped")
    window: int = Field(5, ge=1, le=1000, description="L: batches over which helpers are ranked on their own classes")

    def build(self) -> DiscardPolicy:
        return DynamicDiscard(self.tolerance, self.min_batches)


class StaticDiscardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["static"] = "static"
    n_batches: int = Field(20, ge=1, le=1_000_000, description="N: batches a helper serves before it is dropped")
    window: int = Field(5, ge=1, le=1000, description="L: batches over which helpers are ranked on their own classes")

    def build(self) -> DiscardPolicy:
        return StaticDiscard(self.n_batches)


DiscardConfig = Annotated[Union[DynamicDiscardConfig, StaticDiscardConfig], Field(discriminator="type")]


class HelperPool:
    """Bounded pool of helpers; evicts the worst on its own classes when a new one does not fit."""

    def __init__(self, policy: DiscardPolicy, *, max_size: int = 4, window: int = 5) -> None:
        if max_size < 1:
            raise ValueError(f"pool needs room for at least one helper, got {max_size}")
        self.policy = policy
        self.max_size = max_size
        self.window = window
        self._helpers: dict[str, PooledHelper] = {}

    def __len__(self) -> int:
        return len(self._helpers)

    def __iter__(self):
        return iter(list(self._helpers.values()))

    def ids(self) -> list[str]:
        return list(self._helpers)

    def classes(self) -> set[int]:
        """Every class some pooled helper was built for."""
        return {c for h in self._helpers.values() for c in h.classes}

    def add(self, helper: PooledHelper) -> list[str]:
        """Pool ``helper``; returns the ids evicted to make room."""
        if helper.helper_id in self._helpers:
            raise ValueError(f"helper {helper.helper_id!r} is already pooled")
        helper.recent_errors = deque(helper.recent_errors, maxlen=self.window)
        evicted = []
        while len(self._helpers) >= self.max_size:
            worst = max(self._helpers.values(), key=lambda h: (h.recent_error(), -h.installed_at))
            evicted.append(worst.helper_id)
            del self._helpers[worst.helper_id]
        self._helpers[helper.helper_id] = helper
        return evicted

    def remove(self, helper_id: str) -> PooledHelper:
        return self._helpers.pop(helper_id)

    def clear(self) -> list[str]:
        ids = list(self._helpers)
        self._helpers.clear()
        return ids

    def record_error(self, helper_id: str, error: float, target_error: float | None = None) -> None:
        """A helper's error (and the target's own, if known) on the helper's classes in the last batch that held them."""
        helper = self._helpers[helper_id]
        helper.recent_errors.append(error)
        if target_error is not None and not helper.judged:
            helper.probation.append((error, target_error))

    def drop_unhelpful(self) -> list[PooledHelper]:
        """Judge each helper once, after L batches held its classes: remove and return those that
        were on average no better than the target on those classes.

        A helper from a node that never learnt the requested classes (a wrong pick) only adds
        noise; dropping it lets the target ask someone else instead of carrying it until the
        discard policy's recovery test, which it would delay.
        """
        dropped = []
        for helper in list(self._helpers.values()):
            if helper.judged or len(helper.probation) < self.window:
                continue
            helper.judged = True
            own = sum(e for e, _ in helper.probation) / len(helper.probation)
            target = sum(t for _, t in helper.probation) / len(helper.probation)
            if own >= target:
                dropped.append(self._helpers.pop(helper.helper_id))
        return dropped

    def discard_check(self, *, batch_index: int, target_rolling_error: float | None) -> list[str]:
        """Apply the policy: remove and return the ids it picks."""
        ids = self.policy.to_discard(
            list(self._helpers.values()), batch_index=batch_index, target_rolling_error=target_rolling_error
        )
        for helper_id in ids:
            del self._helpers[helper_id]
        return ids
