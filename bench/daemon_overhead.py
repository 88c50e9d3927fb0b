"""Daemon overhead: request batches per second through MQTT to one real ``clue-agent`` ÷ in-process.

One ``clue-agent`` process (MLP, shared pre-trained base weights, KT off, one torch thread) serves
labelled Fashion-MNIST batches of 200 over a private Mosquitto (``PrivateMosquitto()`` defaults,
as ``clue-sim`` runs it). The bench process feeds them and, after each block, calls
``Learner.process_batch`` in-process on the same batches, from the same base weights, with one
torch thread too. The ratio per block is in-process time ÷ daemon time (= daemon batches/s ÷
in-process batches/s); the median over blocks is reported. The daemon's time includes the
feeder's encoding and everything the daemon does per batch (prediction, metadata, checkpoints).

Two ways of feeding, both shown:

- *pipelined* (judged against the target ≥ 0.95): batches are sent without waiting for their
  predictions, at most ``WINDOW`` outstanding, in blocks of ``PIPE_BLOCK``. "Request batches per
  second" is a throughput, and this is how a request source that does not wait for each answer
  loads an agent. A block ends when its last prediction is in, so the first hop and the last
  answer of each block count against the daemon.
- *lock-step* (``Feeder.step``: send, wait for the prediction; how ``clue-sim`` paces a fleet):
  every batch also pays the bus round trip. It cannot reach 0.95 here: the same run measures a
  bare echo through the same broker (a payload of one encoded batch, ~627 KB, answered with 2 KB,
  both QoS 1 between persistent sessions) and reports ``lockstep_ceiling`` = in-process ÷
  (in-process + echo) per block, the best lock-step could do with a daemon that cost nothing. With
  the shipped broker's save-after-every-change persistence the echo took 4–15 ms on the 2-core
  test machine (it varies with the broker's disk writes, and the daemon's lock-step overhead was
  sometimes below it, so that ceiling is an estimate), without persistence about 2 ms: lock-step
  0.95 would need the whole round trip under ~0.6 ms against 11–14 ms per batch in-process.

Also shown: the CPU each process spent per pipelined batch (agent, broker, the bench process as
feeder and collector) against the in-process learner's, the CPU of each of the agent's threads, the
minor page faults per batch of the agent's worker and of the in-process learner, and everything
again for an agent with glibc's adaptive malloc thresholds (``malloc_retain_mb = 0``: its learner
faults freed memory back every batch, see ``agent/malloc.py``) and against a broker without
persistence.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.config import LearnerConfig
from agent.learner import Learner
from agent.models import build_model, save_weights
from bench.common import paired_ratio, parse_args, setup, stats, summary_row, table, write_json
from broker import topics
from broker.client import Inbound, MqttClient
from broker.launcher import PrivateMosquitto
from broker.wire import ArrayPayload, RequestBatch, encode
from edge_sim.collector import Collector, Feeder
from edge_sim.inputs import load_dataset, pretrain_base
from edge_sim.processes import spawn_agent
from edge_sim.workloads import BatchStream, ClassMix, split_pool

NODE = "bench-agent"
BATCH = 200
BLOCK = 10
# Batches in flight when pipelining: the broker drops what exceeds its per-client queue (64 MiB by
# default; a batch is ~0.6 MB), so an unbounded burst would lose batches, not measure throughput.
WINDOW = 8
PIPE_BLOCK = 30
TARGET = 0.95
PLANS = {True: {"blocks": 3, "pipe_blocks": 2, "warmup": 5}, False: {"blocks": 15, "pipe_blocks": 6, "warmup": 10}}
ECHO_REQUEST = f"{topics.PREFIX}/bench/echo/request"
ECHO_REPLY = f"{topics.PREFIX}/bench/echo/reply"
#: About an encoded ``Prediction`` of 200 labels.
ECHO_REPLY_BYTES = 2000
# (broker persistence, the agent's malloc_retain_mb) per run: as shipped (a save after every change,
# the agent's default); the agent with glibc's adaptive malloc thresholds, to show what fixing them
# gains (agent/malloc.py); and a broker without persistence, to show how much of the gap is its disk
# writes.
VARIANTS: tuple[tuple[bool, int | None], ...] = ((True, None), (True, 0), (False, None))


def _variant(r: dict[str, Any]) -> str:
    bus = "shipped" if r["broker_persistence"] else "no persistence"
    return bus if r["malloc_retain_mb"] is None else f"{bus}, malloc_retain_mb {r['malloc_retain_mb']}"


def _stat_fields(path: Path) -> list[str]:
    """The fields of a /proc ``stat`` file after the command name (field 3 of proc(5) is index 0)."""
    return path.read_text().rsplit(")", 1)[1].split()


def _cpu_of(fields: list[str]) -> float:
    """User + system CPU seconds in ``stat`` fields."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    return _cpu_of(_stat_fields(Path(f"/proc/{pid}/stat")))


