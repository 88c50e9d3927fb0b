"""The in-process transport: the fleet's learners in this process, no MQTT, the same learner as the daemon.

Each batch goes to node 0 (the target) first, then to the peers in order (the order of the
in-process experiment whose numbers the README quotes), and a transfer a node starts is finished
before the next node's batch; so a seed gives the same numbers every run.
Helpers are found the way the MdS finds them (similarity top-k over class histograms, excluding
nodes that never saw the classes asked for), and knowledge travels as real codec blobs, so the
KT bytes are the blobs the wire would carry (without MQTT's envelope; metadata and MdS queries
cost nothing here). FedAvg averages with the aggregator's arithmetic (``agent.fl``).

Layout: ``InProcessTransport`` runs a mode; ``InProcessHelp`` holds every knowledge-transfer call
(the help coordinators, the MdS stand-in, the KT channel); ``InProcessFedAvg`` the FedAvg rounds;
``NodeLog`` fills one node's record with the daemon's event and counter names.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from agent.config import LearnerConfig, help_policy
from agent.errors import KtRejected
from agent.fl import FlConfig, apply_global, fedavg, global_from_tensors, is_round_batch, model_to_update, participants
from agent.kt.coordinator import AskHelper, HelpCoordinator, Install, QueryHelpers, Report
from agent.kt.helper_selection import CandidateInfo
from agent.learner import BatchResult, Learner
from agent.served import LabelsRefused, ServedStore
from agent.settings import DaemonKnobs
from broker.wire import encode
from edge_sim.inputs import LabelPlan, LateLabels, Request, RequestFeed, SeedInputs, node_learner
from edge_sim.modes import FEDAVG, learner_values
from edge_sim.records import ModeRun, NodeRecord, node_ids
from edge_sim.scenario import Scenario
from edge_sim.transports.base import Progress
from mds.similarity import eligible_mask, top_k


class NodeLog:
    """One node's record, events and counters, named as the agent daemon names them."""

    def __init__(self) -> None:
        self.record = NodeRecord()
        self._bytes: dict[str, float] = defaultdict(float)
        self._times: dict[str, list[float]] = defaultdict(list)

    def batch(self, result: BatchResult, labels: np.ndarray) -> None:
        """The errors of one served batch; an unlabelled one is scored on the labels held back."""
        rec = self.record
        if result.served_error is not None:
            rec.served_error.append(result.served_error)
            rec.target_error.append(result.target_error if result.target_error is not None else math.nan)
            rec.class_errors.append(result.class_errors)
        else:
            y_hat = result.y_hat.numpy()
            rec.served_error.append(float((y_hat != labels).mean()))
            rec.target_error.append(math.nan)
            rec.class_errors.append({int(c): float((y_hat[labels == c] != c).mean()) for c in np.unique(labels)})
        rec.helpers.append(len(result.helpers))
        self.time("batch", sum(result.timings.values()))
        self.learnt(result)

    def learnt(self, result: BatchResult) -> None:
        """The events of what a batch's labels did (with the batch, or later)."""
        for helper_id in result.promoted:
            self.event("helper_promoted", helper=helper_id, batch=result.batch_index)
        for helper_id in result.discarded:
            self.event("helper_discarded", helper=helper_id, batch=result.batch_index)

    def event(self, kind: str, **detail: Any) -> None:
        self.record.events.append({"kind": kind, **detail})

    def count(self, key: str, size: int) -> None:
        self._bytes[key] += size

    def time(self, name: str, seconds: float) -> None:
        self._times[name].append(seconds)

    def stats(self) -> dict[str, float]:
        """The daemon's ``stats`` event: bytes per operation, then each timing's mean (ms) and count."""
        out = dict(self._bytes)
        for name, values in self._times.items():
            out[f"{name}_ms"] = 1000.0 * float(np.mean(values))
            out[f"{name}_n"] = len(values)
        return out


