"""Why a scenario shows no gain: what each helper knows of the new classes when the target asks.

``clue-sim why NAME`` plays a scenario's workload to its learners on the agent's defaults (the
``clue`` mode), in this process, until the target reports a drift. There it freezes the fleet and,
for every other node, measures on the target's next ``eval_batches`` request batches (which no
node has learnt from yet):

- the node's *own* model: its error on the classes the target asks for (what the helper knows);
- the *boosted helper* that node's KT blob would give (the target with the node's significant
  parameters written over it): its error on the new classes and on the target's other classes;
- whether the target's install-time check (no worse than chance on the new classes, on the last
  labelled batch) would refuse that blob.

The target's own errors on the same batches are the reference. A helper whose own model is no
better than the target's on the new classes has nothing to give; a boosted helper far worse than
its source says the significant parameters alone do not carry what the source knows.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.config import LearnerConfig
from agent.errors import KtRejected
from agent.kt import booster
from edge_sim.inputs import RequestFeed, SeedInputs, node_learner, prepare_seed, scenario_data
from edge_sim.modes import learner_values
from edge_sim.scenario import Scenario


@dataclass(frozen=True)
class HelperKnowledge:
    """What one candidate helper holds for the target's request, measured at the drift."""

    node: int
    labelled_batches: int
    own_new_error: float
    boosted_new_error: float
    boosted_old_error: float
    refused: str | None


@dataclass(frozen=True)
class Diagnosis:
    """One seed's snapshot at the target's drift report."""

    seed: int
    drift_batch: int
    classes: tuple[int, ...]
    target_new_error: float
    target_old_error: float
    helpers: tuple[HelperKnowledge, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, new: torch.Tensor) -> tuple[float, float]:
    """Error on the samples of the ``new`` classes and on the rest."""
    model.eval()
    with torch.no_grad():
        wrong = model(x).argmax(dim=1) != y
    is_new = torch.isin(y, new)
    new_err = float(wrong[is_new].float().mean()) if bool(is_new.any()) else float("nan")
    old_err = float(wrong[~is_new].float().mean()) if bool((~is_new).any()) else float("nan")
    return new_err, old_err


def diagnose(scn: Scenario, inputs: SeedInputs, *, eval_batches: int = 10) -> Diagnosis | None:
    """The fleet at the target's first drift report (None: it never reports one)."""
    config = LearnerConfig.model_validate(learner_values(scn.learner, "clue"))
    learners = [node_learner(scn, config, inputs, inputs.seed * 100 + i) for i in range(scn.nodes)]
    feed = RequestFeed(scn, inputs.seed, inputs.data, inputs.rest)
    labelled = [0] * scn.nodes
    report = None
    for t in range(scn.batches - eval_batches):
        for i, request in enumerate(feed.batch(t)):
            y = torch.from_numpy(request.y) if request.labelled else None
            result = learners[i].process_batch(torch.from_numpy(request.x), y)
            labelled[i] += int(request.labelled)
            if i == 0 and result.drift_report is not None:
                report = result.drift_report
        if report is not None:
            break
    if report is None or not report.classes:
        return None
    later = [feed.batch(t + 1 + k)[0] for k in range(eval_batches)]
    x = torch.from_numpy(np.concatenate([r.x for r in later]))
    y = torch.from_numpy(np.concatenate([r.y for r in later]))
    new = torch.as_tensor(report.classes)
    target = learners[0]
    t_new, t_old = _errors(target.model, x, y, new)
    helpers = []
    for i in range(1, scn.nodes):
        blob = learners[i].kt_blob(report.classes, config.z, config.value_codec)
        boosted = booster.boosted_helper(target.model, target.decode_blob(blob))
        refused = None
        try:
            # The install path itself, on a copy: the fleet stays as it was at the drift.
            copy.deepcopy(target).accept_kt_blob(blob, classes=report.classes, z=config.z)
        except KtRejected as exc:
            refused = str(exc)
        own_new, _ = _errors(learners[i].model, x, y, new)
        b_new, b_old = _errors(boosted, x, y, new)
        helpers.append(HelperKnowledge(i, labelled[i], own_new, b_new, b_old, refused))
    return Diagnosis(inputs.seed, report.batch_index, tuple(report.classes), t_new, t_old, tuple(helpers))


def diagnose_scenario(scn: Scenario, *, eval_batches: int = 10) -> list[Diagnosis]:
    """:func:`diagnose` for every seed of ``scn``, one torch thread (as the simulator's agents)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = scenario_data(scn)
        out = []
        for seed in scn.seeds:
            found = diagnose(scn, prepare_seed(scn, seed, data), eval_batches=eval_batches)
            if found is not None:
                out.append(found)
        return out
    finally:
        torch.set_num_threads(threads)


def diagnosis_table(diagnoses: list[Diagnosis]) -> str:
    """Markdown: one row per seed and candidate helper, the target's own row first."""
    lines = [
        "| seed | drift batch | classes asked | node | labelled batches | own error, new classes | boosted helper: new classes | boosted helper: other classes | install check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in diagnoses:
        classes = ", ".join(map(str, d.classes))
        lines.append(f"| {d.seed} | {d.drift_batch} | {classes} | target | {d.drift_batch + 1} | {d.target_new_error:.3f} | — | {d.target_old_error:.3f} (target) | — |")
        for h in d.helpers:
            check = "refused" if h.refused else "passes"
            lines.append(
                f"| {d.seed} | {d.drift_batch} | {classes} | {h.node} | {h.labelled_batches} | {h.own_new_error:.3f} "
                f"| {h.boosted_new_error:.3f} | {h.boosted_old_error:.3f} | {check} |"
            )
    return "\n".join(lines)
