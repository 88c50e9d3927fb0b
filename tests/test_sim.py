"""clue-sim end to end: a small scenario with real daemons over a real mosquitto, run twice."""

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sim.cli_sim import main as sim_main
from edge_sim.scenario import Scenario, load_scenario, shipped_scenarios

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = Path(__file__).parent / "fixtures" / "sim_small.toml"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"sim{i}")
        assert sim_main(["run", str(SMALL), "--out", str(out)]) == 0
        outs.append(json.loads((out / "results.json").read_text()))
    return outs


@pytest.mark.timeout(600)
def test_report_structure_and_clue_beats_isolated(two_runs, tmp_path):
    res = two_runs[0]
    assert not res["partial"]
    modes = res["summary"]["modes"]
    assert set(modes) == {"isolated", "fedavg", "clue_class_aware"}
    assert res["summary"]["fedavg_mean_error"]
    clue, iso = modes["clue_class_aware"], modes["isolated"]
    assert clue["adaptability_fedavg"][0] < iso["adaptability_fedavg"][0]
    assert clue["post_drift_error"][0] < iso["post_drift_error"][0]
    run = next(r for r in res["runs"] if r["mode"] == "clue_class_aware")
    target = next(iter(run["nodes"].values()))
    assert len(target["served_error"]) == 50 and target["stats"]["kt_in"] > 0
    assert any(e["kind"] == "helper_installed" for e in target["events"])
    fed = next(r for r in res["runs"] if r["mode"] == "fedavg")
    assert all(n["stats"]["fl_in"] > 0 for n in fed["nodes"].values())
    # FedAvg moves whole models; CLUE a fraction of one, once.
    assert clue["transfer_ratio_fedavg_over_mode_system"][0] > 10


@pytest.mark.timeout(600)
def test_same_seed_gives_identical_numbers(two_runs):
    a, b = two_runs
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["mode"] == rb["mode"]
        for node in ra["nodes"]:
            assert ra["nodes"][node]["served_error"] == rb["nodes"][node]["served_error"], (ra["mode"], node)
            for key in ("kt_in", "kt_out", "fl_in", "fl_out"):
                assert ra["nodes"][node]["stats"].get(key) == rb["nodes"][node]["stats"].get(key), (ra["mode"], node, key)


def test_every_shipped_scenario_loads():
    paths = shipped_scenarios()
    assert any(p.stem == "default" for p in paths)
    for path in paths:
        scn = load_scenario(path)
        assert scn.paper, f"{path.name} names no paper result"


def test_bad_scenarios_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nmodes = ["clue_mean"]\n')
    assert sim_main(["run", str(bad)]) == 78
    bad.write_text('name = "bad"\nfrobnicate = 1\n')
    assert sim_main(["run", str(bad)]) == 78
    assert sim_main(["run", "no-such-scenario"]) == 78
    with pytest.raises(Exception):
        Scenario.model_validate({"name": "x", "drift_at": 200, "batches": 100})


@pytest.mark.timeout(300)
def test_feed_external_agents_like_the_compose_fleet(tmp_path, mosquitto):
    """`clue-sim base` then `clue-sim feed` against agents started separately (as compose does)."""
    from edge_sim.processes import spawn_agent, spawn_mds

    base = tmp_path / "base.npz"
    small = tmp_path / "feed.toml"
    small.write_text(SMALL.read_text().replace('name = "sim_small"', 'name = "feed_small"').replace("batches = 50", "batches = 38"))
    assert sim_main(["base", "--scenario", str(small), "--out", str(base)]) == 0
    url = mosquitto.url
    ids = [f"ext-{i}" for i in range(3)]
    children = [spawn_mds(url, tmp_path / "mds.db", tmp_path / "logs")]
    children += [
        spawn_agent(n, url, tmp_path / "state", tmp_path / "logs", settings={"base_weights": str(base), "daemon": {"meta_interval": 0.0}})
        for n in ids
    ]
    try:
        out = tmp_path / "report"
        assert sim_main(["feed", "--broker", url, "--scenario", str(small), "--nodes", ",".join(ids), "--out", str(out)]) == 0
        res = json.loads((out / "results.json").read_text())
        target = res["runs"][0]["nodes"]["ext-0"]
        assert len(target["served_error"]) == 38 and not np.isnan(target["served_error"]).any()
        assert any(e["kind"] == "helper_installed" for e in target["events"])
    finally:
        for child in children:
            child.terminate(20)


def test_all_resume_keeps_only_complete_results_of_the_same_scenario(tmp_path):
    from edge_sim.cli_sim import _finished

    scn = load_scenario(SMALL)
    out = tmp_path / scn.name
    out.mkdir()
    assert _finished(out, scn) is None
    saved = {"scenario": scn.model_dump(), "summary": {"modes": {}}, "partial": False}
    (out / "results.json").write_text(json.dumps(saved))
    assert _finished(out, scn) == {"modes": {}}
    changed = Scenario.model_validate({**scn.model_dump(), "seeds": [5]})
    assert _finished(out, changed) is None
    (out / "results.json").write_text(json.dumps({**saved, "partial": True}))
    assert _finished(out, scn) is None
    (out / "results.json").write_text("{not json")
    assert _finished(out, scn) is None
