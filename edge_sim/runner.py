"""Running a scenario: every seed and mode, one after the other, on the scenario's transport.

Each seed's base model is pre-trained once and every mode starts a fresh fleet from it. Ctrl-C
stops the run; the modes that finished are returned (the report marks the results partial).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from agent.errors import ConfigError
from edge_sim.inputs import prepare_seed, scenario_data
from edge_sim.records import ModeRun
from edge_sim.scenario import Scenario
from edge_sim.transports import InProcessTransport, Progress, Transport
from edge_sim.transports.mqtt import mqtt_transport


@contextlib.contextmanager
def open_transport(scn: Scenario, *, broker_url: str | None = None, workdir: Path | None = None) -> Iterator[Transport]:
    """``scn``'s transport, closed after; ``broker_url`` and ``workdir`` are the MQTT transport's."""
    if scn.transport == "inprocess":
        if broker_url is not None:
            raise ConfigError("a broker was given, but the inprocess transport uses none")
        threads = torch.get_num_threads()
        try:
            yield InProcessTransport()
        finally:
            torch.set_num_threads(threads)
        return
    with mqtt_transport(workdir, broker_url) as transport:
        yield transport


def run_scenario(
    scn: Scenario, *, broker_url: str | None = None, workdir: Path | None = None, progress: Progress | None = None,
) -> list[ModeRun]:
    """Every seed and mode of ``scn``; returns what finished (also after Ctrl-C: partial results)."""
    data = scenario_data(scn)
    runs: list[ModeRun] = []
    with open_transport(scn, broker_url=broker_url, workdir=workdir) as transport:
        try:
            for seed in scn.seeds:
                inputs = prepare_seed(scn, seed, data)
                for mode in scn.modes:
                    runs.append(transport.run_mode(scn, mode, inputs, progress))
        except KeyboardInterrupt:
            pass  # Ctrl-C: every process stops as the transport closes, and what finished is kept
    return runs
