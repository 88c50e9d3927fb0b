"""Drift detectors: decide, once per request batch, whether the local model needs help.

Every detector is fed the same two things per batch: the batch's error rate in [0, 1] and, when
the batch is labelled, its integer labels. Error-based detectors (the paper's rolling mean,
Page-Hinkley, ADWIN) look only at the error; the novelty trigger looks only at the labels; the
default, novelty-or-error, fires on either (new classes the batch they arrive, any other rise in
error as the paper's rolling mean does). All of them report a *rise* in error or the arrival of new classes; a falling error (the online learner
improving) is never a drift here.

A detector is picked by its config's ``type`` field; :func:`build_detector` turns a config into a
detector. :func:`classes_to_request` names the classes a target should ask a helper for.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

__all__ = [
    "AdwinConfig",
    "AdwinDrift",
    "DriftConfig",
    "DriftDetector",
    "NoveltyConfig",
    "NoveltyOrErrorConfig",
    "NoveltyOrErrorDrift",
    "NoveltyTrigger",
    "PageHinkleyConfig",
    "PageHinkleyDrift",
    "RollingErrorConfig",
    "RollingErrorDrift",
    "build_detector",
    "classes_to_request",
]


# --- configs -------------------------------------------------------------------------------------


class _DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str

    def build(self, *, num_classes: int) -> DriftDetector:
        """The detector this config names, with its settings."""
        return _DETECTORS[self.type](**self.model_dump(exclude={"type"}), num_classes=num_classes)


class RollingErrorConfig(_DetectorConfig):
    """The paper's detector: rolling mean error over the last ``window`` batches."""

    type: Literal["rolling_error"] = Field(
        "rolling_error", description="Selects RollingErrorDrift."
    )
    window: int = Field(3, ge=1, le=1000, description="Number of most recent batches averaged (W).")
    threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="Fixed error threshold; None uses baseline + margin."
    )
    margin: float = Field(
        0.1, gt=0.0, lt=1.0, description="Rise over the sliding baseline that counts as drift."
    )
    baseline_window: int = Field(
        10, ge=1, le=10_000, description="Batches just before the window whose mean error is the baseline."
    )


class PageHinkleyConfig(_DetectorConfig):
    """Page-Hinkley test on the batch error (river), one-sided: rises only."""

    type: Literal["page_hinkley"] = Field("page_hinkley", description="Selects PageHinkleyDrift.")
    min_instances: int = Field(30, ge=1, le=1_000_000, description="Batches seen before a drift may be reported.")
    delta: float = Field(0.005, ge=0.0, le=1.0, description="Error change tolerated per batch.")
    threshold: float = Field(
        1.0, gt=0.0, le=1e6, description="Cumulative rise (lambda) that counts as drift."
    )
    alpha: float = Field(
        0.9999, ge=0.5, le=1.0, description="Forgetting factor of the cumulative sum."
    )


class AdwinConfig(_DetectorConfig):
    """ADWIN adaptive window on the batch error (river); only rises are reported."""

    type: Literal["adwin"] = Field("adwin", description="Selects AdwinDrift.")
    delta: float = Field(
        0.002, ge=1e-12, lt=1.0, description="Confidence of a cut; smaller is stricter."
    )
    clock: int = Field(1, ge=1, le=10_000, description="Check for a cut every this many batches.")
    max_buckets: int = Field(5, ge=2, le=100, description="Buckets kept per exponential-histogram row.")
    min_window_length: int = Field(
        5, ge=1, le=100_000, description="Smallest sub-window on either side of a cut."
    )
    grace_period: int = Field(10, ge=1, le=1_000_000, description="Batches seen before a drift may be reported.")


class NoveltyConfig(_DetectorConfig):
    """Ours: fire on the first batch in which a class never (or almost never) seen is labelled."""

    type: Literal["novelty"] = Field("novelty", description="Selects NoveltyTrigger.")
    max_longrun_share: float = Field(
        0.005, ge=0.0, lt=1.0, description="A class rarer than this in the long run counts as new."
    )
    min_batch_share: float = Field(
        0.05, gt=0.0, le=1.0, description="Share of a batch a new class must make up to fire."
    )
    min_count: int = Field(5, ge=1, le=1_000_000, description="Samples of a new class a batch must hold to fire.")
    warmup_samples: int = Field(
        1000, ge=0, le=10**9, description="Labelled samples seen before the trigger may fire."
    )

    @model_validator(mode="after")
    def _batch_share_above_longrun(self) -> NoveltyConfig:
        # Otherwise a class steadily at a small share would fire on every batch.
        if self.min_batch_share <= self.max_longrun_share:
            raise ValueError("min_batch_share must be greater than max_longrun_share")
        return self


