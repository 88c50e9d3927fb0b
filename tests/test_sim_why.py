"""``clue-sim why``: the fleet frozen at the target's drift, each helper's knowledge of the new classes."""

from __future__ import annotations

import json

import pytest

from edge_sim.cli_sim import main as sim_main
from edge_sim.inputs import load_dataset, prepare_seed
from edge_sim.scenario import Scenario
from edge_sim.why import diagnose

SMALL = dict(nodes=3, batch_size=100, batches=40, drift_at=20, pretrain_samples=500, pretrain_epochs=2, seeds=[0])


def _diagnosis(**variant):
    scn = Scenario(name="small", **SMALL, **variant)
    found = diagnose(scn, prepare_seed(scn, 0, load_dataset(scn.dataset)), eval_batches=5)
    assert found is not None, "the target never reported a drift"
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_helpers_that_learnt_the_new_classes_give_boosted_helpers_that_know_them():
    found = _diagnosis(helpers="overlapping")
    # The novelty trigger fires the batch the new classes arrive, and asks for exactly those.
    assert found.drift_batch == SMALL["drift_at"] and found.classes == (8, 9)
    assert found.target_new_error == 1.0, "the target never saw classes 8-9: it cannot name them"
    for helper in found.helpers:
        assert helper.labelled_batches == SMALL["drift_at"] + 1
        assert helper.own_new_error < 0.5 and helper.boosted_new_error < 0.6 and helper.refused is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_helpers_that_learnt_from_few_batches_know_nothing_of_the_new_classes():
    found = _diagnosis(helpers="overlapping", helper_label_fraction=0.1)
    for helper in found.helpers:
        assert helper.labelled_batches <= 8
        assert helper.own_new_error > 0.9 and helper.refused is not None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_prints_and_writes_the_table(tmp_path, capsys):
    scn = tmp_path / "small.toml"
    scn.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {"name": "small", **SMALL}.items()) + "\n")
    assert sim_main(["why", str(scn), "--eval-batches", "3", "--json", str(tmp_path / "why.json")]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 20 | 8, 9 | target |" in out and out.count("passes") == SMALL["nodes"] - 1
    saved = json.loads((tmp_path / "why.json").read_text())
    assert [h["node"] for h in saved[0]["helpers"]] == [1, 2]
