"""The shipped default (the simulator's ``clue`` mode: the agent's own defaults) never serves worse
than learning alone after a drift, even with helpers that never saw some of the target's classes
or that learnt from only half of their batches (issue 9/13)."""

from __future__ import annotations

import pytest

from edge_sim.report import summarise
from edge_sim.runner import run_scenario
from edge_sim.scenario import Scenario

SMALL = dict(
    nodes=3, batch_size=100, batches=45, drift_at=20, pretrain_samples=500, pretrain_epochs=2,
    post_drift_batches=20, seeds=[0], modes=["isolated", "clue"], transport="inprocess",
)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "variant",
    [{"helpers": "non_overlapping"}, {"helpers": "overlapping", "helper_label_fraction": 0.5}],
    ids=["non_overlapping", "weak_helper"],
)
def test_the_default_is_never_worse_than_isolated(variant):
    scn = Scenario(name="small", **SMALL, **variant)
    runs = run_scenario(scn)
    modes = summarise(scn, runs)["modes"]
    clue, isolated = modes["clue"]["runs"][0], modes["isolated"]["runs"][0]
    assert clue["kt_transfers"] >= 1, "the drift asked for no help: the test would prove nothing"
    assert clue["excess_error"] <= isolated["excess_error"]
    assert clue["post_drift_error"] <= isolated["post_drift_error"]
