"""What a transport is: the way one mode of a scenario runs, for one seed, into a ``ModeRun``.

A transport lives for one scenario run (``edge_sim.runner.open_transport`` opens and closes it:
a broker, an MdS and a working folder, or nothing); ``run_mode`` starts a fresh fleet from the
seed's base model, feeds it the ``RequestFeed``'s batches and returns every node's record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edge_sim.inputs import SeedInputs
from edge_sim.records import ModeRun
from edge_sim.scenario import Scenario

#: ``progress(label, batches done, batches in all)``, after every batch.
Progress = Callable[[str, int, int], None]


class Transport(Protocol):
    #: The scenario's ``transport`` value that selects it.
    name: str

    def run_mode(self, scn: Scenario, mode: str, inputs: SeedInputs, progress: Progress | None = None) -> ModeRun:
        """Run ``mode`` of ``scn`` on a fresh fleet for ``inputs.seed``; node 0 is the target."""
        ...
