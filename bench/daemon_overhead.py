"""Daemon overhead: request batches per second through MQTT to one real ``clue-agent`` ÷ in-process.

One ``clue-agent`` process (MLP, shared pre-trained base weights, KT off, one torch thread) serves
labelled Fashion-MNIST batches of 200 over a private Mosquitto (``PrivateMosquitto()`` defaults,
as ``clue-sim`` runs it). The bench process feeds them in lock-step (``Feeder.step``: send, wait for
the prediction) in blocks of ``BLOCK`` batches, and after each block calls
``Learner.process_batch`` in-process on the same batches, from the same base weights. The ratio per
block is in-process time ÷ daemon time (= daemon batches/s ÷ in-process batches/s); the median
over blocks is reported. Target ≥ 0.95.

Also shown, not judged: *pipelined* feeding (batches sent without waiting, at most ``WINDOW``
outstanding), which hides the bus round trip behind the agent's work; the agent's own per-batch
compute time from its ``stats`` event; and, in the full run, the same against a broker without
persistence.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.config import LearnerConfig
from agent.learner import Learner
from agent.models import build_model, save_weights
from bench.common import paired_ratio, parse_args, setup, stats, summary_row, table, write_json
from broker.client import MqttClient
from broker.launcher import PrivateMosquitto
from edge_sim.collector import Collector, Feeder
from edge_sim.experiment import load_data, pretrain_base
from edge_sim.processes import spawn_agent
from edge_sim.workloads import BatchStream, ClassMix, split_pool

NODE = "bench-agent"
BATCH = 200
BLOCK = 10
# Batches in flight when pipelining: the broker drops what exceeds its per-client queue (64 MiB by
# default; a batch is ~0.6 MB), so an unbounded burst would lose batches, not measure throughput.
WINDOW = 8
TARGET = 0.95
PLANS = {True: {"blocks": 3, "pipelined": 30, "warmup": 5}, False: {"blocks": 15, "pipelined": 150, "warmup": 10}}
# Broker persistence per run: the shipped default (a save after every change), and in the full run
# also without it, to show how much of the gap is the broker's disk writes.
VARIANTS = {True: (True,), False: (True, False)}


def measure(persistence: bool, plan: dict[str, int], data: tuple[np.ndarray, np.ndarray, int]) -> dict[str, Any]:
    """Lock-step and pipelined throughput of a fresh agent on a fresh broker, each against in-process."""
    x, y, num_classes = data
    pre_idx, rest = split_pool(y, holdout_classes=range(num_classes), holdout=2000, seed=0)
    base = pretrain_base("mlp4", x[pre_idx], y[pre_idx], num_classes=num_classes, epochs=2, seed=0)
    stream = BatchStream(x, y, indices=rest, seed=0)
    everything = ClassMix(tuple(range(num_classes)))
    total = plan["warmup"] + plan["blocks"] * BLOCK + plan["pipelined"]
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

    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp, PrivateMosquitto(persistence=persistence) as broker:
        work = Path(tmp)
        base_path = work / "base.npz"
        save_weights(base_path, base)
        url = f"mqtt://{broker.host}:{broker.port}"
        client = MqttClient.from_url(url, client_id="bench-feeder")
        collector = Collector(client).start()
        client.start()
        agent = spawn_agent(NODE, url, work / "state", work / "logs", threads=1,
                            settings={"base_weights": str(base_path), "learner": {"kt_apply": "off"}})
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

            warm = batches[: plan["warmup"]]
            lockstep(warm)
            in_process(warm)
            daemon_s, local_s = [], []
            for b in range(plan["blocks"]):
                chunk = batches[plan["warmup"] + b * BLOCK: plan["warmup"] + (b + 1) * BLOCK]
                daemon_s.append(lockstep(chunk))
                local_s.append(in_process(chunk))
            piped = batches[plan["warmup"] + plan["blocks"] * BLOCK:]
            first = next_id
            t0 = time.perf_counter()

            def answered_up_to(last: int) -> bool:
                return all(i in collector.predictions[NODE] for i in range(first, last))

            for bx, by in piped:
                if not collector.wait_for(lambda: answered_up_to(next_id - WINDOW), 60):
                    raise RuntimeError(f"pipelined batch {next_id - WINDOW} not answered")
                feeder.send(NODE, next_id, bx, by)
                next_id += 1
            if not collector.wait_for(lambda: answered_up_to(next_id), 120):
                raise RuntimeError("pipelined batches not all answered")
            piped_daemon_s = time.perf_counter() - t0
            piped_local_s = in_process(piped)
            agent.terminate(30)
            collector.wait_for(lambda: collector.events_of(NODE, "stats"), 10)
            agent_stats = (collector.events_of(NODE, "stats") or [None])[-1]
        finally:
            agent.terminate(10)
            collector.stop()
            client.stop()
    return {
        "broker_persistence": persistence,
        "lockstep_ratio": paired_ratio(local_s, daemon_s),
        "lockstep_daemon_batches_per_s": BLOCK * len(daemon_s) / sum(daemon_s),
        "in_process_batches_per_s": BLOCK * len(local_s) / sum(local_s),
        "lockstep_daemon_ms_per_batch": stats([s / BLOCK for s in daemon_s], 1e3),
        "in_process_ms_per_batch": stats([s / BLOCK for s in local_s], 1e3),
        "pipelined_ratio": piped_local_s / piped_daemon_s,
        "pipelined_daemon_batches_per_s": len(piped) / piped_daemon_s,
        "pipelined_in_process_batches_per_s": len(piped) / piped_local_s,
        "agent_stats": agent_stats.detail if agent_stats is not None else None,
    }


def run(quick: bool) -> dict[str, Any]:
    setup(1)
    plan = PLANS[quick]
    data = load_data("mlp4")
    results = [measure(persistence, plan, data) for persistence in VARIANTS[quick]]
    rows = []
    for r in results:
        bus = "shipped" if r["broker_persistence"] else "no persistence"
        rows.append([bus, "lock-step", round(r["lockstep_daemon_batches_per_s"], 1), round(r["in_process_batches_per_s"], 1),
                     round(r["lockstep_ratio"], 3), round(r["lockstep_daemon_ms_per_batch"]["p50"], 1),
                     round(r["in_process_ms_per_batch"]["p50"], 1), f"≥ {TARGET}", r["lockstep_ratio"] >= TARGET])
        rows.append([bus, "pipelined", round(r["pipelined_daemon_batches_per_s"], 1),
                     round(r["pipelined_in_process_batches_per_s"], 1), round(r["pipelined_ratio"], 3),
                     round(1e3 / r["pipelined_daemon_batches_per_s"], 1), round(1e3 / r["pipelined_in_process_batches_per_s"], 1),
                     "—", None])
    print(table(["broker", "feeding", "daemon batches/s", "in-process batches/s", "daemon ÷ in-process",
                 "daemon ms/batch", "in-process ms/batch", "target", "met"], rows))
    for r in results:
        agent_ms = (r["agent_stats"] or {}).get("batch_ms", float("nan"))
        print(f"persistence {r['broker_persistence']}: the agent's own compute per batch {agent_ms:.1f} ms (mean)")
    shipped = results[0]
    extra = "".join(f"; no-persistence broker {r['lockstep_ratio']:.2f}" for r in results[1:])
    summary = [summary_row(
        "daemon ÷ in-process batches/s (MLP, b200, lock-step)", "—", f"≥ {TARGET}",
        f"{shipped['lockstep_ratio']:.2f} ({shipped['lockstep_daemon_batches_per_s']:.1f} vs "
        f"{shipped['in_process_batches_per_s']:.1f}/s); pipelined {shipped['pipelined_ratio']:.2f}{extra}",
        shipped["lockstep_ratio"] >= TARGET,
    )]
    path = write_json("daemon_overhead", quick=quick, settings={**plan, "variants": VARIANTS[quick], "block": BLOCK,
                                                                "batch": BATCH}, results=results, summary=summary)
    print(f"\nwritten {path}")
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
