"""What every loader shares: the not-found error and small sampling helpers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from agent.errors import ClueError


class DatasetNotFound(ClueError, FileNotFoundError):
    """A data set's files are absent; the message says how to get them."""


def class_subset(x: np.ndarray, y: np.ndarray, classes: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``(x, y)`` whose label is in ``classes``, in their original order.

    Labels keep their values (class 7 stays 7), so a subset still feeds the full-width model.
    """
    x, y = _checked_pair(x, y)
    mask = np.isin(y, np.fromiter(classes, dtype=np.int64))
    return x[mask], y[mask]


def stratified_sample(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows drawn without replacement, each class in proportion to its share of ``y``.

    Per-class counts are rounded by largest remainder so they sum to exactly ``n``; the rows come
    back shuffled. The same ``seed`` gives the same rows.
    """
    x, y = _checked_pair(x, y)
    if not 0 <= n <= len(y):
        raise ValueError(f"cannot draw {n} rows from {len(y)}")
    if n == 0:
        return x[:0], y[:0]
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (n / len(y))
    take = np.floor(exact).astype(np.int64)
    short = n - int(take.sum())
    # Hand the rows lost to rounding to the classes with the largest remainders (ties: smaller label).
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    picked = [
        rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c, k in zip(classes, take)
    ]
    idx = rng.permutation(np.concatenate(picked))
    return x[idx], y[idx]


def _checked_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has shape {y.shape}; want one label per row")
    return x, y
