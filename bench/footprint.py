"""Footprint of a real ``clue-agent``: start to ready, resident memory idle and running ÷ bare torch.

One ``clue-agent`` process (``python -m agent`` as ``spawn_agent`` starts it: the default MLP
``mlp4``, base weights from ``model_seed``, every other setting at its default, one torch thread)
against a private Mosquitto (``PrivateMosquitto()`` defaults, as ``clue-sim`` runs it). Measured per
start, each a fresh node id and state folder (so no retained status or checkpoint of an earlier one
counts):

- *start to ready*: from just before the spawn until the node's retained ``status`` topic says
  ``online`` and its ``started`` event has arrived on ``clue/v1/node/{id}/events`` (both through
  the broker, as an operator's ``clue-ctl`` sees them);
- *idle RSS*: ``VmRSS`` of ``/proc/<pid>/status`` ``IDLE_S`` seconds after ready, with ``VmHWM``
  (the peak so far) and the split into anonymous and file-backed pages (``RssAnon``/``RssFile``:
  the latter is mostly the shared libraries, libtorch above all, which another torch process on
  the box shares);
- *running RSS*: the same after ``batches`` labelled batches of 200 Fashion-MNIST-shaped rows (784
  float32 in [0, 1], synthetic: ten fixed class prototypes plus noise, one class mix throughout,
  so the learner improves and no drift fires) fed lock-step (``Feeder.step``: send, wait for the
  prediction).

Baselines in the same run, one of each just before every agent start: a bare ``python -c "import
torch; torch.ones(1)"`` (it then waits on stdin so that its memory can be read; its start time ends
when it says so on stdout); the same plus one ``torch.optim.Adam`` (what torch's own optimizer
costs: every ``torch.optim`` optimizer's ``__init__``, ``step`` and ``zero_grad`` are wrapped for
``torch.compile`` and import ``torch._dynamo``, sympy included, on first call; the learner's
``agent.optim.Adam`` is there to avoid it); a process that only imports ``agent.daemon`` (what the
package's imports cost over torch); and one that also builds the agent's default ``Learner`` and
learns one batch (the model, its optimizer state, the kernels of a training step), which reports
whether ``torch._dynamo`` got loaded. The agent's figures are reported absolute and as paired ratios
to the bare torch process (median over starts), and its running RSS is split into those layers.
Targets (MLP on this box): running RSS ≤ 300 MB, start to ready ≤ 2 s. MB here is MiB (``VmRSS`` kB ÷ 1024, as ``ps``/``top`` count); where a target's verdict
would differ with MB = 10⁶ bytes, the report says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import paired_ratio, parse_args, setup, stats, summary_row, table, write_json
from broker import topics
from broker.client import MqttClient
from broker.launcher import PrivateMosquitto
from edge_sim.collector import Collector, Feeder
from edge_sim.processes import spawn_agent

REPO = Path(__file__).resolve().parent.parent
NODE = "bench-footprint"
BATCH = 200
FEATURES = 784
CLASSES = 10
#: Seconds the agent sits idle after ready before its memory is read.
IDLE_S = 1.0
TARGET_RSS_MB = 300.0
TARGET_READY_S = 2.0
PLANS = {True: {"starts": 1, "batches": 40}, False: {"starts": 3, "batches": 200}}
#: The baselines: each prints "ready" once its work is done (then, space-separated, the watched
#: modules it has loaded), then waits for stdin to close.
WATCHED = ("torch._dynamo",)
_READY = f"print('ready', *(m for m in {WATCHED!r} if m in sys.modules), flush=True); sys.stdin.readline()"
BARE_TORCH = f"import sys, torch; torch.ones(1); {_READY}"
TORCH_OPTIM = f"import sys, torch; torch.optim.Adam([torch.nn.Parameter(torch.ones(1))]); {_READY}"
IMPORT_ONLY = f"import sys, agent.daemon; {_READY}"
LEARNER = ("import sys, torch, agent.daemon; from agent.learner import Learner; from agent.models import build_model; "
           f"torch.set_num_threads(1); learner = Learner(build_model('mlp4', {CLASSES}, seed=0), num_classes={CLASSES}); "
           f"learner.process_batch(torch.rand({BATCH}, {FEATURES}), torch.randint(0, {CLASSES}, ({BATCH},))); {_READY}")
#: The largest file mappings of the running agent listed in the results.
TOP_FILES = 8


def _mb(kb: int) -> float:
    return kb / 1024.0


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = _mb(int(value.split()[0]))
    return out


def file_mappings(pid: int, top: int = TOP_FILES) -> list[tuple[str, float]]:
    """The ``top`` mapped files (or [heap], [anon], ...) by resident MiB, from ``/proc/<pid>/smaps``."""
    by_name: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if first and not first[0].endswith(":"):  # a mapping's header line: address perms offset dev inode [path]
            name = first[5] if len(first) > 5 else "[anon]"
            if name.startswith("/"):
                name = name.replace(str(REPO / ".venv"), ".venv")
        elif first and first[0] == "Rss:":
            by_name[name] = by_name.get(name, 0) + int(first[1])
    return [(n, round(_mb(kb), 1)) for n, kb in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def bare_process(code: str) -> dict[str, Any]:
    """Start ``python -c code``; seconds until it prints ready, the watched modules it loaded, its memory then."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        words = child.stdout.readline().split()
        seconds = time.perf_counter() - t0
        if words[:1] != ["ready"]:
            raise RuntimeError(f"{code!r} did not start: {child.stderr.read()[-2000:]}")
        memory = proc_memory(child.pid)
    finally:
        child.stdin.close()
        if child.wait(30) != 0:
            raise RuntimeError(f"{code!r} exited {child.returncode}")
    return {"ready_s": seconds, "loaded": words[1:], **memory}