def _thread_usage(pid: int) -> dict[int, tuple[float, int]]:
    """(user + system CPU seconds, minor page faults) so far of each thread of a process, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = _stat_fields(task / "stat")
        except FileNotFoundError:  # the thread ended between listing and reading
            continue
        out[int(task.name)] = (_cpu_of(fields), int(fields[7]))
    return out


class Echo:
    """A bare round trip through the broker: publish a payload, wait for a short answer."""

    def __init__(self, url: str) -> None:
        self.source = MqttClient.from_url(url, client_id="bench-echo-source")
        self.mirror = MqttClient.from_url(url, client_id="bench-echo-mirror")
        self.source.subscribe(ECHO_REPLY, 1, decoding="raw")
        self.mirror.subscribe(ECHO_REQUEST, 1, decoding="raw")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, name="echo-mirror", daemon=True)

    def start(self) -> "Echo":
        for c in (self.source, self.mirror):
            c.start()
        if not all(c.wait_subscribed(30) for c in (self.source, self.mirror)):
            raise RuntimeError("echo clients did not connect")
        self._thread.start()
        return self

    def _answer(self) -> None:
        while not self._stop.is_set():
            item = self.mirror.get(timeout=0.1)
            if isinstance(item, Inbound) and item.topic == ECHO_REQUEST:
                self.mirror.publish(ECHO_REPLY, item.payload[:ECHO_REPLY_BYTES], 1)

    def round_trips(self, payload: bytes, n: int) -> float:
        """Seconds for ``n`` round trips, one after another."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.source.publish(ECHO_REQUEST, payload, 1)
            while True:
                item = self.source.get(timeout=30)
                if item is None:
                    raise RuntimeError("echo not answered")
                if isinstance(item, Inbound) and item.topic == ECHO_REPLY:
                    break
        return time.perf_counter() - t0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in (self.source, self.mirror):
            c.stop()


