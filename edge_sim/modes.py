"""The modes a scenario compares, and the learner knobs each one sets: one table for every transport.

A mode is the scenario's ``[learner]`` table with the mode's own knobs on top. ``MODES`` run on
either transport; ``FLEET_MODES`` only over MQTT, where the MdS answers a query's cover and rank
(pooling, a wrong first helper); ``fedavg`` turns knowledge transfer off and has the transport run
FedAvg rounds instead.
"""

from __future__ import annotations

import copy
from typing import Any

FEDAVG = "fedavg"

MODES: dict[str, dict[str, Any]] = {
    "isolated": {"kt_apply": "off"},
    "clue_mean": {"kt_apply": "boost", "operator": {"type": "mean"}},
    "clue_class_aware": {"kt_apply": "boost", "operator": {"type": "class_aware"}},
    # The agent exactly as shipped: its defaults, no knob of its own.
    "clue": {},
    "clue_trust": {"kt_apply": "boost", "operator": {"type": "trust"}},
    # The control measures what random positions give once installed, so the install-time probe
    # (which refuses most of them as worse than chance) is off for it.
    "random_mask": {"kt_apply": "boost", "operator": {"type": "class_aware"}, "selection": "random", "helper_probe": False},
    "zero_filled": {"kt_apply": "zero_filled", "operator": {"type": "mean"}},
    "replace": {"kt_apply": "replace"},
    "average": {"kt_apply": "average"},
}

FLEET_MODES: dict[str, dict[str, Any]] = {
    # Fig. 8: one helper at a time (no pooling) against a pool of helpers that each know part of
    # the new classes; on the agent's defaults, then with the paper's frozen class-aware helper.
    "clue_single": {"split_helpers": 1, "pool_max": 1},
    "clue_pool": {"split_helpers": 4},
    "class_aware_single": {"kt_apply": "boost", "operator": {"type": "class_aware"}, "split_helpers": 1, "pool_max": 1},
    "class_aware_pool": {"kt_apply": "boost", "operator": {"type": "class_aware"}, "split_helpers": 4},
    # Fig. 10 (a): the first request goes to the least similar node; later ones to the most similar.
    "clue_wrong_first": {"helper_selection": "least_similar_first"},
    "class_aware_wrong_first": {"kt_apply": "boost", "operator": {"type": "class_aware"}, "helper_selection": "least_similar_first"},
}

SIM_MODES = (*MODES, *FLEET_MODES, FEDAVG)

#: The modes each transport runs.
TRANSPORT_MODES: dict[str, tuple[str, ...]] = {"mqtt": SIM_MODES, "inprocess": (*MODES, FEDAVG)}


def learner_values(learner: dict[str, Any], mode: str) -> dict[str, Any]:
    """``LearnerConfig`` values of ``mode``: the scenario's ``learner`` table, then the mode's knobs.

    A class-aware mode keeps the scenario's own class-aware operator (its ``w``) when it names one.
    """
    values = copy.deepcopy(learner)
    if mode == FEDAVG:
        values["kt_apply"] = "off"
        return values
    knobs = MODES[mode] if mode in MODES else FLEET_MODES[mode]
    values.update(copy.deepcopy(knobs))
    if knobs.get("operator", {}).get("type") == "class_aware" and "operator" in learner:
        values["operator"] = learner["operator"]
    return values
