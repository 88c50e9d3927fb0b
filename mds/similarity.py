"""Helper selection: how alike two nodes' class priors are, and the best eligible helpers.

The MdS holds one class histogram per node, stacked as ``H`` (N nodes × C classes, counts). A query
histogram ``q`` (C,) is compared with every row at once; histograms are normalised to distributions
inside, so only the shape of a node's class prior matters, not how much it has seen. All three
similarities lie in [0, 1], 1 for identical distributions and 0 for disjoint ones; an all-zero
row (a node that has seen nothing) scores 0 and is never returned by :func:`top_k`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "SIMILARITIES",
    "cosine",
    "eligible_mask",
    "hellinger",
    "jensen_shannon",
    "top_k",
]

Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _row_dot(P: np.ndarray, p: np.ndarray) -> np.ndarray:
    # einsum's own loop rather than ``P @ p``: BLAS may sum rows in different orders, and then two
    # identical rows could score a hair apart and break the lower-index-first tie rule.
    return np.einsum("ij,j->i", P, p)


def row_norms(P: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row of the distributions ``P`` (what ``cosine_of`` may be given)."""
    return np.sqrt(np.einsum("ij,ij->i", P, P))


def cosine_of(p: np.ndarray, P: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of the distribution ``p`` with each row of the distributions ``P``."""
    norms = (row_norms(P) if norms is None else norms) * np.sqrt(np.dot(p, p))
    dot = _row_dot(P, p)
    out = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return np.clip(out, 0.0, 1.0)


def jensen_shannon_of(p: np.ndarray, P: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    M = 0.5 * (P + p)
    divergence = 0.5 * (_kl_terms(p, M).sum(axis=1) + _kl_terms(P, M).sum(axis=1))
    out = 1.0 - np.sqrt(np.clip(divergence, 0.0, 1.0))
    return np.where(_live(p, P), out, 0.0)


def hellinger_of(p: np.ndarray, P: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    bhattacharyya = _row_dot(np.sqrt(P), np.sqrt(p))
    out = 1.0 - np.sqrt(np.clip(1.0 - bhattacharyya, 0.0, 1.0))
    return np.where(_live(p, P), out, 0.0)


#: The similarities on distributions already normalised and checked (the MdS caches them).
OF_DISTRIBUTIONS = {"cosine": cosine_of, "jensen_shannon": jensen_shannon_of, "hellinger": hellinger_of}


def cosine(q: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``q`` (C,) with each row of ``H`` (N, C); returns (N,)."""
    return cosine_of(*_distributions(q, H))


def jensen_shannon(q: np.ndarray, H: np.ndarray) -> np.ndarray:
    """1 − Jensen-Shannon distance (log base 2) of ``q`` (C,) to each row of ``H`` (N, C)."""
    return jensen_shannon_of(*_distributions(q, H))


def hellinger(q: np.ndarray, H: np.ndarray) -> np.ndarray:
    """1 − Hellinger distance between ``q`` (C,) and each row of ``H`` (N, C); returns (N,)."""
    return hellinger_of(*_distributions(q, H))


SIMILARITIES: dict[str, Similarity] = {
    "cosine": cosine,
    "jensen_shannon": jensen_shannon,
    "hellinger": hellinger,
}


def top_k(
    q: np.ndarray,
    H: np.ndarray,
    k: int,
    *,
    eligible: np.ndarray,
    metric: str = "cosine",
    least: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` eligible rows of ``H`` most similar to ``q``: (indices, scores), best first.

    ``least`` turns the ranking round: the ``k`` least similar, least similar first. Ties go to
    the lower index. Rows with an all-zero histogram are never returned. Fewer than
    ``k`` results come back when fewer rows are eligible.

    >>> H = np.array([[10, 0, 0], [5, 5, 0], [0, 0, 7], [9, 1, 0]])
    >>> idx, scores = top_k(np.array([1, 0, 0]), H, 2, eligible=np.array([True, True, True, False]))
    >>> idx.tolist(), np.round(scores, 3).tolist()
    ([0, 1], [1.0, 0.707])
    """
    if metric not in SIMILARITIES:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(SIMILARITIES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    q, H = _check(q, H)
    mask = np.asarray(eligible)
    if mask.dtype != bool or mask.shape != (H.shape[0],):
        raise ValueError(f"eligible must be a bool array of shape ({H.shape[0]},)")

    scores = SIMILARITIES[metric](q, H)
    return best_rows(scores, np.flatnonzero(mask & (H.sum(axis=1) > 0)), k, least=least)


def best_rows(scores: np.ndarray, candidates: np.ndarray, k: int, *, least: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` of the row indices ``candidates`` (ascending) with the highest ``scores`` (lowest
    with ``least``): (indices, scores), best first, ties to the lower index."""
    rank = -scores if least else scores
    cand_scores = rank[candidates]
    if k == 0:
        candidates = candidates[:0]
    elif k < candidates.size:
        # The k-th best score from a partition (O(N)), then everything strictly above it plus the
        # lowest-index rows tied at it; argpartition alone would pick among those ties arbitrarily.
        kth = np.partition(cand_scores, candidates.size - k)[candidates.size - k]
        above = candidates[cand_scores > kth]
        tied = candidates[cand_scores == kth][: k - above.size]
        candidates = np.concatenate([above, tied])
    order = np.lexsort((candidates, -rank[candidates]))
    return candidates[order], scores[candidates[order]]


def eligible_mask(
    *,
    node_ids: Sequence[Any] | np.ndarray,
    online: Sequence[bool] | np.ndarray,
    arch_ids: Sequence[str] | np.ndarray,
    lineages: Sequence[str] | np.ndarray,
    asker_id: Any,
    arch_id: str,
    lineage: str,
    hists: np.ndarray | None = None,
    required_classes: Sequence[int] = (),
    min_class_share: float = 0.01,
) -> np.ndarray:
    """Which nodes may help ``asker_id``: (N,) bool.

    A helper must be another node, online, of the same architecture and lineage (weights only
    transfer between nets grown from the same base model), and, when ``required_classes`` are
    given, hold at least ``min_class_share`` of its histogram ``hists`` (N, C) in *each* of them:
    a helper cannot pass on knowledge of a class it has not seen.
    """
    ids = np.asarray(node_ids, dtype=object)
    n = ids.shape[0]
    on = np.asarray(online)
    archs = np.asarray(arch_ids, dtype=object)
    lins = np.asarray(lineages, dtype=object)
    for what, arr in (("node_ids", ids), ("online", on), ("arch_ids", archs), ("lineages", lins)):
        if arr.shape != (n,):
            raise ValueError(f"{what} must be 1-D of length {n}, got shape {arr.shape}")
    if on.size and on.dtype != bool:
        raise ValueError(f"online must be bool, got {on.dtype}")
    if not 0.0 <= min_class_share <= 1.0:
        raise ValueError(f"min_class_share must be in [0, 1], got {min_class_share}")

    mask = (ids != asker_id) & on.astype(bool) & (archs == arch_id) & (lins == lineage)
    required = np.asarray(required_classes, dtype=np.int64).reshape(-1)
    if required.size:
        if hists is None:
            raise ValueError("required_classes need hists")
        counts = _check_matrix(hists)
        if counts.shape[0] != n:
            raise ValueError(f"hists has {counts.shape[0]} rows, expected {n}")
        if required.min() < 0 or required.max() >= counts.shape[1]:
            raise ValueError(f"required_classes must be in [0, {counts.shape[1]})")
        shares = _normalise_rows(counts)
        mask &= (shares[:, required] >= min_class_share).all(axis=1)
    return mask


def _check(q: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qa = np.asarray(q, dtype=np.float64)
    if qa.ndim != 1 or not np.all(np.isfinite(qa)) or np.any(qa < 0):
        raise ValueError("q must be a 1-D array of finite non-negative counts")
    Ha = _check_matrix(H)
    if Ha.shape[1] != qa.shape[0]:
        raise ValueError(f"H has {Ha.shape[1]} classes, q has {qa.shape[0]}")
    return qa, Ha


def _check_matrix(H: np.ndarray) -> np.ndarray:
    Ha = np.asarray(H, dtype=np.float64)
    if Ha.ndim != 2 or not np.all(np.isfinite(Ha)) or np.any(Ha < 0):
        raise ValueError("H must be a 2-D array (N, C) of finite non-negative counts")
    return Ha


def _normalise_rows(H: np.ndarray) -> np.ndarray:
    totals = H.sum(axis=1, keepdims=True)
    return np.divide(H, totals, out=np.zeros_like(H), where=totals > 0)


def _distributions(q: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qa, Ha = _check(q, H)
    total = qa.sum()
    p = qa / total if total > 0 else np.zeros_like(qa)
    return p, _normalise_rows(Ha)


def _live(p: np.ndarray, P: np.ndarray) -> np.ndarray:
    # An empty histogram carries no prior; the divergences would still give it a score, so zero it.
    return (P.sum(axis=1) > 0) & (p.sum() > 0)


def _kl_terms(a: np.ndarray, M: np.ndarray) -> np.ndarray:
    # Where a is 0 the term is 0 by convention; where a > 0, M >= a/2 > 0, so the log is finite.
    ratio = np.divide(a, M, out=np.ones(np.broadcast_shapes(a.shape, M.shape)), where=a > 0)
    return np.where(a > 0, a * np.log2(ratio), 0.0)
