"""Workloads: which classes each node's request batches hold, batch by batch.

A workload is a class schedule per node; :class:`BatchStream` turns it into request batches drawn
from a labelled pool. *introduction*: the target's new classes appear at the drift batch and stay.
*fluctuation*: they come and go in phases. Helpers are *overlapping* (they see every class),
*non-overlapping* (they never see some of the target's initial classes) or *split* (each sees the
target's classes and one of the new ones, so no single node knows every new class: pooling, the
paper's Fig. 8). A *wrong helper* (the paper's Fig. 10 a) is a last node that sees only the first
half of the target's classes: the least similar node, and one that knows none of the new classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class ClassMix:
    """Classes of one batch: ``base`` share (1 − extra_share) spread uniformly, ``extra`` the rest."""

    base: tuple[int, ...]
    extra: tuple[int, ...] = ()
    extra_share: float = 0.0

    def counts(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Per-class sample counts for one batch (multinomial, so batches vary like real traffic)."""
        classes = list(self.base) + list(self.extra)
        probs = [(1.0 - self.extra_share) / len(self.base)] * len(self.base)
        if self.extra:
            probs += [self.extra_share / len(self.extra)] * len(self.extra)
        draw = rng.multinomial(batch_size, probs)
        out = {}
        for c, n in zip(classes, draw):
            out[c] = out.get(c, 0) + int(n)
        return out


@dataclass(frozen=True)
class Workload:
    """Per node, the class mix of every batch."""

    kind: Literal["introduction", "fluctuation"]
    helpers: Literal["overlapping", "non_overlapping", "split"]
    num_classes: int
    target_classes: tuple[int, ...]
    new_classes: tuple[int, ...]
    helper_classes: tuple[int, ...]
    drift_at: int
    new_share: float
    fluctuation_period: int = 10
    wrong_helper: int | None = None

    def new_classes_present(self, batch: int) -> bool:
        if batch < self.drift_at:
            return False
        if self.kind == "introduction":
            return True
        return ((batch - self.drift_at) // self.fluctuation_period) % 2 == 0

    def mix(self, node: int, batch: int) -> ClassMix:
        """Node 0 is the target; every other node is a potential helper."""
        if node == self.wrong_helper:
            return ClassMix(self.target_classes[: max(1, len(self.target_classes) // 2)])
        if node != 0 and self.helpers == "split":
            return ClassMix(self.target_classes + (self.new_classes[(node - 1) % len(self.new_classes)],))
        if node != 0:
            return ClassMix(self.helper_classes)
        if self.new_classes_present(batch):
            return ClassMix(self.target_classes, self.new_classes, self.new_share)
        return ClassMix(self.target_classes)


def introduction_workload(
    *,
    helpers: Literal["overlapping", "non_overlapping", "split"] = "overlapping",
    kind: Literal["introduction", "fluctuation"] = "introduction",
    num_classes: int = 10,
    initial: int = 8,
    drift_at: int = 20,
    new_share: float = 0.25,
    non_overlap_from: int = 4,
    wrong_helper: int | None = None,
    new_classes: Sequence[int] | None = None,
) -> Workload:
    """The target starts with every class but the new ones; those arrive at ``drift_at``.

    ``new_classes``: which classes arrive (None: the top ``num_classes − initial`` ones, so the
    target starts with [0, initial)). Overlapping helpers see every class from the start;
    non-overlapping ones never see the target's first ``non_overlap_from`` initial classes.
    """
    if new_classes is None:
        new = tuple(range(initial, num_classes))
    else:
        new = tuple(sorted(int(c) for c in new_classes))
        if len(set(new)) != len(new) or not new or not all(0 <= c < num_classes for c in new):
            raise ValueError(f"new_classes {list(new_classes)} must be distinct classes in [0, {num_classes})")
    target = tuple(c for c in range(num_classes) if c not in new)
    if not target:
        raise ValueError("the target must start with at least one class")
    unseen = set(target[:non_overlap_from])
    helper = tuple(range(num_classes)) if helpers == "overlapping" else tuple(c for c in range(num_classes) if c not in unseen)
    return Workload(kind, helpers, num_classes, target, new, helper, drift_at, new_share, wrong_helper=wrong_helper)


class BatchStream:
    """Request batches for one node: samples of each class drawn without replacement, cycling."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, seed: int, indices: np.ndarray | None = None) -> None:
        self.x = x
        self.rng = np.random.default_rng(seed)
        rows = np.arange(len(y)) if indices is None else np.asarray(indices)
        self._pools = {int(c): self.rng.permutation(rows[y[rows] == c]) for c in np.unique(y[rows])}
        self._cursor = {c: 0 for c in self._pools}

    def _take(self, c: int, n: int) -> np.ndarray:
        pool = self._pools[c]
        out = []
        while n > 0:
            start = self._cursor[c]
            chunk = pool[start : start + n]
            out.append(chunk)
            n -= len(chunk)
            self._cursor[c] = (start + len(chunk)) % len(pool)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def batch(self, mix: ClassMix, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        counts = mix.counts(batch_size, self.rng)
        idx = np.concatenate([self._take(c, n) for c, n in counts.items() if n > 0])
        labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in counts.items() if n > 0])
        order = self.rng.permutation(len(idx))
        return self.x[idx[order]], labels[order]


def split_pool(
    y: np.ndarray, *, holdout_classes: Sequence[int], holdout: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a pre-training set (``holdout`` samples of ``holdout_classes``) and of the rest."""
    rng = np.random.default_rng(seed)
    candidates = rng.permutation(np.flatnonzero(np.isin(y, list(holdout_classes))))
    pretrain = candidates[:holdout]
    rest = np.setdiff1d(np.arange(len(y)), pretrain)
    return pretrain, rest
