"""Which parameters a helper sends: a sensitivity source and a position choice, each built from
the node's config (``picker`` and ``selection``, `agent.kt.strategy`).

The source says how sensitive each weight is for the requested classes: computed on demand over
the reservoir of recent request batches (paper §5.2.1, the default), or looked up in a running
per-class map kept up to date after every batch (``continuous``; until the map covers a class the
reservoir answers). The choice turns that into positions: the top Z of each tensor
(``sensitivity``), or as many positions drawn at random (``random``, the control, which never asks
the source).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from agent.kt.errors import KtRejected
from agent.kt.selection import random_mask, select
from agent.kt.sensitivity import Reservoir, sensitivity
from agent.kt.sensitivity_map import SensitivityMap
from agent.kt.strategy import NamedStrategyConfig

Scores = dict[str, torch.Tensor]


class SensitivitySource(ABC):
    """Per-weight sensitivity of a model for some classes (``picker``)."""

    name: ClassVar[str]
    #: Whether `observe` does work after every learnt batch.
    observes: ClassVar[bool] = False

    @abstractmethod
    def observe(self, model: nn.Module, x: torch.Tensor) -> None:
        """Keep up with one learnt batch (a running source refreshes its map)."""

    @abstractmethod
    def scores(
        self, model: nn.Module, reservoir: Reservoir, classes: Sequence[int], *, samples: int | None, generator: torch.Generator
    ) -> Scores:
        """One non-negative score per weight, shaped like each parameter; raises KtRejected when it has none."""


class OnDemandSensitivity(SensitivitySource):
    name = "on_demand"

    def observe(self, model, x):
        return None  # it computes when asked

    def scores(self, model, reservoir, classes, *, samples, generator):
        if len(reservoir) == 0:
            raise KtRejected("this node has seen no request batch yet, so it has nothing to pick from")
        return sensitivity(model, reservoir.batches(), classes, samples=samples, generator=generator)


class ContinuousSensitivity(OnDemandSensitivity):
    name = "continuous"
    observes = True

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        self.map = SensitivityMap(model, num_classes)

    def observe(self, model, x):
        self.map.update(model, x)

    def scores(self, model, reservoir, classes, *, samples, generator):
        if self.map.covers(classes):
            return self.map.lookup(classes)
        return super().scores(model, reservoir, classes, samples=samples, generator=generator)


class PickerConfig(NamedStrategyConfig):
    """Where sensitivity comes from: the reservoir on demand, or a running per-class map."""

    type: Literal["on_demand", "continuous"] = "on_demand"

    def build(self, model: nn.Module, num_classes: int) -> SensitivitySource:
        if self.type == "continuous":
            return ContinuousSensitivity(model, num_classes)
        return OnDemandSensitivity()


class PositionChoice(ABC):
    """Which positions of each tensor are sent (``selection``)."""

    name: ClassVar[str]

    @abstractmethod
    def positions(
        self, shapes: Mapping[str, tuple[int, ...]], z: float, scores: Callable[[], Scores], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Name → sorted flat positions; ``scores`` is called only by a choice that needs them."""


class MostSensitive(PositionChoice):
    name = "sensitivity"

    def positions(self, shapes, z, scores, generator):
        return select(scores(), z)


class RandomPositions(PositionChoice):
    name = "random"

    def positions(self, shapes, z, scores, generator):
        return random_mask(shapes, z, generator)


class SelectionConfig(NamedStrategyConfig):
    """How a helper picks positions: by sensitivity, or at random (the control: same Z)."""

    type: Literal["sensitivity", "random"] = "sensitivity"

    def build(self) -> PositionChoice:
        return MostSensitive() if self.type == "sensitivity" else RandomPositions()
