"""The introduction workload on real Fashion-MNIST with the MLP: CLUE must beat its controls.

Small and seeded (3 nodes, 60 batches, one seed) so it runs in well under a minute; the full
experiment is ``clue-experiment``.
"""

import math

import numpy as np
import pytest

from edge_sim.cli import main as experiment_main
from edge_sim.experiment import ExperimentSettings, adaptability, load_data, run_mode
from edge_sim.workloads import BatchStream, ClassMix, introduction_workload


@pytest.fixture(scope="module")
def data():
    return load_data("mlp4")


def _settings(helpers):
    return ExperimentSettings(nodes=3, batches=70, drift_at=40, helpers=helpers, post_drift_batches=30)


@pytest.mark.slow
def test_clue_adapts_faster_than_isolated_and_random_mask(data):
    cache = {}
    runs = {m: run_mode(_settings("overlapping"), m, 0, data, cache) for m in ("isolated", "clue_mean", "random_mask")}
    clue, isolated, random = runs["clue_mean"], runs["isolated"], runs["random_mask"]
    assert clue.kt_events and random.kt_events and not isolated.kt_events
    assert clue.kt_events[0]["classes"] == [8, 9]
    assert clue.adaptability < isolated.adaptability
    assert clue.adaptability < random.adaptability
    assert clue.post_drift_error < isolated.post_drift_error - 0.05
    assert random.post_drift_error > clue.post_drift_error


@pytest.mark.slow
def test_class_aware_protects_classes_the_helper_never_saw(data):
    cache = {}
    runs = {m: run_mode(_settings("non_overlapping"), m, 0, data, cache) for m in ("isolated", "clue_mean", "clue_class_aware")}
    iso, mean, aware = runs["isolated"].unseen_class_error, runs["clue_mean"].unseen_class_error, runs["clue_class_aware"].unseen_class_error
    assert aware <= iso + 0.06
    assert mean > iso + 0.2
    assert runs["clue_class_aware"].new_class_error < runs["isolated"].new_class_error


def test_adaptability_definition():
    errors = [0.2] * 10 + [0.5, 0.5, 0.3, 0.21, 0.2, 0.2]
    assert adaptability(errors, 10, window=3, tolerance=0.02, pre_drift=0.2) == (6, True)
    assert adaptability(errors[:13], 10, window=3, tolerance=0.02, pre_drift=0.2) == (3, False)
    assert adaptability(errors, 10, window=1, tolerance=0.02, pre_drift=0.2) == (4, True)


def test_introduction_and_fluctuation_schedules():
    wl = introduction_workload(helpers="non_overlapping", drift_at=5)
    assert wl.mix(0, 4) == ClassMix(tuple(range(8)))
    assert wl.mix(0, 5).extra == (8, 9)
    assert wl.mix(1, 0).base == tuple(range(4, 10))
    fl = introduction_workload(kind="fluctuation", drift_at=5)
    present = [fl.new_classes_present(b) for b in range(5, 45)]
    assert present[:10] == [True] * 10 and present[10:20] == [False] * 10 and present[20:30] == [True] * 10


def test_batch_stream_draws_the_mix():
    y = np.repeat(np.arange(10), 50)
    x = np.arange(500, dtype=np.float32)[:, None]
    stream = BatchStream(x, y, seed=0, indices=np.arange(500))
    bx, by = stream.batch(ClassMix((0, 1), (9,), 0.5), 200)
    assert len(by) == 200 and set(by.tolist()) <= {0, 1, 9}
    assert abs((by == 9).mean() - 0.5) < 0.15
    assert np.array_equal(y[bx[:, 0].astype(int)], by)


@pytest.mark.slow
def test_cli_writes_report(tmp_path, capsys):
    out = tmp_path / "exp"
    code = experiment_main(
        ["--seeds", "1", "--modes", "isolated,clue_class_aware", "--helpers", "overlapping", "--nodes", "2",
         "--batches", "45", "--drift-at", "40", "--out", str(out)]
    )
    assert code == 0
    text = (out / "report.md").read_text()
    assert "| clue_class_aware |" in text and "bytes per transferred parameter" in text
    printed = capsys.readouterr().out
    assert "isolated ÷ mode" in printed
    assert not math.isnan(float(printed.split("| int8 | ")[1].split(" ")[0]))
