"""Ensemble operators: how the target's and the pooled helpers' outputs become one prediction.

``mean`` is the paper's operator. ``class_aware`` is ours: a helper was built for the classes it
was asked for, so it gets weight w on those and 1 − w elsewhere, and the target the complement.
With helpers that never saw some of the target's classes the plain mean drowns the target on
exactly those classes (measured worse than learning alone); class_aware does not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field


class EnsembleOperator(ABC):
    """Combines class probabilities of the target (N, C) and of each helper (N, C)."""

    name: ClassVar[str]

    @abstractmethod
    def combine(
        self,
        target: torch.Tensor,
        helpers: Sequence[torch.Tensor],
        helper_classes: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Return combined probabilities (N, C), rows summing to 1."""


class MeanOperator(EnsembleOperator):
    """The paper's operator: the mean of the softmax outputs of the target and every helper."""

    name = "mean"

    def combine(self, target, helpers, helper_classes):
        if not helpers:
            return target
        return torch.stack([target, *helpers]).mean(dim=0)


class ClassAwareOperator(EnsembleOperator):
    """Per-class weights: each helper w on its requested classes and 1 − w elsewhere, the target the rest.

    With H helpers, helper h weighs a_h(c)/H on class c and the target 1 − mean_h a_h(c); the
    weighted probabilities are renormalised per sample.

    >>> op = ClassAwareOperator(w=0.9)
    >>> t = torch.tensor([[0.8, 0.2, 0.0]]); h = torch.tensor([[0.0, 0.1, 0.9]])
    >>> op.combine(t, [h], [[2]]).argmax(dim=1).item()
    2
    """

    name = "class_aware"

    def __init__(self, w: float = 0.95) -> None:
        if not 0.5 <= w <= 1.0:
            raise ValueError(f"class_aware weight w must be in [0.5, 1], got {w}")
        self.w = w

    def combine(self, target, helpers, helper_classes):
        if not helpers:
            return target
        if len(helpers) != len(helper_classes):
            raise ValueError("one class list per helper is needed")
        num_classes = target.shape[1]
        weights = torch.full((len(helpers), num_classes), 1.0 - self.w, dtype=target.dtype, device=target.device)
        for h, classes in enumerate(helper_classes):
            weights[h, list(classes)] = self.w
        weights = weights / len(helpers)
        target_weight = 1.0 - weights.sum(dim=0)
        mixed = target * target_weight + sum(p * weights[h] for h, p in enumerate(helpers))
        return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(1e-12)


class MeanOperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["mean"] = "mean"

    def build(self) -> EnsembleOperator:
        return MeanOperator()


class ClassAwareOperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["class_aware"] = "class_aware"
    w: float = Field(0.95, ge=0.5, le=1.0, description="weight of a helper on the classes it was asked for")

    def build(self) -> EnsembleOperator:
        return ClassAwareOperator(self.w)


OperatorConfig = Annotated[Union[ClassAwareOperatorConfig, MeanOperatorConfig], Field(discriminator="type")]

