"""What a run records, whatever its transport: per node and batch the errors and helpers, the
node's events, and its counters (bytes per operation, mean times) at the end.

Events and counters use the agent daemon's names (``helper_installed`` with ``batches`` and
``ms``; ``kt_in``, ``batch_ms``, ``install_n``, ...), so one report reads runs of either transport.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class NodeRecord:
    served_error: list[float] = field(default_factory=list)
    target_error: list[float] = field(default_factory=list)
    class_errors: list[dict[int, float]] = field(default_factory=list)
    helpers: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class ModeRun:
    """One mode, one seed: every node's record (node 0 is the target), over the data set's ``num_classes`` classes."""

    mode: str
    seed: int
    nodes: dict[str, NodeRecord]
    seconds: float
    complete: bool
    num_classes: int

    @property
    def target(self) -> NodeRecord:
        return next(iter(self.nodes.values()))


def node_ids(seed: int, mode: str, count: int) -> list[str]:
    """The ids of a run's nodes, node 0 the target (valid MQTT client ids and topic levels)."""
    return [f"s{seed}-{mode.replace('_', '-')}-n{i}" for i in range(count)]


def run_dict(run: ModeRun) -> dict[str, Any]:
    return {"mode": run.mode, "seed": run.seed, "seconds": run.seconds, "complete": run.complete, "num_classes": run.num_classes,
            "nodes": {n: asdict(r) for n, r in run.nodes.items()}}