def synthetic_batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` labelled batches of ``BATCH`` rows of ``FEATURES`` floats in [0, 1]: prototype per class + noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((CLASSES, FEATURES), dtype=np.float32)
    out = []
    for _ in range(n):
        y = rng.integers(0, CLASSES, BATCH, dtype=np.int64)
        x = 0.6 * prototypes[y] + 0.4 * rng.random((BATCH, FEATURES), dtype=np.float32)
        out.append((x.astype(np.float32), y))
    return out


def measure_agent(rep: int, url: str, work: Path, collector: Collector, feeder: Feeder,
                  batches: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """One fresh agent: start to ready, idle memory, memory after ``batches`` lock-step batches."""
    node = f"{NODE}-{rep}"
    t0 = time.perf_counter()
    agent = spawn_agent(node, url, work / f"state-{rep}", work / "logs")
    try:
        online = lambda: collector.status.get(node) == topics.STATUS_ONLINE  # noqa: E731
        if not collector.wait_for(lambda: online() and bool(collector.events_of(node, "started")), 120):
            raise RuntimeError(f"{node} did not become ready:\n{agent.log_text()[-2000:]}")
        ready_s = time.perf_counter() - t0
        at_ready = proc_memory(agent.pid)
        time.sleep(IDLE_S)
        idle = proc_memory(agent.pid)
        idle_files = file_mappings(agent.pid)
        t1 = time.perf_counter()
        for i, (bx, by) in enumerate(batches):
            if not feeder.step(i, [(node, bx, by)], timeout=60):
                raise RuntimeError(f"{node}: batch {i} not answered:\n{agent.log_text()[-2000:]}")
        feed_s = time.perf_counter() - t1
        running = proc_memory(agent.pid)
        running_files = file_mappings(agent.pid)
        answered = collector.predictions[node]
        # The error the agent itself reports for each answered batch (labels were given).
        error = float(np.mean([answered[i].error for i in range(len(batches) - 10, len(batches))]))
        kinds = sorted({e.kind for e in collector.events_of(node)})
    finally:
        code = agent.terminate(30)
    if code != 0:
        raise RuntimeError(f"{node} exited {code}:\n{agent.log_text()[-2000:]}")
    return {"node": node, "ready_s": ready_s, "at_ready": at_ready, "idle": idle, "running": running,
            "idle_top_mappings": idle_files, "running_top_mappings": running_files,
            "feed_ms_per_batch": 1e3 * feed_s / len(batches), "error_last_10": error, "event_kinds": kinds}


def run(quick: bool) -> dict[str, Any]:
    setup(1)
    plan = PLANS[quick]
    load_before = loadavg()
    batches = synthetic_batches(plan["batches"])
    # Unrecorded: bring python, torch and the package into the page cache, so the first start is
    # not the only one that reads them from disk.
    bare_process(BARE_TORCH)
    bare_process(IMPORT_ONLY)
    torch_runs, optim_runs, import_runs, learner_runs, agent_runs = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp, PrivateMosquitto() as broker:
        work = Path(tmp)
        url = f"mqtt://{broker.host}:{broker.port}"
        client = MqttClient.from_url(url, client_id="bench-footprint-feeder")
        collector = Collector(client).start()
        client.start()
        try:
            if not client.wait_subscribed(30):
                raise RuntimeError("the feeder could not subscribe")
            feeder = Feeder(client, collector)
            for rep in range(plan["starts"]):
                torch_runs.append(bare_process(BARE_TORCH))
                optim_runs.append(bare_process(TORCH_OPTIM))
                import_runs.append(bare_process(IMPORT_ONLY))
                learner_runs.append(bare_process(LEARNER))
                agent_runs.append(measure_agent(rep, url, work, collector, feeder, batches))
        finally:
            collector.stop()
            client.stop()
    load_after = loadavg()

    def col(runs: list[dict[str, Any]], *keys: str) -> list[float]:
        """One figure of every run: ``runs[i][keys[0]][keys[1]]...``."""
        out = []
        for run in runs:
            value: Any = run
            for k in keys:
                value = value[k]
            out.append(float(value))
        return out

    def med(runs: list[dict[str, Any]], *keys: str) -> float:
        return float(np.median(col(runs, *keys)))

    torch_rss, torch_s = col(torch_runs, "VmRSS"), col(torch_runs, "ready_s")
    ready = stats(col(agent_runs, "ready_s"))
    result: dict[str, Any] = {
        "bare_torch": torch_runs,
        "torch_with_adam": optim_runs,
        "import_agent_daemon": import_runs,
        "learner_one_batch": learner_runs,
        "agent": agent_runs,
        "ready_s": ready,
        "ready_ratio_to_torch": paired_ratio(col(agent_runs, "ready_s"), torch_s),
        "idle_rss_mb": med(agent_runs, "idle", "VmRSS"),
        "idle_ratio_to_torch": paired_ratio(col(agent_runs, "idle", "VmRSS"), torch_rss),
        "running_rss_mb": med(agent_runs, "running", "VmRSS"),
        "running_hwm_mb": med(agent_runs, "running", "VmHWM"),
        "running_ratio_to_torch": paired_ratio(col(agent_runs, "running", "VmRSS"), torch_rss),
        "torch_rss_mb": med(torch_runs, "VmRSS"),
        "torch_ready_s": med(torch_runs, "ready_s"),
        "optim_rss_mb": med(optim_runs, "VmRSS"),
        "optim_ready_s": med(optim_runs, "ready_s"),
        "import_rss_mb": med(import_runs, "VmRSS"),
        "import_ready_s": med(import_runs, "ready_s"),
        "learner_rss_mb": med(learner_runs, "VmRSS"),
        "learner_ready_s": med(learner_runs, "ready_s"),
        "learner_loads_dynamo": any("torch._dynamo" in r["loaded"] for r in learner_runs),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    running, ready_p50 = result["running_rss_mb"], ready["p50"]
    rss_met, ready_met = running <= TARGET_RSS_MB, ready_p50 <= TARGET_READY_S
    # The stricter reading of "300 MB": 300·10⁶ bytes = 286.1 MiB.
    rss_met_decimal = running <= TARGET_RSS_MB * 1e6 / (1 << 20)

    rows = []
    for label, runs in (("bare torch", torch_runs), ("torch + torch.optim.Adam", optim_runs),
                        ("import agent.daemon", import_runs), ("+ Learner, one batch learnt", learner_runs)):
        rows.append([label, round(med(runs, "ready_s"), 2), round(med(runs, "VmRSS"), 1), round(med(runs, "RssAnon"), 1),
                     round(med(runs, "RssFile"), 1), round(med(runs, "VmHWM"), 1), "—", "—"])
    rows.append(["agent idle (ready + 1 s)", round(ready_p50, 2), round(result["idle_rss_mb"], 1),
                 round(med(agent_runs, "idle", "RssAnon"), 1), round(med(agent_runs, "idle", "RssFile"), 1),
                 round(med(agent_runs, "idle", "VmHWM"), 1), round(result["ready_ratio_to_torch"], 2),
                 round(result["idle_ratio_to_torch"], 2)])
    rows.append([f"agent after {plan['batches']} batches", "—", round(running, 1),
                 round(med(agent_runs, "running", "RssAnon"), 1), round(med(agent_runs, "running", "RssFile"), 1),
                 round(result["running_hwm_mb"], 1), "—", round(result["running_ratio_to_torch"], 2)])
    print(table(["process", "start→ready s", "VmRSS MiB", "RssAnon", "RssFile", "VmHWM", "ready ÷ torch",
                 "RSS ÷ torch"], rows))
    last = agent_runs[-1]
    starts = ", ".join(f"{r['ready_s']:.2f}" for r in agent_runs)
    print(f"\nstarts: {plan['starts']}; start→ready {starts} s (median {ready_p50:.2f}); lock-step "
          f"{last['feed_ms_per_batch']:.1f} ms/batch, error on the last 10 batches {last['error_last_10']:.3f}; "
          f"events seen: {', '.join(last['event_kinds'])}")
    print("largest mappings of the running agent (MiB): "
          + ", ".join(f"{Path(n).name if n.startswith('/') or n.startswith('.venv') else n} {mb}" for n, mb in last["running_top_mappings"]))
    print(f"load average before: {load_before}; after: {load_after}")
    torch_mb, dynamo_mb = result["torch_rss_mb"], result["optim_rss_mb"] - result["torch_rss_mb"]
    own_mb = result["import_rss_mb"] - torch_mb
    learner_mb = result["learner_rss_mb"] - result["import_rss_mb"]
    dynamo = "loads torch._dynamo" if result["learner_loads_dynamo"] else "does not load torch._dynamo"
    print(f"\nrunning RSS {running:.1f} MiB against ≤ {TARGET_RSS_MB:.0f}: {'met' if rss_met else 'not met'}"
          + ("" if rss_met else f" (over by {running - TARGET_RSS_MB:.1f} MiB)")
          + ("" if rss_met == rss_met_decimal else f"; with MB = 10⁶ bytes (≤ {TARGET_RSS_MB * 1e6 / (1 << 20):.1f} MiB): "
             f"{'met' if rss_met_decimal else 'not met'}")
          + f". Of it: bare torch {torch_mb:.1f} ({torch_mb / running:.0%}); agent.daemon's own imports +{own_mb:.1f}; "
          f"the learner and one training step +{learner_mb:.1f} (it {dynamo}, which one torch.optim.Adam costs: "
          f"+{dynamo_mb:.1f}); the rest, {running - torch_mb - own_mb - learner_mb:.1f}, is serving (the broker client "
          f"and its threads, {plan['batches']} batches, freed memory kept by malloc_retain_mb)")
    print(f"start→ready {ready_p50:.2f} s against ≤ {TARGET_READY_S:.0f}: {'met' if ready_met else 'not met'}"
          + ("" if ready_met else f" (over by {ready_p50 - TARGET_READY_S:.2f} s)")
          + f". A bare torch process takes {result['torch_ready_s']:.2f} s (with one torch.optim.Adam "
          f"{result['optim_ready_s']:.2f} s); importing agent.daemon {result['import_ready_s']:.2f} s, and learning one "
          f"batch with its Learner {result['learner_ready_s']:.2f} s")
    summary = [
        summary_row(
            "agent running RSS (MLP, after lock-step batches)", "—", f"≤ {TARGET_RSS_MB:.0f} MB",
            f"{running:.0f} MiB (peak {result['running_hwm_mb']:.0f}) after {plan['batches']} batches, idle "
            f"{result['idle_rss_mb']:.0f}; {result['running_ratio_to_torch']:.2f}× a bare torch process "
            f"({torch_mb:.0f} MiB); import agent.daemon alone {result['import_rss_mb']:.0f}; the learner {dynamo} "
            f"(torch.optim.Adam's costs {dynamo_mb:.0f} MiB)",
            rss_met,
        ),
        summary_row(
            "agent start → ready (status online + started event)", "—", f"≤ {TARGET_READY_S:.0f} s",
            f"median {ready_p50:.2f} s over {ready['n']} (max {ready['max']:.2f}); "
            f"{result['ready_ratio_to_torch']:.2f}× a bare torch start ({result['torch_ready_s']:.2f} s; with "
            f"torch.optim.Adam {result['optim_ready_s']:.2f} s); "
            f"load {load_before.split()[0]} → {load_after.split()[0]}",
            ready_met,
        ),
    ]
    path = write_json("footprint", quick=quick, settings={**plan, "batch": BATCH, "features": FEATURES,
                                                          "idle_s": IDLE_S, "arch": "mlp4", "torch_threads": 1},
                      results=result, summary=summary)
    print(f"\nwritten {path}")
    return {"results": result, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
