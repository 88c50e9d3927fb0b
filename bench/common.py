"""What every benchmark shares: thread settings, interleaved timing, percentiles, tables, JSON.

Timings on a shared 2-core box drift with the neighbours' load, so a measurement and its baseline
run back to back inside each repetition (``interleave``) and ratios are taken per repetition
(``paired_ratio``) before the median: a burst of outside load then hits both sides of one ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from broker.client import MqttClient

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup(threads: int = 1) -> None:
    """Pin torch to ``threads`` intra-op threads (other sessions share the cores)."""
    torch.set_num_threads(threads)


def parse_args(description: str | None) -> argparse.Namespace:
    """The common command line: ``--quick`` (small, under a minute) or the fuller default."""
    ap = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    return ap.parse_args()


def interleave(
    cases: Mapping[str, Callable[[], object]], *, reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each case, the cases called in turn within every repetition.

    The first ``warmup`` repetitions run but are not recorded (allocator, caches, lazy init).
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(warmup + reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if rep >= warmup:
                samples[name].append(dt)
    return samples


def stats(samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Count, p50 (median), p99, min, max and mean of ``samples`` × ``scale``."""
    a = np.asarray(samples, dtype=np.float64) * scale
    if a.size == 0:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "min": float("nan"), "max": float("nan"), "mean": float("nan")}
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "p50": float(p50), "p99": float(p99), "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repetitions of num[i] / den[i] (both measured in repetition i)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples must have the same non-zero length, got {a.size} and {b.size}")
    return float(np.median(a / b))


def machine() -> dict[str, Any]:
    """Where the numbers came from (the 1-minute load average tells how shared the box was)."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def summary_row(measure: str, paper: str, target: str, ours: str, met: bool | None) -> dict[str, Any]:
    """One line of the run_all table; ``met`` None where there is no target to meet."""
    return {"measure": measure, "paper": paper, "target": target, "ours": ours, "met": met}


def write_json(name: str, *, quick: bool, settings: Mapping[str, Any], results: Any, summary: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``bench/results/<name>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "bench": name,
        "quick": quick,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": dict(settings),
        "results": results,
        "summary": list(summary),
    }
    path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "—"}[value]
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def set_nodelay(client: MqttClient) -> None:
    """Diagnostic only: turn Nagle off on a connected client's socket.

    ``MqttClient`` (paho) leaves Nagle on, so a small publish that follows an unacknowledged one
    (a PUBACK, then the reply) waits for the peer's delayed ACK, ~40 ms on Linux. Benchmarks use
    this to show that cost next to the shipped behaviour, never in place of it.
    """
    paho = client._connection._paho
    sock = paho.socket() if paho is not None else None
    if sock is None:
        raise RuntimeError(f"client {client.name} has no socket (not connected)")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
