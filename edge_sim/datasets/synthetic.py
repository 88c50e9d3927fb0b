"""A seeded stand-in for NSL-KDD with the same 122-column encoding and 5 classes.

How a record is drawn: its class ``c`` (by ``class_weights``), then one of that class's
``_MODES`` sub-populations ``m`` (attacks within a category differ: a SYN flood is not a ping
flood). The mode sets a mean in a ``_LATENT``-dimensional space; a Gaussian draw around it is
projected to the 38 numeric columns (rates through a sigmoid, 0/1 features by sign, sparse
counts only past a threshold), and the mode's own mix of a shared background and a few favoured
categories picks the protocol, service and flag. Modes of different classes overlap, and some of
a class's modes lie on opposite sides of another class's, so a linear model cannot separate the
classes while a small MLP mostly can. A small fraction of labels is then redrawn at random.

The class structure (modes, projections, category mixes) is the same for every ``seed``: it is
built from a fixed seed, so two calls with different seeds are two samples of one task, as train
and test sets, or two edge nodes, should be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_sim.datasets.nslkdd import (
    BINARY_NAMES,
    CLASS_NAMES,
    FLAG_COLUMNS,
    FLAGS,
    N_FEATURES,
    NUMERIC_COLUMNS,
    NUMERIC_NAMES,
    PROTOCOL_COLUMNS,
    PROTOCOLS,
    SERVICE_COLUMNS,
    SERVICES,
)

_WORLD_SEED = 0x6B6464  # "kdd": fixes the task; the caller's seed only draws samples from it.
_LATENT = 6
_MODES = 4
_MODE_SPREAD = 2.5  # std of mode means in latent units (the noise around a mode has std 1)
_CENTRE_SPREAD = 0.3  # std of class centres, around which each class's modes balance
_CATEGORY_FOCUS = 0.35  # share of a mode's categorical draws taken from its favoured categories
_LABEL_NOISE = 0.02
# Counts that are zero in most real records; they light up only past a latent threshold.
_SPARSE_NAMES = (
    "wrong_fragment", "urgent", "hot", "num_failed_logins", "num_compromised", "su_attempted",
    "num_root", "num_file_creations", "num_shells", "num_access_files",
)  # fmt: skip
_ALWAYS_ZERO = ("num_outbound_cmds",)  # zero in every real NSL-KDD record


def make_synthetic_nslkdd(
    n: int, *, seed: int, class_weights: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic records as ``x`` float32 (n, 122) in the ``load_nslkdd`` encoding, ``y`` int64 (n,).

    ``class_weights`` (5 non-negative numbers, any scale) sets the class mix; the default is
    uniform. Same ``n``, ``seed`` and weights give identical arrays.

    >>> x, y = make_synthetic_nslkdd(4, seed=0)
    >>> x.shape, y.dtype.name
    ((4, 122), 'int64')
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    p = _class_probabilities(class_weights)
    world = _World(np.random.default_rng(_WORLD_SEED))
    rng = np.random.default_rng(seed)

    y = rng.choice(len(CLASS_NAMES), size=n, p=p)
    mode = rng.integers(_MODES, size=n)
    z = world.mode_means[y, mode] + rng.standard_normal((n, _LATENT))

    x = np.zeros((n, N_FEATURES), dtype=np.float32)
    u = z @ world.projection.T + world.bias + 0.3 * rng.standard_normal((n, len(NUMERIC_NAMES)))
    x[:, NUMERIC_COLUMNS] = world.squash(u)
    rows = np.arange(n)
    for block, probs in (
        (PROTOCOL_COLUMNS, world.protocol_p),
        (SERVICE_COLUMNS, world.service_p),
        (FLAG_COLUMNS, world.flag_p),
    ):
        x[rows, block.start + _draw_categories(rng, probs[y, mode])] = 1.0

    flip = rng.random(n) < _LABEL_NOISE
    y[flip] = rng.choice(len(CLASS_NAMES), size=int(flip.sum()), p=p)
    return x, y.astype(np.int64)


class _World:
    """The fixed class structure: mode means, the latent-to-numeric projection, category mixes."""

    def __init__(self, rng: np.random.Generator) -> None:
        k = len(CLASS_NAMES)
        offsets = _MODE_SPREAD * rng.standard_normal((k, _MODES, _LATENT))
        # Zero-mean offsets put a class's average at its centre, close to the others' centres:
        # a linear model sees mostly the small gap between centres, an MLP sees the modes.
        offsets -= offsets.mean(axis=1, keepdims=True)
        centres = _CENTRE_SPREAD * rng.standard_normal((k, 1, _LATENT))
        self.mode_means = centres + offsets
        n_num = len(NUMERIC_NAMES)
        self.projection = rng.standard_normal((n_num, _LATENT)) / np.sqrt(_LATENT) * 2.0
        self.bias = rng.normal(0.0, 0.5, n_num)
        self.protocol_p = _category_mix(rng, len(PROTOCOLS), k, favoured=1)
        self.service_p = _category_mix(rng, len(SERVICES), k, favoured=3)
        self.flag_p = _category_mix(rng, len(FLAGS), k, favoured=2)
        self.binary = np.isin(NUMERIC_NAMES, BINARY_NAMES)
        self.sparse = np.isin(NUMERIC_NAMES, _SPARSE_NAMES)
        self.zero = np.isin(NUMERIC_NAMES, _ALWAYS_ZERO)

    def squash(self, u: np.ndarray) -> np.ndarray:
        """Latent projections (n, 38) -> numeric columns in the encoded ranges."""
        out = 1.0 / (1.0 + np.exp(-u))
        out[:, self.binary] = u[:, self.binary] > 0
        # Sparse counts: zero below the threshold, small scaled values above it.
        s = u[:, self.sparse] - 1.5
        out[:, self.sparse] = np.where(s > 0, np.tanh(0.5 * s), 0.0)
        out[:, self.zero] = 0.0
        return out


def _category_mix(rng: np.random.Generator, n_cat: int, n_class: int, *, favoured: int) -> np.ndarray:
    """(classes, modes, n_cat) probabilities: a shared skewed background plus each mode's favourites."""
    background = rng.dirichlet(np.full(n_cat, 0.3))
    mix = np.empty((n_class, _MODES, n_cat))
    for c in range(n_class):
        for m in range(_MODES):
            focus = np.zeros(n_cat)
            focus[rng.choice(n_cat, size=min(favoured, n_cat), replace=False)] = 1.0
            mix[c, m] = (1 - _CATEGORY_FOCUS) * background + _CATEGORY_FOCUS * focus / focus.sum()
    return mix


def _draw_categories(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One category index per row of ``probs`` (n, n_cat), by inverse CDF."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random((len(probs), 1)) * cdf[:, -1:]
    return np.minimum((u > cdf).sum(axis=1), probs.shape[1] - 1)


def _class_probabilities(class_weights: Sequence[float] | None) -> np.ndarray:
    k = len(CLASS_NAMES)
    if class_weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(class_weights, dtype=np.float64)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"class_weights must be {k} non-negative numbers, not all zero; got {class_weights!r}")
    return w / w.sum()