class NoveltyOrErrorConfig(RollingErrorConfig, NoveltyConfig):
    """The default: the novelty trigger or the paper's rolling error, whichever fires.

    New classes are visible in the labels the batch they arrive, while the rolling error needs
    ``window`` batches of misclassified requests to cross its limit; other drift (a known class
    turning hard, inputs shifting within known classes) shows only in the error.
    """

    type: Literal["novelty_or_error"] = Field(  # type: ignore[assignment]
        "novelty_or_error", description="Selects NoveltyOrErrorDrift."
    )


DriftConfig = Annotated[
    Union[RollingErrorConfig, PageHinkleyConfig, AdwinConfig, NoveltyConfig, NoveltyOrErrorConfig],
    Field(discriminator="type"),
]
_DRIFT_CONFIG = TypeAdapter(DriftConfig)


# --- detectors -----------------------------------------------------------------------------------


class DriftDetector(ABC):
    """Base of every detector: validates the input, then hands it to ``_update``.

    Subclasses set ``name`` (equal to their config's ``type``) and fill in ``_update`` (return
    whether this batch shows drift) and ``_reset``.
    """

    name: ClassVar[str]

    def __init__(self, *, num_classes: int | None = None) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self._drift_detected = False

    @property
    def drift_detected(self) -> bool:
        """Whether the last update showed drift."""
        return self._drift_detected

    @property
    def novel_classes(self) -> tuple[int, ...]:
        """The never-seen classes that made the last update fire (empty for error-based detectors)."""
        return ()

    def update(self, batch_error: float, labels: np.ndarray | None = None) -> None:
        """Feed one request batch: its error rate in [0, 1] and, if labelled, its int labels."""
        error = _check_error(batch_error)
        checked = None if labels is None else _check_labels(labels, self.num_classes)
        self._drift_detected = self._update(error, checked)

    def reset(self) -> None:
        """Forget the stream seen so far (e.g. once a helper is installed)."""
        self._drift_detected = False
        self._reset()

    @abstractmethod
    def _update(self, batch_error: float, labels: np.ndarray | None) -> bool: ...

    @abstractmethod
    def _reset(self) -> None: ...


