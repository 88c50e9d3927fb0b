"""Ensemble operators: how the target's and the pooled helpers' outputs become one prediction.

``mean`` is the paper's operator. ``class_aware`` is ours: a helper was built for the classes it
was asked for, so it gets weight w on those and 1 − w elsewhere, and the target the complement.
With helpers that never saw some of the target's classes the plain mean drowns the target on
exactly those classes (measured worse than learning alone); class_aware does not.

``trust`` (the default) *measures* whom to trust: the node sees labels on every batch, so each
member (the target and every pooled helper) has a weight per class, starting from the class-aware
prior and updated after every labelled batch by exponentiated gradient (Hedge) on that member's
binary cross-entropy of the class's column, with a fixed share so that a member that improves
(the target learning the new classes) can win its weight back.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field


class EnsembleOperator(ABC):
    """Combines class probabilities of the target (N, C) and of each helper (N, C).

    An operator may learn from labelled batches (``learns``): the learner then calls ``learn``
    with the same outputs it served and the labels, ``swap`` when a helper is promoted into the
    target, and ``forget`` when a helper leaves. Stateless operators ignore all three.
    """

    name: ClassVar[str]
    #: The operator keeps per-member state that ``learn`` updates from labelled batches.
    learns: ClassVar[bool] = False

    @abstractmethod
    def combine(
        self,
        target: torch.Tensor,
        helpers: Sequence[torch.Tensor],
        helper_classes: Sequence[Sequence[int]],
        helper_ids: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Return combined probabilities (N, C), rows summing to 1.

        ``helper_ids`` name the helpers (an operator that learns keeps its state by id).
        """

    def learn(
        self,
        target: torch.Tensor,
        helpers: Sequence[torch.Tensor],
        helper_classes: Sequence[Sequence[int]],
        helper_ids: Sequence[str],
        labels: torch.Tensor,
    ) -> None:
        """Update from one labelled batch the outputs were computed on (no-op unless ``learns``)."""
        return None

    def swap(self, helper_id: str) -> None:
        """The helper ``helper_id`` and the target exchanged models: exchange their state."""
        return None

    def forget(self, keep: Sequence[str]) -> None:
        """Drop the state of every helper not in ``keep``."""
        return None


class MeanOperator(EnsembleOperator):
    """The paper's operator: the mean of the softmax outputs of the target and every helper."""

    name = "mean"

    def combine(self, target, helpers, helper_classes, helper_ids=None):
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

    def combine(self, target, helpers, helper_classes, helper_ids=None):
        if not helpers:
            return target
        if len(helpers) != len(helper_classes):
            raise ValueError("one class list per helper is needed")
        weights = class_aware_weights(self.w, target.shape[1], helper_classes, dtype=target.dtype).to(target.device)
        return _mix(target, helpers, weights)


