"""clue-sim end to end: a small scenario with real daemons over a real mosquitto, run twice."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge_sim.cli_sim import main as sim_main
from edge_sim.scenario import Scenario, load_scenario, shipped_scenarios
from edge_sim.transports.mqtt import Fleet
from support import requires_openssl, session_left, wait_until

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


def test_generality_scenarios_load_and_vary_data_and_classes():
    paths = sorted((shipped_scenarios()[0].parent / "generality").glob("*.toml"))
    scenarios = [load_scenario(p) for p in paths]
    assert {s.dataset for s in scenarios} >= {"fashion_mnist", "mnist_5k"}
    arrivals = {s.new_classes_for(seed, 10) for s in scenarios for seed in s.seeds}
    assert len(arrivals) >= 3 and all("clue" in s.modes for s in scenarios)


def test_bad_scenarios_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nmodes = ["clue_mean"]\n')
    assert sim_main(["run", str(bad)]) == 78
    bad.write_text('name = "bad"\nfrobnicate = 1\n')
    assert sim_main(["run", str(bad)]) == 78
    assert sim_main(["run", "no-such-scenario"]) == 78
    with pytest.raises(ValidationError, match="drift_at"):
        Scenario.model_validate({"name": "x", "drift_at": 200, "batches": 100})


@pytest.mark.timeout(300)
@requires_openssl
def test_feed_over_tls_to_any_number_of_agents(tmp_path):
    """`clue-sim base` then `clue-sim feed` against agents started separately, as docs/operations.md
    runs a fleet by hand: over TLS through the fleet ACL as its feeder and collector identities, to
    two agents where the scenario names three."""
    from broker import certs as certs_mod
    from broker.mosquitto import private
    from edge_sim.processes import spawn_agent, spawn_mds

    base = tmp_path / "base.npz"
    small = tmp_path / "feed.toml"
    small.write_text(SMALL.read_text().replace('name = "sim_small"', 'name = "feed_small"').replace("batches = 50", "batches = 38"))
    assert load_scenario(small).nodes == 3
    assert sim_main(["base", "--scenario", str(small), "--out", str(base)]) == 0
    ids = ["ext-0", "ext-1"]
    directory = tempfile.mkdtemp(prefix="clue-feed-certs-")  # 0755: mosquitto reads the server key
    try:
        certs = certs_mod.generate(directory, nodes=ids, roles=["mds", "feeder", "collector"])

        def tls(identity: str) -> dict[str, str]:
            return {k: str(v) for k, v in certs.client_kwargs(identity).items()}

        with private("secure.conf", certs=certs, topology="direct") as broker:
            mds = [f"--{k.replace('_', '-')}={v}" for k, v in tls("mds").items()]
            children = [spawn_mds(broker.url, tmp_path / "mds.db", tmp_path / "logs", extra_args=mds)]
            children += [
                spawn_agent(n, broker.url, tmp_path / "state", tmp_path / "logs",
                            settings={"base_weights": str(base), "daemon": {"meta_interval": 0.0}, **tls(n)})
                for n in ids
            ]
            try:
                out = tmp_path / "report"
                feed = ["feed", "--broker", broker.url, "--scenario", str(small), "--nodes", ",".join(ids), "--out", str(out),
                        "--tls-ca", str(certs.ca), "--tls-cert", str(certs.cert("feeder")), "--tls-key", str(certs.key("feeder")),
                        "--collector-tls-cert", str(certs.cert("collector")), "--collector-tls-key", str(certs.key("collector"))]
                assert sim_main(feed) == 0
                res = json.loads((out / "results.json").read_text())
                assert set(res["runs"][0]["nodes"]) == set(ids)
                target = res["runs"][0]["nodes"]["ext-0"]
                assert len(target["served_error"]) == 38 and not np.isnan(target["served_error"]).any()
                assert any(e["kind"] == "helper_installed" for e in target["events"])
            finally:
                for child in children:
                    child.terminate(20)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_feed_refuses_a_node_list_no_scenario_can_take(tmp_path):
    assert sim_main(["feed", "--broker", "mqtt://127.0.0.1:1", "--scenario", str(SMALL), "--nodes", "only-one", "--out", str(tmp_path)]) == 78


@pytest.mark.timeout(60)
def test_the_simulators_client_leaves_no_session_behind(fresh_mosquitto, tmp_path):
    """A one-shot client's session would queue every prediction and event of the fleet after the
    run, each one more save of a broker database saved on every change."""
    fleet = Fleet(tmp_path, fresh_mosquitto.url, start_mds=False)
    client_id = fleet.client.client_id
    fleet.close()
    # The session outlives the client by its 1 s expiry; Mosquitto checks expiries each second.
    expired = f"Expiring client {client_id} due to timeout"
    wait_until(lambda: expired in fresh_mosquitto.log_text(), 10, what=f"the broker to expire {client_id}'s session", interval=0.1)
    assert not session_left(fresh_mosquitto, client_id)


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
