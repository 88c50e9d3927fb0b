"""Drift detectors: one shared suite run against every detector, then each one's own rules."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from pydantic import ValidationError

from agent.drift import (
    AdwinConfig,
    AdwinDrift,
    DriftDetector,
    NoveltyConfig,
    NoveltyOrErrorConfig,
    NoveltyOrErrorDrift,
    NoveltyTrigger,
    PageHinkleyConfig,
    PageHinkleyDrift,
    RollingErrorConfig,
    RollingErrorDrift,
    build_detector,
    classes_to_request,
)

NUM_CLASSES = 10
BATCH = 200


def stream(
    n_batches: int,
    onset: int | None,
    *,
    seed: int,
    low: float = 0.15,
    high: float = 0.45,
    new_share: float = 0.25,
) -> Iterator[tuple[float, np.ndarray]]:
    """Seeded (batch_error, labels) pairs: error ~ Binomial(BATCH, low)/BATCH over classes 0..7;
    from ``onset`` on, error around ``high`` and classes 8-9 make up ``new_share`` of each batch."""
    rng = np.random.default_rng(seed)
    for i in range(n_batches):
        drifted = onset is not None and i >= onset
        error = rng.binomial(BATCH, high if drifted else low) / BATCH
        n_new = int(new_share * BATCH) if drifted else 0
        labels = np.concatenate(
            [rng.integers(0, 8, BATCH - n_new), rng.integers(8, NUM_CLASSES, n_new)]
        )
        yield error, rng.permutation(labels)


def flags(det: DriftDetector, batches: Iterator[tuple[float, np.ndarray]]) -> list[bool]:
    out = []
    for error, labels in batches:
        det.update(error, labels)
        out.append(det.drift_detected)
    return out


@dataclass(frozen=True)
class Case:
    make: Callable[[], DriftDetector]
    onset: int  # where the step goes: late enough for the detector's warm-up
    max_delay: int  # batches from the onset to the first flag, measured with margin


CASES = {
    "rolling_error": Case(lambda: RollingErrorDrift(window=3, margin=0.1, num_classes=10), 100, 2),
    "page_hinkley": Case(lambda: PageHinkleyDrift(num_classes=10), 100, 5),
    # ADWIN's bound needs many values to confirm a cut; one value per batch makes it slow.
    "adwin": Case(lambda: AdwinDrift(num_classes=10), 100, 60),
    "novelty": Case(lambda: NoveltyTrigger(num_classes=10), 20, 0),
    "novelty_or_error": Case(lambda: NoveltyOrErrorDrift(num_classes=10), 20, 0),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


# --- the shared suite ----------------------------------------------------------------------------


def test_name_matches_config_type(case: Case) -> None:
    det = case.make()
    assert type(build_detector({"type": det.name}, num_classes=NUM_CLASSES)) is type(det)


def test_deterministic_on_seeded_stream(case: Case) -> None:
    a = flags(case.make(), stream(300, case.onset, seed=7))
    b = flags(case.make(), stream(300, case.onset, seed=7))
    assert a == b
    assert any(a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_drift_on_steady_stream(case: Case, seed: int) -> None:
    assert not any(flags(case.make(), stream(300, None, seed=seed)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detects_step_within_delay(case: Case, seed: int) -> None:
    seen = flags(case.make(), stream(300, case.onset, seed=seed))
    assert not any(seen[: case.onset])
    first = seen.index(True)
    assert first - case.onset <= case.max_delay


def test_reset_forgets(case: Case) -> None:
    det = case.make()
    seen = flags(det, stream(300, case.onset, seed=3))
    assert any(seen)
    det.reset()
    assert not det.drift_detected
    # After reset the detector behaves exactly like a fresh one.
    assert flags(det, stream(300, case.onset, seed=4)) == flags(
        case.make(), stream(300, case.onset, seed=4)
    )


def test_reset_then_new_level_is_not_drift(case: Case) -> None:
    det = case.make()
    flags(det, stream(300, case.onset, seed=5))
    det.reset()
    assert not any(flags(det, stream(150, 0, seed=6)))


@pytest.mark.parametrize(
    "error, labels",
    [
        (-0.01, None),
        (1.01, None),
        (float("nan"), None),
        (float("inf"), None),
        ("0.1", None),
        (True, None),
        (0.1, np.array([[1, 2]])),
        (0.1, np.array([0.0, 1.0])),
        (0.1, np.array([0, -1])),
        (0.1, np.array([0, NUM_CLASSES])),
    ],
)
def test_bad_input_raises(case: Case, error: object, labels: np.ndarray | None) -> None:
    det = case.make()
    with pytest.raises(ValueError):
        det.update(error, labels)  # type: ignore[arg-type]


def test_accepts_empty_and_unlabelled_batches(case: Case) -> None:
    det = case.make()
    det.update(0.2, None)
    det.update(0.2, np.array([], dtype=np.int64))
    assert not det.drift_detected


# --- detector-specific rules ---------------------------------------------------------------------


def test_rolling_error_fixed_threshold() -> None:
    det = RollingErrorDrift(window=3, threshold=0.3)
    det.update(0.9)
    det.update(0.9)
    assert det.rolling_error is None and not det.drift_detected  # window not full yet
    det.update(0.9)
    assert det.drift_detected and det.rolling_error == pytest.approx(0.9)
    for _ in range(3):
        det.update(0.1)
    assert not det.drift_detected and det.rolling_error == pytest.approx(0.1)


def test_rolling_error_baseline_slides_with_a_falling_error() -> None:
    det = RollingErrorDrift(window=3, margin=0.1, baseline_window=10)
    errors = np.linspace(0.6, 0.1, 100)  # an online learner improving
    for e in errors:
        det.update(float(e))
        assert not det.drift_detected
    assert det.baseline == pytest.approx(float(np.mean(errors[-13:-3])))
    det.update(0.5)
    det.update(0.5)
    assert det.drift_detected  # 0.1 + a jump well above the recent baseline


def test_rolling_error_waits_for_baseline() -> None:
    det = RollingErrorDrift(window=3, margin=0.1, baseline_window=10)
    for _ in range(12):
        det.update(0.9)
        assert det.baseline is None and not det.drift_detected
    det.update(0.9)
    assert det.baseline == pytest.approx(0.9)


@pytest.mark.parametrize("make", [PageHinkleyDrift, AdwinDrift])
def test_river_wrappers_ignore_a_falling_error(make: Callable[[], DriftDetector]) -> None:
    det = make()
    assert not any(flags(det, stream(300, 100, seed=0, low=0.45, high=0.1)))


def test_novelty_warmup_min_count_and_once_per_class() -> None:
    det = NoveltyTrigger(
        num_classes=4,
        max_longrun_share=0.004,
        min_batch_share=0.005,
        min_count=5,
        warmup_samples=100,
    )
    old = np.repeat([0, 1], 300)
    det.update(0.1, np.concatenate([old, [3] * 10]))
    assert not det.drift_detected  # still warming up: 0 samples seen before this batch
    for _ in range(2):
        det.update(0.1, old)
    det.update(0.1, np.concatenate([old, [2] * 4]))
    assert not det.drift_detected  # 4 < min_count
    det.update(0.1, np.concatenate([old, [2] * 6]))
    assert det.drift_detected and det.novel_classes == (2,)
    det.update(0.1, np.concatenate([old, [2] * 6]))
    # Class 2 is still below max_longrun_share, but it already fired.
    assert not det.drift_detected and det.novel_classes == ()
    det.update(0.3, None)
    assert not det.drift_detected  # unlabelled batches are ignored


def test_novelty_ignores_a_class_already_common() -> None:
    det = NoveltyTrigger(num_classes=3, warmup_samples=0)
    det.update(0.1, np.repeat([0, 1, 2], 50))
    det.update(0.1, np.repeat([0, 1, 2], 50))
    assert not det.drift_detected


def test_novelty_fires_no_later_than_rolling_error() -> None:
    for seed in range(5):
        novelty = NoveltyTrigger(num_classes=NUM_CLASSES)
        rolling = RollingErrorDrift(window=3, margin=0.1)
        a = flags(novelty, stream(60, 20, seed=seed, high=0.35))
        b = flags(rolling, stream(60, 20, seed=seed, high=0.35))
        assert True in a and True in b
        assert a.index(True) <= b.index(True)
        assert a.index(True) == 20


def test_novelty_or_error_fires_on_either() -> None:
    for seed in range(3):
        # New classes: the batch they arrive, before the error could rise over its window.
        assert flags(NoveltyOrErrorDrift(num_classes=NUM_CLASSES), stream(60, 20, seed=seed)).index(True) == 20
        # A rise in error over the known classes only: as the paper's rolling mean, no later.
        rise = [(err, labels[labels < 8]) for err, labels in stream(60, 20, seed=seed)]
        combined = flags(NoveltyOrErrorDrift(num_classes=NUM_CLASSES), iter(rise))
        rolling = flags(RollingErrorDrift(window=3, margin=0.1), iter(rise))
        assert combined == rolling and True in combined
        det = NoveltyOrErrorDrift(num_classes=NUM_CLASSES)
        flags(det, iter(rise[: rolling.index(True) + 1]))
        assert det.drift_detected and det.novel_classes == ()


def test_default_detector_is_novelty_or_error() -> None:
    from agent.config import LearnerConfig

    assert isinstance(LearnerConfig().drift, NoveltyOrErrorConfig)


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, cls",
    [
        ({"type": "rolling_error", "window": 3}, RollingErrorDrift),
        ({"type": "page_hinkley", "threshold": 2.0}, PageHinkleyDrift),
        ({"type": "adwin", "delta": 0.01}, AdwinDrift),
        ({"type": "novelty", "min_count": 3}, NoveltyTrigger),
        ({"type": "novelty_or_error", "window": 5, "min_count": 3}, NoveltyOrErrorDrift),
    ],
)
def test_build_detector_from_dict(data: dict[str, object], cls: type[DriftDetector]) -> None:
    det = build_detector(data, num_classes=NUM_CLASSES)
    assert type(det) is cls and det.num_classes == NUM_CLASSES


def test_build_detector_from_model_keeps_values() -> None:
    det = build_detector(RollingErrorConfig(window=5, threshold=0.4), num_classes=3)
    assert isinstance(det, RollingErrorDrift)
    assert (det.window, det.threshold) == (5, 0.4)


@pytest.mark.parametrize(
    "data",
    [
        {"type": "rolling_error", "window": 3, "windw": 4},  # unknown field
        {"type": "unknown"},
        {"window": 3},  # no type
        {"type": "rolling_error", "window": 0},
        {"type": "rolling_error", "margin": 1.0},
        {"type": "rolling_error", "threshold": 0.0},
        {"type": "page_hinkley", "alpha": 1.5},
        {"type": "adwin", "clock": 0},
        {"type": "novelty", "max_longrun_share": 0.1, "min_batch_share": 0.05},  # cross-field
        {"type": "novelty_or_error", "max_longrun_share": 0.1, "min_batch_share": 0.05},
        {"type": "novelty_or_error", "window": 0},
    ],
)
def test_config_rejects(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        build_detector(data, num_classes=NUM_CLASSES)


def test_constructors_validate_like_configs() -> None:
    with pytest.raises(ValueError):
        RollingErrorDrift(window=0)
    with pytest.raises(ValueError):
        NoveltyTrigger(num_classes=0)
    with pytest.raises(ValueError):
        AdwinDrift(delta=2.0)


@pytest.mark.parametrize(
    "cls, cfg",
    [
        (RollingErrorDrift, RollingErrorConfig),
        (PageHinkleyDrift, PageHinkleyConfig),
        (AdwinDrift, AdwinConfig),
        (NoveltyTrigger, NoveltyConfig),
        (NoveltyOrErrorDrift, NoveltyOrErrorConfig),
    ],
)
def test_constructor_defaults_match_config(cls: type[DriftDetector], cfg: type) -> None:
    params = inspect.signature(cls).parameters
    for field, info in cfg.model_fields.items():
        if field != "type":
            assert params[field].default == info.default, field
            assert info.description


# --- classes_to_request --------------------------------------------------------------------------


def test_request_new_class() -> None:
    assert classes_to_request(np.array([100, 100, 100, 0]), np.array([20, 20, 20, 15])) == [3]


def test_request_sharply_risen_class_but_not_a_mild_rise() -> None:
    longrun = np.array([490, 490, 20.0])  # class 2 at 2 %
    assert classes_to_request(longrun, np.array([40, 40, 20])) == [2]  # 20 % >= 3 x 2 %
    assert classes_to_request(longrun, np.array([48, 48, 4]), min_recent_count=1) == []  # 4 %


def test_request_needs_enough_recent_samples() -> None:
    longrun = np.array([100, 100, 0])
    assert classes_to_request(longrun, np.array([20, 20, 4])) == []
    assert classes_to_request(longrun, np.array([20, 20, 4]), min_recent_count=4) == [2]


def test_request_high_error_classes() -> None:
    longrun = np.array([100, 100, 100, 100])
    recent = np.array([25, 25, 25, 3])
    err = np.array([0.1, 0.6, np.nan, 0.9])  # class 3 has too few samples to trust its error
    assert classes_to_request(longrun, recent, err) == [1]
    assert classes_to_request(longrun, recent, err, error_threshold=0.05) == [0, 1]


def test_request_is_sorted_and_accepts_floats() -> None:
    longrun = np.zeros(5)
    recent = np.array([0.0, 10.0, 0.0, 10.0, 10.0])
    assert classes_to_request(longrun, recent) == [1, 3, 4]


@pytest.mark.parametrize(
    "longrun, recent, err",
    [
        (np.ones(3), np.ones(4), None),
        (np.ones(3), -np.ones(3), None),
        (np.ones((3, 1)), np.ones(3), None),
        (np.ones(3), np.array([1.0, np.inf, 1.0]), None),
        (np.ones(3), np.ones(3), np.array([0.1, 1.5, 0.0])),
        (np.ones(3), np.ones(3), np.array([0.1, 0.5])),
    ],
)
def test_request_bad_input(longrun: np.ndarray, recent: np.ndarray, err: np.ndarray | None) -> None:
    with pytest.raises(ValueError):
        classes_to_request(longrun, recent, err)
