"""What the reliability tests share: sizes from the environment, count summaries, process memory."""

from __future__ import annotations

import json
import os
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS_DIR, machine
from edge_sim.datasets.synthetic import make_synthetic_nslkdd

#: The smallest architecture (≈211k parameters at 5 classes): many agents fit on a 2-core box.
TINY = {"arch": "intrusion_dnn", "num_classes": 5}


def size(name: str, default: int) -> int:
    """``CLUE_REL_<NAME>`` if set (a quick run), else the issue's figure."""
    value = int(os.environ.get(f"CLUE_REL_{name}", default))
    if value < 1:
        raise ValueError(f"CLUE_REL_{name} must be >= 1, got {value}")
    return value


def record(name: str, line: str, counts: dict[str, Any]) -> Path:
    """Print the one-line summary and write it with the counts to ``bench/results/reliability-<name>.json``."""
    print(f"\n{line}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"reliability-{name}.json"
    doc = {"test": name, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "summary": line, "counts": counts}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


class Watcher(ABC):
    """A background thread running ``_run`` until ``stop``: what the tests watch while they feed."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @abstractmethod
    def _run(self) -> None:
        """Watch until ``self._stop`` is set."""


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Traffic:
    """Labelled batches of the synthetic NSL-KDD task (122 features, 5 classes), seeded per node."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.drawn = 0

    def batch(self, classes: tuple[int, ...], n: int = 64) -> tuple[np.ndarray, np.ndarray]:
        weights = [1.0 if c in classes else 0.0 for c in range(TINY["num_classes"])]
        self.drawn += 1
        return make_synthetic_nslkdd(n, seed=self.seed * 100_003 + self.drawn, class_weights=weights)