class InProcessHelp:
    """Every knowledge transfer of the fleet: each learner's help coordinator, and in-process
    stand-ins for the MdS and the KT channel; the coordinators' commands are function calls."""

    def __init__(self, ids: list[str], learners: list[Learner], logs: list[NodeLog]) -> None:
        self.ids = ids
        self.learners = learners
        self.logs = logs
        self.coordinators = [HelpCoordinator(help_policy(lr.config)) for lr in learners]
        self._index = {node: i for i, node in enumerate(ids)}

    def find_helpers(self, asker: int, classes: Sequence[int], k: int) -> list[int]:
        """The MdS's answer: the top-k nodes by similarity among those holding every class asked for."""
        hists = np.stack([lr.histogram() for lr in self.learners]).astype(np.float64)
        mask = eligible_mask(
            node_ids=self.ids,
            online=np.ones(len(self.ids), dtype=bool),
            arch_ids=[lr.arch_id for lr in self.learners],
            lineages=[lr.lineage for lr in self.learners],
            asker_id=self.ids[asker],
            arch_id=self.learners[asker].arch_id,
            lineage=self.learners[asker].lineage,
            hists=hists,
            required_classes=list(classes),
        )
        if not mask.any():
            return []
        idx, _ = top_k(hists[asker], hists, k, eligible=mask)
        return [int(i) for i in idx]

    def after_batch(self, node: int, result: BatchResult) -> None:
        """Give node ``node``'s coordinator what the batch showed and carry out its commands."""
        if not result.learnt:
            return
        learner, coordinator, log = self.learners[node], self.coordinators[node], self.logs[node]
        # Now, in served batches (as the daemon counts): late labels belong to an older batch.
        now = learner.batch_index - 1
        todo = deque(coordinator.on_batch(now, drift=result.drift_report, dropped=result.dropped, pool=learner.pool_state()))
        while todo:
            command = todo.popleft()
            pool = learner.pool_state()
            if isinstance(command, QueryHelpers):
                found = self.find_helpers(node, command.classes, command.k)
                todo.extend(coordinator.on_candidates(command.flow, [CandidateInfo(self.ids[i]) for i in found], pool=pool))
            elif isinstance(command, AskHelper):
                helper = self._index[command.helper]
                t0 = time.perf_counter()
                try:
                    blob = self.learners[helper].kt_blob(command.classes, command.z, command.value_codec)
                except KtRejected as exc:
                    todo.extend(coordinator.on_answer(command.flow, None, error=str(exc), pool=pool))
                    continue
                self.logs[helper].time("pick", time.perf_counter() - t0)
                self.logs[helper].count("kt_out", len(blob))
                self.logs[helper].event("kt_served", classes=list(command.classes), z=command.z, bytes=len(blob))
                log.count("kt_in", len(blob))
                todo.extend(coordinator.on_answer(command.flow, blob, pool=pool))
            elif isinstance(command, Install):
                try:
                    installed = learner.accept_kt_blob(
                        command.blob, classes=command.classes, z=command.z, source=command.source, baseline=command.baseline
                    )
                except KtRejected as exc:
                    todo.extend(coordinator.install_refused(command.flow, str(exc), pool=pool))
                    continue
                log.time("install", installed.seconds)
                log.event(
                    "helper_installed", helper=command.source, helper_id=installed.helper_id, classes=list(installed.classes),
                    params=installed.count, bytes=len(command.blob), batches=learner.batch_index - command.detected_batch - 1,
                    ms=(time.perf_counter() - command.detected_at) * 1000.0, pool=len(learner.pool),
                )
                todo.extend(coordinator.installed(command.flow, installed.classes, pool=learner.pool_state()))
            elif isinstance(command, Report):
                log.event(command.kind, **command.detail)


class InProcessFedAvg:
    """FedAvg rounds without a bus: after the batch a round falls on, the participants that learnt
    from it send their model, the average is taken as the aggregator takes it, and every node adopts it."""

    def __init__(self, config: FlConfig, ids: list[str], learners: list[Learner], logs: list[NodeLog]) -> None:
        self.config = config
        self.ids = ids
        self.learners = learners
        self.logs = logs
        self._samples = [0] * len(ids)

    def after_batch(self, t: int, learnt: Sequence[int]) -> None:
        """After batch ``t``: ``learnt``, the samples each node learnt from since the batch before."""
        for i, samples in enumerate(learnt):
            self._samples[i] += samples
        round_ = is_round_batch(self.config, t)
        if round_ is None:
            return
        # Like a daemon, a participant sends its model after a batch it learnt from (or whose turn brought labels).
        chosen = set(participants(self.config, round_))
        senders = sorted((node, i) for i, node in enumerate(self.ids) if node in chosen and learnt[i] > 0)
        if not senders:
            return
        updates = []
        for node, i in senders:
            update = model_to_update(self.learners[i].model, job=self.config.job, round=round_, node_id=node, samples=self._samples[i])
            self.logs[i].count("fl_out", len(encode(update)))
            self.logs[i].event("fl_sent", round=round_)
            self._samples[i] = 0
            updates.append(update)
        message = global_from_tensors(fedavg(updates), job=self.config.job, round=round_, samples=sum(u.samples for u in updates))
        size = len(encode(message))
        for learner, log in zip(self.learners, self.logs):
            apply_global(learner.model, message)
            log.count("fl_in", size)
            log.event("fl_adopted", round=round_)


