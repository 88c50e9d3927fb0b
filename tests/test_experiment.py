"""The introduction workload on real Fashion-MNIST with the MLP, on the in-process transport: CLUE
must beat its controls.

Small and seeded (3 nodes, 70 batches, one seed) so it runs in well under a minute; the full
in-process experiment is ``clue-sim run fig2_overlapping --transport inprocess`` (and
``fig2_non_overlapping``) with more seeds and modes.
"""

import numpy as np
import pytest

from edge_sim.cli_sim import main as sim_main
from edge_sim.inputs import load_dataset, prepare_seed
from edge_sim.report import adaptability, summarise
from edge_sim.runner import open_transport
from edge_sim.scenario import Scenario
from edge_sim.workloads import BatchStream, ClassMix, introduction_workload


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion_mnist")


def _run(data, helpers, modes):
    """Per mode, the summary row of its one run, and the target's record."""
    scn = Scenario(
        name=f"small_{helpers}", transport="inprocess", nodes=3, batches=70, drift_at=40, helpers=helpers,
        post_drift_batches=30, modes=list(modes),
    )
    with open_transport(scn) as transport:
        inputs = prepare_seed(scn, 0, data)
        runs = [transport.run_mode(scn, mode, inputs) for mode in scn.modes]
    summary = summarise(scn, runs)["modes"]
    return {r.mode: (summary[r.mode]["runs"][0], r.target) for r in runs}


def _installs(target):
    return [e for e in target.events if e["kind"] == "helper_installed"]


@pytest.mark.slow
def test_clue_adapts_faster_than_isolated_and_random_mask(data):
    runs = _run(data, "overlapping", ("isolated", "clue_mean", "random_mask"))
    (clue, clue_target), (isolated, isolated_target), (random, random_target) = runs["clue_mean"], runs["isolated"], runs["random_mask"]
    assert _installs(clue_target) and _installs(random_target) and not _installs(isolated_target)
    assert _installs(clue_target)[0]["classes"] == [8, 9]
    assert clue["adaptability_pre_drift"] < isolated["adaptability_pre_drift"]
    assert clue["adaptability_pre_drift"] < random["adaptability_pre_drift"]
    assert clue["post_drift_error"] < isolated["post_drift_error"] - 0.05
    assert random["post_drift_error"] > clue["post_drift_error"]


@pytest.mark.slow
def test_class_aware_protects_classes_the_helper_never_saw(data):
    runs = _run(data, "non_overlapping", ("isolated", "clue_mean", "clue_class_aware"))
    iso, mean, aware = (runs[m][0] for m in ("isolated", "clue_mean", "clue_class_aware"))
    assert aware["unseen_class_error"] <= iso["unseen_class_error"] + 0.06
    assert mean["unseen_class_error"] > iso["unseen_class_error"] + 0.2
    assert aware["new_class_error"] < iso["new_class_error"]


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
def test_cli_runs_a_scenario_in_process_and_writes_report(tmp_path, capsys):
    scn = tmp_path / "small.toml"
    scn.write_text('name = "small"\nnodes = 2\nbatches = 45\ndrift_at = 40\npost_drift_batches = 5\nmodes = ["isolated", "clue_class_aware"]\n[fedavg]\nper_round = 2\n')
    out = tmp_path / "report"
    assert sim_main(["run", str(scn), "--transport", "inprocess", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| clue_class_aware |" in text and "in one process" in text
    assert "isolated ÷ mode" in capsys.readouterr().out
