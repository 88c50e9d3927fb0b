"""``clue-ctl top``'s picture of the fleet: one row per node from what the bus carries.

`FleetView` takes the messages of four subscriptions: each node's retained ``status`` (online or
not) and ``meta`` (its helpers when ``top`` starts), its ``prediction``s (one per
batch served: the batch rate, the served error, the helpers that served it) and its ``events``
(the last drift). It keeps a bounded window per node, so ``top`` can run for days.

>>> view = FleetView()
>>> view.rows(now=0.0)
[]
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.table import Table

from broker import topics
from broker._inbox import Inbound
from broker.errors import TopicError
from broker.wire import Event, NodeMeta, Prediction

#: Seconds of predictions the batch rate counts.
RATE_WINDOW_S = 10.0
#: Labelled batches the served error averages over (as the agent's ``clue_agent_served_error_ratio``).
ERROR_BATCHES = 10


@dataclass
class TopRow:
    """One line of ``clue-ctl top``."""

    node: str
    online: bool | None = None
    batches_per_s: float | None = None
    served_error: float | None = None
    helpers: int | None = None
    last_drift_batch: int | None = None
    last_drift_age_s: float | None = None
    last_drift_classes: list[int] = field(default_factory=list)


@dataclass
class _Node:
    status: str | None = None
    helpers: int | None = None
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    errors: deque[float] = field(default_factory=lambda: deque(maxlen=ERROR_BATCHES))
    drift: Event | None = None
    drift_at: float = 0.0


class FleetView:
    """The fleet as ``top`` shows it (module docstring); `add` each message, `rows` or `table` to show."""

    def __init__(self, rate_window: float = RATE_WINDOW_S) -> None:
        self.rate_window = rate_window
        self._nodes: dict[str, _Node] = {}
        self._started = time.monotonic()

    def add(self, item: Inbound, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        try:
            node_id, leaf = topics.parse_node_topic(item.topic)
        except TopicError:
            return
        message = item.message
        if leaf == "status":
            node = self._nodes.setdefault(node_id, _Node())
            node.status = item.payload.decode("utf-8", "replace") if item.payload else None
        elif leaf == "meta" and isinstance(message, NodeMeta):
            node = self._nodes.setdefault(node_id, _Node())
            # Metadata lags the predictions: it only says what no prediction has said yet.
            if not node.arrivals:
                node.helpers = message.helpers
        elif leaf == "prediction" and isinstance(message, Prediction):
            node = self._nodes.setdefault(node_id, _Node())
            node.arrivals.append(now)
            node.helpers = len(message.helpers)
            if message.error is not None:
                node.errors.append(message.error)
        elif leaf == "events" and isinstance(message, Event) and message.kind == "drift":
            node = self._nodes.setdefault(node_id, _Node())
            node.drift, node.drift_at = message, now

    def rows(self, now: float | None = None) -> list[TopRow]:
        now = time.monotonic() if now is None else now
        out = []
        for node_id in sorted(self._nodes):
            node = self._nodes[node_id]
            # The rate over the window, or over the time watched when that is shorter.
            span = min(self.rate_window, max(now - self._started, 1e-9))
            recent = sum(1 for t in node.arrivals if now - t <= self.rate_window)
            row = TopRow(
                node=node_id,
                online=None if node.status is None else node.status == topics.STATUS_ONLINE.decode(),
                batches_per_s=recent / span,
                served_error=sum(node.errors) / len(node.errors) if node.errors else None,
                helpers=node.helpers,
            )
            if node.drift is not None:
                batch = node.drift.detail.get("batch")
                classes = node.drift.detail.get("classes")
                row.last_drift_batch = batch if isinstance(batch, int) else None
                row.last_drift_classes = [c for c in classes if isinstance(c, int)] if isinstance(classes, list) else []
                row.last_drift_age_s = now - node.drift_at
            out.append(row)
        return out

    def table(self, now: float | None = None, *, title: str = "") -> Table:
        return render(self.rows(now), title=title)


def _drift_cell(row: TopRow) -> str:
    if row.last_drift_age_s is None:
        return "-"
    batch = "?" if row.last_drift_batch is None else str(row.last_drift_batch)
    classes = ",".join(str(c) for c in row.last_drift_classes)
    return f"batch {batch} ({row.last_drift_age_s:.0f} s ago)" + (f" classes {classes}" if classes else "")


def render(rows: Sequence[TopRow], *, title: str = "") -> Table:
    """`rows` as a rich table (a terminal redraws it in place; a file gets it as text)."""
    table = Table(title=title or None, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for name, justify in (("NODE", "left"), ("ONLINE", "left"), ("BATCHES/S", "right"), ("SERVED ERROR", "right"),
                          ("HELPERS", "right"), ("LAST DRIFT", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        online = "?" if r.online is None else ("yes" if r.online else "no")
        table.add_row(
            r.node, online, "-" if r.batches_per_s is None else f"{r.batches_per_s:.1f}",
            "-" if r.served_error is None else f"{r.served_error:.3f}", "-" if r.helpers is None else str(r.helpers),
            _drift_cell(r),
        )
    return table


__all__ = ["ERROR_BATCHES", "RATE_WINDOW_S", "FleetView", "TopRow", "render"]