def measure(persistence: bool, malloc_retain_mb: int | None, plan: dict[str, int], data: tuple[np.ndarray, np.ndarray, int]) -> dict[str, Any]:
    """Lock-step and pipelined throughput of a fresh agent on a fresh broker, each against in-process.

    ``malloc_retain_mb`` is the agent's setting of that name (None: its default)."""
    x, y, num_classes = data
    pre_idx, rest = split_pool(y, holdout_classes=range(num_classes), holdout=2000, seed=0)
    base = pretrain_base(build_model("mlp4", num_classes, seed=0), x[pre_idx], y[pre_idx], epochs=2, seed=0)
    stream = BatchStream(x, y, indices=rest, seed=0)
    everything = ClassMix(tuple(range(num_classes)))
    total = plan["warmup"] + plan["blocks"] * BLOCK + plan["pipe_blocks"] * PIPE_BLOCK
    batches = [stream.batch(everything, BATCH) for _ in range(total)]
    model = build_model("mlp4", num_classes)
    model.load_state_dict(copy.deepcopy(base))
    # KT off on both sides: a drift would make the daemon wait for an MdS that is not there.
    learner = Learner(model, num_classes=num_classes, config=LearnerConfig(kt_apply="off"), base_state=base)

    def in_process(chunk: list[tuple[np.ndarray, np.ndarray]]) -> float:
        t0 = time.perf_counter()
        for bx, by in chunk:
            learner.process_batch(torch.from_numpy(bx), torch.from_numpy(by))
        return time.perf_counter() - t0

    def beside_busy_core(chunk: list[tuple[np.ndarray, np.ndarray]]) -> float:
        # The daemon's learner never runs alone: the broker, the feeder and the agent's network
        # thread keep the other core busy. This is the in-process learner with a spinning process
        # there instead, which costs it no memory traffic, only the core. It trains on the chunk a
        # second time: the same arithmetic, so the same time.
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)
            return in_process(chunk)
        finally:
            spinner.kill()
            spinner.wait()

    bx0, by0 = batches[0]
    echo_payload = encode(RequestBatch(batch_id=0, x=ArrayPayload.from_numpy(bx0), y=ArrayPayload.from_numpy(by0)))
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp, PrivateMosquitto(persistence=persistence) as broker:
        work = Path(tmp)
        base_path = work / "base.npz"
        save_weights(base_path, base)
        url = f"mqtt://{broker.host}:{broker.port}"
        client = MqttClient.from_url(url, client_id="bench-feeder")
        collector = Collector(client).start()
        client.start()
        echo = Echo(url).start()
        agent_settings: dict[str, Any] = {"base_weights": str(base_path), "learner": {"kt_apply": "off"}}
        if malloc_retain_mb is not None:
            agent_settings["malloc_retain_mb"] = malloc_retain_mb
        agent = spawn_agent(NODE, url, work / "state", work / "logs", threads=1, settings=agent_settings)
        try:
            if not client.wait_subscribed(30) or not collector.wait_for(lambda: collector.events_of(NODE, "started"), 120):
                raise RuntimeError(f"the agent did not start:\n{agent.log_text()[-2000:]}")
            feeder = Feeder(client, collector)
            next_id = 0

            def lockstep(chunk: list[tuple[np.ndarray, np.ndarray]]) -> float:
                nonlocal next_id
                t0 = time.perf_counter()
                for bx, by in chunk:
                    if not feeder.step(next_id, [(NODE, bx, by)], timeout=60):
                        raise RuntimeError(f"batch {next_id} not answered:\n{agent.log_text()[-2000:]}")
                    next_id += 1
                return time.perf_counter() - t0

            def pipelined(chunk: list[tuple[np.ndarray, np.ndarray]]) -> float:
                nonlocal next_id
                first = next_id

                def answered_up_to(last: int) -> bool:
                    return all(i in collector.predictions[NODE] for i in range(first, last))

                t0 = time.perf_counter()
                for bx, by in chunk:
                    if not collector.wait_for(lambda: answered_up_to(next_id - WINDOW), 60):
                        raise RuntimeError(f"pipelined batch {next_id - WINDOW} not answered")
                    feeder.send(NODE, next_id, bx, by)
                    next_id += 1
                if not collector.wait_for(lambda: answered_up_to(next_id), 120):
                    raise RuntimeError("pipelined batches not all answered")
                return time.perf_counter() - t0

            warm = batches[: plan["warmup"]]
            lockstep(warm)
            in_process(warm)
            echo.round_trips(echo_payload, 3)
            daemon_s, local_s, echo_s = [], [], []
            for b in range(plan["blocks"]):
                chunk = batches[plan["warmup"] + b * BLOCK: plan["warmup"] + (b + 1) * BLOCK]
                daemon_s.append(lockstep(chunk))
                local_s.append(in_process(chunk))
                echo_s.append(echo.round_trips(echo_payload, BLOCK))
            piped_s, piped_local_s, piped_busy_s = [], [], []
            cpu = {"agent": 0.0, "broker": 0.0, "feeder": 0.0, "in_process": 0.0}
            threads: dict[int, float] = {}
            faults = {"agent_worker": 0, "in_process": 0}
            for b in range(plan["pipe_blocks"]):
                start = plan["warmup"] + plan["blocks"] * BLOCK + b * PIPE_BLOCK
                chunk = batches[start: start + PIPE_BLOCK]
                before = (_cpu_s(agent.pid), _cpu_s(broker.pid), time.process_time())
                threads_before = _thread_usage(agent.pid)
                piped_s.append(pipelined(chunk))
                block_faults = {}
                for tid, (spent, minflt) in _thread_usage(agent.pid).items():
                    spent0, minflt0 = threads_before.get(tid, (0.0, 0))
                    threads[tid] = threads.get(tid, 0.0) + spent - spent0
                    block_faults[tid] = minflt - minflt0
                # The worker is the thread that has spent the most CPU so far.
                faults["agent_worker"] += block_faults[max(block_faults, key=lambda t: threads[t])]
                faults_before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                cpu["agent"] += _cpu_s(agent.pid) - before[0]
                cpu["broker"] += _cpu_s(broker.pid) - before[1]
                cpu["feeder"] += time.process_time() - before[2]
                before_local = time.process_time()
                piped_local_s.append(in_process(chunk))
                cpu["in_process"] += time.process_time() - before_local
                faults["in_process"] += resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults_before
                piped_busy_s.append(beside_busy_core(chunk))
            piped_n = plan["pipe_blocks"] * PIPE_BLOCK
            agent.terminate(30)
            collector.wait_for(lambda: collector.events_of(NODE, "stats"), 10)
            agent_stats = (collector.events_of(NODE, "stats") or [None])[-1]
        finally:
            agent.terminate(10)
            echo.stop()
            collector.stop()
            client.stop()
    return {
        "broker_persistence": persistence,
        "malloc_retain_mb": malloc_retain_mb,
        "lockstep_ratio": paired_ratio(local_s, daemon_s),
        "lockstep_daemon_batches_per_s": BLOCK * len(daemon_s) / sum(daemon_s),
        "in_process_batches_per_s": BLOCK * len(local_s) / sum(local_s),
        "lockstep_daemon_ms_per_batch": stats([s / BLOCK for s in daemon_s], 1e3),
        "in_process_ms_per_batch": stats([s / BLOCK for s in local_s], 1e3),
        "lockstep_ceiling": float(np.median([lo / (lo + e) for lo, e in zip(local_s, echo_s)])),
        "echo_ms": stats([e / BLOCK for e in echo_s], 1e3),
        "pipelined_ratio": paired_ratio(piped_local_s, piped_s),
        "pipelined_daemon_batches_per_s": piped_n / sum(piped_s),
        "pipelined_in_process_batches_per_s": piped_n / sum(piped_local_s),
        "pipelined_daemon_ms_per_batch": stats([s / PIPE_BLOCK for s in piped_s], 1e3),
        "pipelined_in_process_ms_per_batch": stats([s / PIPE_BLOCK for s in piped_local_s], 1e3),
        "in_process_beside_busy_core_ms_per_batch": stats([s / PIPE_BLOCK for s in piped_busy_s], 1e3),
        "pipelined_ratio_to_busy_core": paired_ratio(piped_busy_s, piped_s),
        "pipelined_cpu_ms_per_batch": {k: 1e3 * v / piped_n for k, v in cpu.items()},
        # Largest first: the worker that runs the learner, then the MQTT network thread, ...
        "pipelined_minor_faults_per_batch": {k: v / piped_n for k, v in faults.items()},
        "pipelined_agent_thread_cpu_ms_per_batch": sorted((1e3 * v / piped_n for v in threads.values() if v > 0), reverse=True),
        "agent_stats": agent_stats.detail if agent_stats is not None else None,
    }


