"""Run every benchmark, each in its own process, and print one summary table.

Each benchmark runs as ``python -m bench.<name>`` (a fresh interpreter, so one's threads, caches
and brokers cannot colour the next one's timings) and writes ``bench/results/<name>.json``; this
collects their summary rows into ``bench/results/run_all.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR, parse_args, summary_row, table, write_json

BENCHES = ("kt_payload", "picker", "any_model", "mds_query", "drift_to_helper", "daemon_overhead", "onnx_vs_torch", "backbone_engines", "footprint")
REPO = Path(__file__).resolve().parent.parent


def run_one(name: str, quick: bool) -> tuple[list[dict], float, int]:
    """Run one benchmark; its summary rows (a failure row if it wrote none), seconds and exit code."""
    started = time.time()
    argv = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    print(f"== {' '.join(argv[1:])}", flush=True)
    rc = subprocess.run(argv, cwd=REPO).returncode
    seconds = time.time() - started
    path = RESULTS_DIR / f"{name}.json"
    # A result file older than this run is a previous run's: never report it as this one's.
    if rc != 0 or not path.exists() or path.stat().st_mtime < started:
        return [summary_row(name, "—", "—", f"FAILED (exit {rc})", False)], seconds, rc
    return json.loads(path.read_text())["summary"], seconds, rc


def main() -> int:
    quick = parse_args(__doc__).quick
    rows, runs = [], {}
    for name in BENCHES:
        summary, seconds, rc = run_one(name, quick)
        runs[name] = {"seconds": seconds, "exit": rc}
        rows += [{"bench": name, **row} for row in summary]
        print(f"== {name}: {seconds:.0f} s, exit {rc}\n", flush=True)
    print(table(["measure", "paper", "target", "ours", "met?"],
                [[r["measure"], r["paper"], r["target"], r["ours"], r["met"]] for r in rows]))
    path = write_json("run_all", quick=quick, settings={"benches": BENCHES}, results=runs, summary=rows)
    print(f"\nwritten {path}")
    return 0 if all(r["exit"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