class RollingErrorDrift(DriftDetector):
    """The paper's detector: drift while the mean error of the last ``window`` batches is too high.

    "Too high" is above ``threshold`` when one is given. Otherwise it is above the mean error of the
    ``baseline_window`` batches just before the window, plus ``margin``: an online learner's error
    keeps falling, so a fixed threshold set at start-up goes stale and a sliding baseline does not.
    No drift is reported until the window (and, without a threshold, the baseline) is full.

    >>> det = RollingErrorDrift(window=3, margin=0.1, baseline_window=10)
    >>> for err in [0.15] * 13 + [0.45, 0.45]:
    ...     det.update(err)
    >>> det.drift_detected, round(det.rolling_error, 2), round(det.baseline, 2)
    (True, 0.35, 0.15)
    """

    name = "rolling_error"

    def __init__(
        self,
        window: int = 3,
        threshold: float | None = None,
        margin: float = 0.1,
        baseline_window: int = 10,
        *,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        cfg = RollingErrorConfig(
            window=window, threshold=threshold, margin=margin, baseline_window=baseline_window
        )
        self.window = cfg.window
        self.threshold = cfg.threshold
        self.margin = cfg.margin
        self.baseline_window = cfg.baseline_window
        self._errors: deque[float] = deque(maxlen=self.window + self.baseline_window)

    @property
    def rolling_error(self) -> float | None:
        """Mean error of the last ``window`` batches; None until that many were seen."""
        if len(self._errors) < self.window:
            return None
        return float(np.mean(list(self._errors)[-self.window :]))

    @property
    def baseline(self) -> float | None:
        """Mean error of the ``baseline_window`` batches before the window; None until seen."""
        if len(self._errors) < self.window + self.baseline_window:
            return None
        return float(np.mean(list(self._errors)[: self.baseline_window]))

    def _update(self, batch_error: float, labels: np.ndarray | None) -> bool:
        self._errors.append(batch_error)
        rolling = self.rolling_error
        limit = self.threshold
        if limit is None:
            baseline = self.baseline
            limit = None if baseline is None else baseline + self.margin
        return rolling is not None and limit is not None and rolling > limit

    def _reset(self) -> None:
        self._errors.clear()


def _river_drift() -> Any:
    """River's drift module, imported when a river detector is built.

    Importing river loads scikit-learn, pandas and scipy (about 120 MB and 0.9 s), which an agent
    on the default rolling-error detector never uses.
    """
    from river import drift

    return drift


class PageHinkleyDrift(DriftDetector):
    """River's Page-Hinkley test fed with the batch error, watching for rises only.

    River's default threshold (50) suits raw values; errors live in [0, 1], so the default here is
    1.0: with 200-sample batches a step in error from 0.15 to 0.45 is reported three batches later.
    """

    name = "page_hinkley"

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 1.0,
        alpha: float = 0.9999,
        *,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        self._cfg = PageHinkleyConfig(
            min_instances=min_instances, delta=delta, threshold=threshold, alpha=alpha
        )
        self._reset()

    def _update(self, batch_error: float, labels: np.ndarray | None) -> bool:
        self._ph.update(batch_error)
        return bool(self._ph.drift_detected)

    def _reset(self) -> None:
        c = self._cfg
        self._ph = _river_drift().PageHinkley(
            min_instances=c.min_instances,
            delta=c.delta,
            threshold=c.threshold,
            alpha=c.alpha,
            mode="up",
        )


class AdwinDrift(DriftDetector):
    """River's ADWIN fed with the batch error; a cut counts only when the error went up.

    ADWIN is two-sided, and an online learner's error falls as it learns: a cut where the recent
    mean is lower than before is a recovery, not a drift. River's default clock (32) would check for
    a cut once every 32 batches; here it checks every batch. ADWIN's bound is built for long streams
    of single samples: on one value per batch it needs about 50 batches (20 with ``delta=0.2``) to
    confirm a step from 0.15 to 0.45, so it suits slow drifts, not the onset of new classes.
    """

    name = "adwin"

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 1,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
        *,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        self._cfg = AdwinConfig(
            delta=delta,
            clock=clock,
            max_buckets=max_buckets,
            min_window_length=min_window_length,
            grace_period=grace_period,
        )
        self._reset()

    def _update(self, batch_error: float, labels: np.ndarray | None) -> bool:
        before = self._adwin.estimation
        self._adwin.update(batch_error)
        # After a cut the window holds only the recent side, so its mean says which way it went.
        return bool(self._adwin.drift_detected) and self._adwin.estimation > before

    def _reset(self) -> None:
        c = self._cfg
        self._adwin = _river_drift().ADWIN(
            delta=c.delta,
            clock=c.clock,
            max_buckets=c.max_buckets,
            min_window_length=c.min_window_length,
            grace_period=c.grace_period,
        )


class NoveltyTrigger(DriftDetector):
    """Ours: fire on the first batch in which a class the node has (almost) never seen shows up.

    Keeps the long-run histogram of every label seen. A batch fires when some class whose long-run
    share (before this batch) is below ``max_longrun_share`` makes up at least ``min_batch_share``
    and at least ``min_count`` samples of the batch, once ``warmup_samples`` labels have been seen.
    Each class fires at most once until :meth:`reset`. Unlabelled batches are ignored. Waiting for
    the error to rise costs batches during which the new classes are misclassified; the labels say
    at once that something new arrived.

    >>> import numpy as np
    >>> det = NoveltyTrigger(num_classes=10, warmup_samples=1000)
    >>> for _ in range(5):
    ...     det.update(0.1, np.repeat(np.arange(8), 25))
    >>> det.update(0.3, np.concatenate([np.repeat(np.arange(8), 20), np.repeat([8, 9], 20)]))
    >>> det.drift_detected, det.novel_classes
    (True, (8, 9))
    """

    name = "novelty"
    _hist: np.ndarray
    _fired: np.ndarray
    _seen: int
    _novel: tuple[int, ...]

    def __init__(
        self,
        num_classes: int,
        max_longrun_share: float = 0.005,
        min_batch_share: float = 0.05,
        min_count: int = 5,
        warmup_samples: int = 1000,
    ) -> None:
        if num_classes is None:
            raise ValueError("NoveltyTrigger needs num_classes")
        super().__init__(num_classes=num_classes)
        cfg = NoveltyConfig(
            max_longrun_share=max_longrun_share,
            min_batch_share=min_batch_share,
            min_count=min_count,
            warmup_samples=warmup_samples,
        )
        self.max_longrun_share = cfg.max_longrun_share
        self.min_batch_share = cfg.min_batch_share
        self.min_count = cfg.min_count
        self.warmup_samples = cfg.warmup_samples
        self._reset()

    @property
    def novel_classes(self) -> tuple[int, ...]:
        """The classes that fired on the last update (empty when it did not fire)."""
        return self._novel

    def _update(self, batch_error: float, labels: np.ndarray | None) -> bool:
        self._novel = ()
        if labels is None or labels.size == 0:
            return False
        counts = np.bincount(labels, minlength=self._hist.size)
        if self._seen >= self.warmup_samples:
            longrun_share = self._hist / max(self._seen, 1)
            fire = (
                (longrun_share < self.max_longrun_share)
                & (counts >= self.min_batch_share * labels.size)
                & (counts >= self.min_count)
                & ~self._fired
            )
            self._novel = tuple(int(c) for c in np.flatnonzero(fire))
            self._fired |= fire
        self._hist += counts
        self._seen += int(labels.size)
        return bool(self._novel)

    def _reset(self) -> None:
        n = self.num_classes
        assert n is not None  # checked in __init__
        self._hist = np.zeros(n, dtype=np.int64)
        self._fired = np.zeros(n, dtype=bool)
        self._seen = 0
        self._novel = ()


class NoveltyOrErrorDrift(DriftDetector):
    """The default: a :class:`NoveltyTrigger` and a :class:`RollingErrorDrift` fed the same stream.

    Fires when either does; :attr:`novel_classes` says when the labels were the reason.

    >>> import numpy as np
    >>> det = NoveltyOrErrorDrift(num_classes=10, warmup_samples=1000)
    >>> for _ in range(13):
    ...     det.update(0.1, np.repeat(np.arange(8), 25))
    >>> det.update(0.3, np.concatenate([np.repeat(np.arange(8), 20), np.repeat([8, 9], 20)]))
    >>> det.drift_detected, det.novel_classes
    (True, (8, 9))
    >>> det.update(0.5, np.repeat(np.arange(10), 20))
    >>> det.update(0.5, np.repeat(np.arange(10), 20))
    >>> det.drift_detected, det.novel_classes
    (True, ())
    """

    name = "novelty_or_error"

    def __init__(
        self,
        window: int = 3,
        threshold: float | None = None,
        margin: float = 0.1,
        baseline_window: int = 10,
        max_longrun_share: float = 0.005,
        min_batch_share: float = 0.05,
        min_count: int = 5,
        warmup_samples: int = 1000,
        *,
        num_classes: int | None = None,
    ) -> None:
        if num_classes is None:
            raise ValueError("NoveltyOrErrorDrift needs num_classes")
        super().__init__(num_classes=num_classes)
        self.error = RollingErrorDrift(
            window=window, threshold=threshold, margin=margin, baseline_window=baseline_window
        )
        self.novelty = NoveltyTrigger(
            num_classes,
            max_longrun_share=max_longrun_share,
            min_batch_share=min_batch_share,
            min_count=min_count,
            warmup_samples=warmup_samples,
        )
        self.window = self.error.window

    @property
    def novel_classes(self) -> tuple[int, ...]:
        return self.novelty.novel_classes

    def _update(self, batch_error: float, labels: np.ndarray | None) -> bool:
        self.novelty.update(batch_error, labels)
        self.error.update(batch_error, labels)
        return self.novelty.drift_detected or self.error.drift_detected

    def _reset(self) -> None:
        self.novelty.reset()
        self.error.reset()


_DETECTORS: dict[str, type[DriftDetector]] = {
    cls.name: cls
    for cls in (RollingErrorDrift, PageHinkleyDrift, AdwinDrift, NoveltyTrigger, NoveltyOrErrorDrift)
}


def build_detector(cfg: DriftConfig | Mapping[str, Any], *, num_classes: int) -> DriftDetector:
    """Build the detector a config names; a mapping (parsed YAML/JSON) is validated first.

    >>> build_detector({"type": "rolling_error", "window": 5}, num_classes=10).window
    5
    """
    if isinstance(cfg, Mapping):
        cfg = _DRIFT_CONFIG.validate_python(cfg)
    return cfg.build(num_classes=num_classes)


# --- which classes to ask for --------------------------------------------------------------------


def classes_to_request(
    longrun_hist: np.ndarray,
    recent_hist: np.ndarray,
    recent_class_error: np.ndarray | None = None,
    *,
    rise_factor: float = 3.0,
    min_recent_share: float = 0.05,
    min_recent_count: int = 5,
    error_threshold: float = 0.5,
) -> list[int]:
    """The classes a target should ask a helper for, ascending.

    A class qualifies with at least ``min_recent_count`` recent samples and either
    (a) it is new or sharply risen: recent share >= ``min_recent_share`` and >= ``rise_factor``
    times its long-run share, or (b) its recent error rate is >= ``error_threshold``.
    Histograms are per-class counts, shape (C,); ``recent_class_error`` is per-class error rate in
    [0, 1], shape (C,), NaN allowed for classes without recent samples.

    >>> classes_to_request(np.array([100, 100, 100, 0]), np.array([20, 20, 20, 15]))
    [3]
    """
    longrun = _check_hist(longrun_hist, "longrun_hist")
    recent = _check_hist(recent_hist, "recent_hist")
    if longrun.shape != recent.shape:
        raise ValueError(f"histogram shapes differ: {longrun.shape} vs {recent.shape}")
    if not rise_factor > 0:
        raise ValueError(f"rise_factor must be > 0, got {rise_factor}")
    if not 0 <= min_recent_share <= 1:
        raise ValueError(f"min_recent_share must be in [0, 1], got {min_recent_share}")
    if min_recent_count < 1:
        raise ValueError(f"min_recent_count must be >= 1, got {min_recent_count}")
    if not 0 <= error_threshold <= 1:
        raise ValueError(f"error_threshold must be in [0, 1], got {error_threshold}")

    enough = recent >= min_recent_count
    recent_share = _shares(recent)
    risen = (recent_share >= min_recent_share) & (recent_share >= rise_factor * _shares(longrun))
    wanted = enough & risen
    if recent_class_error is not None:
        err = np.asarray(recent_class_error, dtype=np.float64)
        if err.shape != recent.shape:
            raise ValueError(f"recent_class_error has shape {err.shape}, expected {recent.shape}")
        known = ~np.isnan(err)
        if np.any(~np.isfinite(err[known])) or np.any((err[known] < 0) | (err[known] > 1)):
            raise ValueError("recent_class_error must be in [0, 1] (NaN for unseen classes)")
        wanted |= enough & known & (np.nan_to_num(err, nan=0.0) >= error_threshold)
    return [int(c) for c in np.flatnonzero(wanted)]


# --- input checks --------------------------------------------------------------------------------


def _check_error(batch_error: float) -> float:
    if isinstance(batch_error, bool) or not isinstance(batch_error, numbers.Real):
        raise ValueError(f"batch_error must be a real number, got {batch_error!r}")
    error = float(batch_error)
    if not 0.0 <= error <= 1.0:  # also rejects NaN
        raise ValueError(f"batch_error must be in [0, 1], got {batch_error!r}")
    return error


def _check_labels(labels: np.ndarray, num_classes: int | None) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"labels must be a 1-D int array, got {arr.dtype} shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes)):
        raise ValueError(f"labels must be in [0, {num_classes}), got {arr.min()}..{arr.max()}")
    return arr


def _check_hist(hist: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(hist, dtype=np.float64)
    if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{what} must be a 1-D array of finite non-negative counts")
    return arr


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)
