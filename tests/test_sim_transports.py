"""One scenario, two transports: the same record type, the same report, and where nothing travels
between nodes (isolated learning from one base model) the same errors; what a transport cannot
run is refused by name."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from edge_sim.cli_sim import main as sim_main
from edge_sim.inputs import load_dataset, prepare_seed
from edge_sim.records import ModeRun, NodeRecord
from edge_sim.report import write_report
from edge_sim.runner import open_transport
from edge_sim.scenario import Scenario
from support import requires_mosquitto

TINY = Scenario(
    name="tiny", nodes=3, batch_size=100, batches=24, drift_at=12, pretrain_samples=500, pretrain_epochs=1,
    post_drift_batches=12, seeds=[0], modes=["isolated", "clue_class_aware", "fedavg"], fedavg={"every": 4, "per_round": 2},
)


def _keys(value):
    """The shape of a JSON value: its dict keys, recursively (list items merged)."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list):
        merged = {}
        for item in value:
            shape = _keys(item)
            if isinstance(shape, dict):
                merged.update(shape)
        return [merged] if merged else []
    return None


def _on_both_transports(scenario: Scenario, tmp_path_factory) -> dict[str, list[ModeRun]]:
    """Every mode of ``scenario`` on each transport, from one seed's inputs (one base model for both)."""
    inputs = prepare_seed(scenario, 0, load_dataset(scenario.dataset))
    out = {}
    for transport in ("inprocess", "mqtt"):
        scn = scenario.model_copy(update={"transport": transport})
        with open_transport(scn, workdir=tmp_path_factory.mktemp(transport)) as running:
            assert running.name == transport
            out[transport] = [running.run_mode(scn, mode, inputs) for mode in scn.modes]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every mode of TINY on each transport."""
    return _on_both_transports(TINY, tmp_path_factory)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
@requires_mosquitto
def test_both_transports_fill_the_same_records_and_report(runs, tmp_path):
    for transport, mode_runs in runs.items():
        assert [r.mode for r in mode_runs] == TINY.modes
        for run in mode_runs:
            assert isinstance(run, ModeRun) and run.complete and len(run.nodes) == TINY.nodes
            assert all(isinstance(n, NodeRecord) and len(n.served_error) == TINY.batches for n in run.nodes.values())
        clue, fed = mode_runs[1], mode_runs[2]
        assert any(e["kind"] == "helper_installed" for e in clue.target.events), transport
        assert clue.target.stats["kt_in"] > 0 and all(n.stats["fl_in"] > 0 for n in fed.nodes.values()), transport
    assert [list(r.nodes) for r in runs["inprocess"]] == [list(r.nodes) for r in runs["mqtt"]]
    results = {}
    for transport, mode_runs in runs.items():
        scn = TINY.model_copy(update={"transport": transport})
        write_report(scn, mode_runs, tmp_path / transport)
        results[transport] = json.loads((tmp_path / transport / "results.json").read_text())
        assert not results[transport]["partial"] and (tmp_path / transport / "error-vs-batch.png").exists()
    shape = _keys(results["inprocess"]["summary"])
    assert shape == _keys(results["mqtt"]["summary"])
    inprocess_md, mqtt_md = ((tmp_path / t / "report.md").read_text() for t in ("inprocess", "mqtt"))
    for heading in ("| mode | excess error after the drift ÷ isolated | adaptability (batches to FedAvg's mean error) |", "| mode | pre-drift error |", "| mode | metadata_out |"):
        assert heading in inprocess_md and heading in mqtt_md
    assert "in one process" in inprocess_md and "over Mosquitto" in mqtt_md


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
@requires_mosquitto
def test_isolated_learning_gives_the_same_errors_on_both_transports(runs):
    """No knowledge moves in isolated mode: the same learner on the same batches from the same base
    must err the same whether it runs here or in a clue-agent (up to float32 vs float64 rounding
    of the error itself)."""
    here, there = runs["inprocess"][0], runs["mqtt"][0]
    assert here.mode == there.mode == "isolated"
    for node in here.nodes:
        np.testing.assert_allclose(here.nodes[node].served_error, there.nodes[node].served_error, atol=1e-6)


def test_the_inprocess_transport_refuses_what_needs_the_mds_or_a_daemon(tmp_path):
    with pytest.raises(ValidationError, match=r"\['clue_pool'\] cannot run on the inprocess transport"):
        Scenario(name="x", transport="inprocess", modes=["isolated", "clue_pool"])
    with pytest.raises(ValidationError, match="pacing and \\[daemon\\] are for the mqtt transport"):
        Scenario(name="x", transport="inprocess", daemon={"kt_mode": "relay"})
    scn = tmp_path / "pool.toml"
    scn.write_text('name = "pool"\nmodes = ["isolated", "clue_pool"]\n')
    assert sim_main(["run", str(scn), "--transport", "inprocess"]) == 78
    scn.write_text('name = "plain"\n')
    assert sim_main(["run", str(scn), "--transport", "inprocess", "--broker", "mqtt://127.0.0.1:1"]) == 78


def test_learner_knobs_set_on_the_command_line_reach_every_mode(tmp_path):
    scn = tmp_path / "small.toml"
    scn.write_text(
        'name = "small"\ntransport = "inprocess"\nnodes = 3\nbatch_size = 100\nbatches = 24\ndrift_at = 12\n'
        'pretrain_samples = 500\npretrain_epochs = 1\npost_drift_batches = 12\nmodes = ["isolated", "clue_class_aware"]\n'
        '[learner]\nz = 0.3\n'
    )
    out = tmp_path / "out"
    assert sim_main(["run", str(scn), "--out", str(out), "--set", "value_codec=int4_delta", "--set", "drift.window=4"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["scenario"]["learner"] == {"z": 0.3, "value_codec": "int4_delta", "drift": {"type": "novelty_or_error", "window": 4}}
    assert sim_main(["run", str(scn), "--set", "z=7"]) == 78
    assert sim_main(["run", str(scn), "--set", "z"]) == 78


# Half of 100 samples labelled: the novelty trigger's 1,000-label warm-up would outlast the run.
LATE = TINY.model_copy(update={"name": "late", "label_delay": 2, "label_fraction": 0.5, "modes": ["isolated", "clue", "fedavg"],
                               "learner": {"drift": {"type": "novelty_or_error", "warmup_samples": 300}}})


@pytest.fixture(scope="module")
def late_runs(tmp_path_factory):
    """LATE's modes on each transport, by mode: every node's labels two batches late, for half the samples."""
    return {transport: {run.mode: run for run in runs} for transport, runs in _on_both_transports(LATE, tmp_path_factory).items()}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
@requires_mosquitto
def test_late_partial_labels_learn_the_same_on_both_transports_and_still_transfer(late_runs):
    """The labels topic and the served-batch store give what the in-process learner gives: the same
    isolated errors batch by batch; CLUE still detects the drift on late labels and installs a
    helper; FedAvg still runs its rounds once labels come."""
    here, there = late_runs["inprocess"], late_runs["mqtt"]
    for node in here["isolated"].nodes:
        np.testing.assert_allclose(here["isolated"].nodes[node].served_error, there["isolated"].nodes[node].served_error, atol=1e-6)
    for runs in (here, there):
        target = runs["clue"].target
        drift = [e for e in target.events if e["kind"] == "drift"]
        assert drift and min(e["batch"] for e in drift) >= LATE.drift_at + LATE.label_delay - 1, drift
        assert any(e["kind"] == "helper_installed" for e in target.events)
        assert all(n.stats["fl_in"] > 0 for n in runs["fedavg"].nodes.values())
    iso = np.array(there["isolated"].target.served_error)
    assert np.nanmean(iso[: LATE.label_delay]) > np.nanmean(iso[-6:]), "the target learnt from the late labels"