def class_aware_weights(
    w: float, num_classes: int, helper_classes: Sequence[Sequence[int]], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """(1 + H, C) member weights, the target first: helper h weighs w/H on its classes, (1 − w)/H elsewhere."""
    weights = torch.full((len(helper_classes), num_classes), 1.0 - w, dtype=dtype)
    for h, classes in enumerate(helper_classes):
        weights[h, list(classes)] = w
    weights = weights / max(1, len(helper_classes))
    return torch.cat([(1.0 - weights.sum(dim=0))[None], weights])


def _mix(target: torch.Tensor, helpers: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Column-weighted mixture of the members' probabilities, rows renormalised."""
    weights = weights.to(target)
    mixed = target * weights[0] + sum(p * weights[h + 1] for h, p in enumerate(helpers))
    return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(1e-12)


class TrustOperator(EnsembleOperator):
    """Per-class trust weights over the target and every helper, learned from each labelled batch.

    Member m's weight on class c is ``softmax_m(s[m, c])``. A new helper starts from the
    class-aware prior (its log-odds against the target are ``±log(w / (1 − w))``, + on the classes
    it was asked for). After each labelled batch every score drops by ``eta`` times the member's
    binary cross-entropy on column c summed over the batch's samples (probabilities clamped to
    [``floor``, 1 − ``floor``]): with ``eta`` = 1 this is the Bayesian posterior of each column's
    members as Bernoulli predictors of "the label is c", and the served mixture its predictive.
    Then a fixed ``share`` of each column's weight is spread evenly over its members (Herbster &
    Warmuth's fixed share: a switching prior), so a member that got better (the target learning
    the new classes) wins its weight back within a batch or two.

    >>> op = TrustOperator()
    >>> t = torch.tensor([[0.9, 0.1], [0.1, 0.9]]); good = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    >>> for _ in range(5):
    ...     op.learn(t, [good], [[1]], ["h"], torch.tensor([1, 0]))
    >>> op.combine(t, [good], [[1]], ["h"]).argmax(dim=1).tolist()
    [1, 0]
    """

    name = "trust"
    learns = True

    def __init__(self, w: float = 0.95, eta: float = 1.0, share: float = 0.02, floor: float = 1e-3) -> None:
        if not 0.5 <= w < 1.0:
            raise ValueError(f"trust prior w must be in [0.5, 1), got {w}")
        self.w = w
        self.eta = eta
        self.share = share
        self.floor = floor
        #: Scores per member id ("" is the target), each a (C,) float64 tensor.
        self._scores: dict[str, torch.Tensor] = {}

    def _weights(self, num_classes: int, helper_classes: Sequence[Sequence[int]], helper_ids: Sequence[str]) -> torch.Tensor:
        if "" not in self._scores or self._scores[""].shape[0] != num_classes:
            self._scores = {"": torch.zeros(num_classes, dtype=torch.float64)}
        prior = math.log(self.w / (1.0 - self.w))
        for hid, classes in zip(helper_ids, helper_classes):
            if hid not in self._scores:
                s = self._scores[""] - prior
                s[list(classes)] += 2.0 * prior
                self._scores[hid] = s
        scores = torch.stack([self._scores[""], *(self._scores[h] for h in helper_ids)])
        return torch.softmax(scores, dim=0)

    @staticmethod
    def _ids(helpers: Sequence[torch.Tensor], helper_ids: Sequence[str] | None) -> list[str]:
        ids = list(helper_ids) if helper_ids is not None else [f"#{i}" for i in range(len(helpers))]
        if len(ids) != len(helpers) or "" in ids:
            raise ValueError("one non-empty id per helper is needed")
        return ids

    def combine(self, target, helpers, helper_classes, helper_ids=None):
        if not helpers:
            return target
        if len(helpers) != len(helper_classes):
            raise ValueError("one class list per helper is needed")
        ids = self._ids(helpers, helper_ids)
        return _mix(target, helpers, self._weights(target.shape[1], helper_classes, ids))

    @torch.no_grad()
    def learn(self, target, helpers, helper_classes, helper_ids, labels):
        if not helpers:
            return
        ids = self._ids(helpers, helper_ids)
        num_classes = target.shape[1]
        self._weights(num_classes, helper_classes, ids)
        onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)
        for hid, p in zip(["", *ids], [target, *helpers]):
            q = p.to(torch.float64).clamp(self.floor, 1.0 - self.floor)
            bce = -(onehot * q.log() + (1.0 - onehot) * (1.0 - q).log()).sum(dim=0).cpu()
            self._scores[hid] = self._scores[hid] - self.eta * bce
        members = ["", *ids]
        weights = torch.softmax(torch.stack([self._scores[m] for m in members]), dim=0)
        weights = (1.0 - self.share) * weights + self.share / len(members)
        logs = weights.log()
        logs = logs - logs.max(dim=0).values
        for m, s in zip(members, logs):
            self._scores[m] = s

    def swap(self, helper_id: str) -> None:
        if helper_id in self._scores and "" in self._scores:
            self._scores[""], self._scores[helper_id] = self._scores[helper_id], self._scores[""]

    def forget(self, keep: Sequence[str]) -> None:
        self._scores = {m: s for m, s in self._scores.items() if m == "" or m in keep}

    def weights(self, helper_ids: Sequence[str]) -> torch.Tensor | None:
        """The current (1 + H, C) weights, the target first (None before any helper was seen)."""
        if "" not in self._scores or any(h not in self._scores for h in helper_ids):
            return None
        return torch.softmax(torch.stack([self._scores[""], *(self._scores[h] for h in helper_ids)]), dim=0)


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


class TrustOperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["trust"] = "trust"
    w: float = Field(0.95, ge=0.5, lt=1.0, description="class-aware prior: a new helper's weight on the classes it was asked for")
    eta: float = Field(1.0, gt=0.0, le=100.0, description="learning rate of the per-class weights, per nat of a column's binary cross-entropy summed over a batch's samples (1: Bayes)")
    share: float = Field(0.02, ge=0.0, lt=1.0, description="fixed share of each class's weight spread over all members after every update")

    def build(self) -> EnsembleOperator:
        return TrustOperator(self.w, self.eta, self.share)


OperatorConfig = Annotated[
    Union[TrustOperatorConfig, ClassAwareOperatorConfig, MeanOperatorConfig], Field(discriminator="type")
]