def run(quick: bool) -> dict[str, Any]:
    setup(1)
    plan = PLANS[quick]
    data = load_dataset("fashion_mnist")
    results = [measure(persistence, retain, plan, data) for persistence, retain in VARIANTS]
    rows = []
    for r in results:
        bus = _variant(r)
        rows.append([bus, "pipelined", round(r["pipelined_daemon_batches_per_s"], 1),
                     round(r["pipelined_in_process_batches_per_s"], 1), round(r["pipelined_ratio"], 3),
                     round(r["pipelined_daemon_ms_per_batch"]["p50"], 1), round(r["pipelined_in_process_ms_per_batch"]["p50"], 1),
                     f"≥ {TARGET}", r["pipelined_ratio"] >= TARGET])
        rows.append([bus, "lock-step", round(r["lockstep_daemon_batches_per_s"], 1), round(r["in_process_batches_per_s"], 1),
                     round(r["lockstep_ratio"], 3), round(r["lockstep_daemon_ms_per_batch"]["p50"], 1),
                     round(r["in_process_ms_per_batch"]["p50"], 1), f"— (ceiling {r['lockstep_ceiling']:.2f})", None])
    print(table(["run", "feeding", "daemon batches/s", "in-process batches/s", "daemon ÷ in-process",
                 "daemon ms/batch", "in-process ms/batch", "target", "met"], rows))
    for r in results:
        agent_ms = (r["agent_stats"] or {}).get("batch_ms", float("nan"))
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["pipelined_cpu_ms_per_batch"].items())
        faults = r["pipelined_minor_faults_per_batch"]
        print(f"{_variant(r)}: echo of one batch {r['echo_ms']['p50']:.1f} ms (p50); "
              f"the agent's own compute per batch {agent_ms:.1f} ms (mean); CPU ms per pipelined batch: {cpu}; "
              f"the agent's threads: {', '.join(f'{v:.1f}' for v in r['pipelined_agent_thread_cpu_ms_per_batch'])}; "
              f"minor page faults per batch: agent worker {faults['agent_worker']:.0f}, in-process {faults['in_process']:.0f}; "
              f"in-process beside a busy core {r['in_process_beside_busy_core_ms_per_batch']['p50']:.1f} ms/batch, "
              f"the daemon ÷ that {r['pipelined_ratio_to_busy_core']:.2f}")
    shipped = results[0]
    extra = "".join(f"; {_variant(r)} {r['pipelined_ratio']:.2f}" for r in results[1:])
    # Where the gap is: the learner's own time inside the agent against in-process, and the agent's
    # CPU outside the learner (decoding, publishing, metadata, checkpoints).
    learner_ms = (shipped["agent_stats"] or {}).get("batch_ms", float("nan"))
    outside_ms = shipped["pipelined_cpu_ms_per_batch"]["agent"] - learner_ms
    extra += (f"; the learner itself {learner_ms:.1f} ms/batch in the agent vs "
              f"{shipped['pipelined_in_process_ms_per_batch']['p50']:.1f} in-process, the agent's CPU "
              f"outside it {outside_ms:.1f} ms/batch; in-process beside a busy core "
              f"{shipped['in_process_beside_busy_core_ms_per_batch']['p50']:.1f} ms/batch, the daemon ÷ that "
              f"{shipped['pipelined_ratio_to_busy_core']:.2f}; the worker's page faults per batch "
              f"{shipped['pipelined_minor_faults_per_batch']['agent_worker']:.0f} "
              f"(malloc_retain_mb 0: {results[1]['pipelined_minor_faults_per_batch']['agent_worker']:.0f})")
    summary = [summary_row(
        "daemon ÷ in-process batches/s (MLP, b200, pipelined)", "—", f"≥ {TARGET}",
        f"{shipped['pipelined_ratio']:.2f} ({shipped['pipelined_daemon_batches_per_s']:.1f} vs "
        f"{shipped['pipelined_in_process_batches_per_s']:.1f}/s); lock-step {shipped['lockstep_ratio']:.2f}, its "
        f"ceiling {shipped['lockstep_ceiling']:.2f} (echo {shipped['echo_ms']['p50']:.1f} ms){extra}",
        shipped["pipelined_ratio"] >= TARGET,
    )]
    path = write_json("daemon_overhead", quick=quick, settings={**plan, "variants": VARIANTS, "block": BLOCK,
                                                                "pipe_block": PIPE_BLOCK, "window": WINDOW, "batch": BATCH}, results=results, summary=summary)
    print(f"\nwritten {path}")
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