class InProcessTransport:
    """Scenarios in this process: a fresh set of learners per mode.

    From its creation on, torch runs on ``threads`` threads in this process: the base model's
    pre-training too, whose weights (and so every number after) depend on the thread count.
    """

    name = "inprocess"

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(threads)

    def run_mode(self, scn: Scenario, mode: str, inputs: SeedInputs, progress: Progress | None = None) -> ModeRun:
        seed = inputs.seed
        config = LearnerConfig.model_validate(learner_values(scn.learner, mode))
        ids = node_ids(seed, mode, scn.nodes)
        learners = [node_learner(scn, config, inputs, seed * 100 + i) for i in range(scn.nodes)]
        logs = [NodeLog() for _ in ids]
        kt = InProcessHelp(ids, learners, logs)
        rounds = None
        if mode == FEDAVG:
            fl = FlConfig(job=f"fl-s{seed}", every=scn.fedavg.every, members=ids, per_round=scn.fedavg.per_round, seed=seed)
            rounds = InProcessFedAvg(fl, ids, learners, logs)
        feed = RequestFeed(scn, seed, inputs.data, inputs.rest)
        plan = LabelPlan(scn, seed)
        knobs = DaemonKnobs.model_validate(scn.daemon)
        stores = [ServedStore(knobs.served_max_batches, int(knobs.served_max_mb * (1 << 20))) for _ in ids]
        started = time.perf_counter()
        for t in range(scn.batches):
            requests = feed.batch(t)
            learnt = [0] * len(ids)
            if plan.inline:
                for i, request in enumerate(requests):
                    result = learners[i].process_batch(*_tensors(request))
                    logs[i].batch(result, request.y)
                    kt.after_batch(i, result)
                    learnt[i] = len(request.y) if request.labelled else 0
            else:
                for late in plan.due(t):
                    learnt[late.node] += _learn_late(learners[late.node], stores[late.node], late, logs[late.node], kt)
                for i, request in enumerate(requests):
                    served = learners[i].serve(torch.from_numpy(request.x))
                    stores[i].put(t, served)
                    logs[i].batch(served.result, request.y)
                for late in plan.plan(t, requests):
                    learnt[late.node] += _learn_late(learners[late.node], stores[late.node], late, logs[late.node], kt)
            if rounds is not None:
                rounds.after_batch(t, learnt)
            if progress:
                progress(f"seed {seed} {mode}", t + 1, scn.batches)
        for log in logs:
            log.record.stats = log.stats()
        nodes = {node: log.record for node, log in zip(ids, logs)}
        return ModeRun(mode=mode, seed=seed, nodes=nodes, seconds=time.perf_counter() - started, complete=True, num_classes=inputs.data.num_classes)


def _learn_late(learner: Learner, store: ServedStore, late: LateLabels, log: NodeLog, kt: InProcessHelp) -> int:
    """Labels of a batch ``learner`` served (its ``store`` keeps it): learn as the daemon does; the samples learnt."""
    try:
        result, _ = store.learn(learner, late.batch, late.y, late.indices)
    except LabelsRefused as exc:
        log.event("rejected", reason=str(exc), batch_id=late.batch, context="labels")
        return 0
    log.learnt(result)
    kt.after_batch(late.node, result)
    return len(late.y) if result.learnt else 0


def _tensors(request: Request) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.from_numpy(request.x), torch.from_numpy(request.y) if request.labelled else None
