"""The in-process experiment: N learners, one shared base model, a drift at the target, and CLUE
against learning in isolation and the paper's alternatives — no MQTT, same learner as the daemon.

Every mode runs the same workload with the same seed. Helpers are found the way the MdS finds
them (similarity top-k over class histograms, excluding nodes that never saw the classes asked
for), and knowledge travels as real codec blobs, so bytes are what the wire would carry.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from agent.config import LearnerConfig, help_policy
from agent.errors import KtRejected
from agent.kt import codec
from agent.kt.coordinator import AskHelper, HelpCoordinator, Install, QueryHelpers
from agent.kt.helper_selection import CandidateInfo
from agent.learner import BatchResult, Learner
from agent.models import build_model
from edge_sim.datasets.images import load_fashion_mnist
from edge_sim.workloads import BatchStream, Workload, introduction_workload, split_pool
from mds.similarity import eligible_mask, top_k

MODES: dict[str, dict[str, Any]] = {
    "isolated": {"kt_apply": "off"},
    "clue_mean": {"kt_apply": "boost", "operator": {"type": "mean"}},
    "clue_class_aware": {"kt_apply": "boost", "operator": {"type": "class_aware"}},
    # The control measures what random positions give once installed, so the install-time probe
    # (which refuses most of them as worse than chance) is off for it.
    "random_mask": {"kt_apply": "boost", "operator": {"type": "class_aware"}, "selection": "random", "helper_probe": False},
    "zero_filled": {"kt_apply": "zero_filled", "operator": {"type": "mean"}},
    "replace": {"kt_apply": "replace"},
    "average": {"kt_apply": "average"},
}


@dataclass(frozen=True)
class ExperimentSettings:
    """One experiment: every knob that changes its numbers."""

    nodes: int = 5
    batch_size: int = 200
    batches: int = 100
    drift_at: int = 40
    new_share: float = 0.25
    initial_classes: int = 8
    helpers: Literal["overlapping", "non_overlapping"] = "overlapping"
    workload: Literal["introduction", "fluctuation"] = "introduction"
    arch: str = "mlp4"
    pretrain_samples: int = 2000
    pretrain_epochs: int = 5
    lr: float = 1e-3
    z: float = 0.5
    window: int = 3
    margin: float = 0.1
    value_codec: Literal["float32", "float16", "int8", "int4_delta"] = "float16"
    picker_samples: int = 0
    class_aware_w: float = 0.95
    recovery_tolerance: float = 0.02
    post_drift_batches: int = 30
    threads: int = 1


@dataclass
class NodeTrace:
    served_error: list[float] = field(default_factory=list)
    target_error: list[float] = field(default_factory=list)
    class_errors: list[dict[int, float]] = field(default_factory=list)
    helpers: list[int] = field(default_factory=list)


@dataclass
class RunResult:
    """One mode, one seed: the target's trace and what knowledge transfer cost."""

    mode: str
    seed: int
    target: NodeTrace
    kt_events: list[dict[str, Any]]
    adaptability: int
    recovered: bool
    pre_drift_error: float
    post_drift_error: float
    new_class_error: float
    unseen_class_error: float | None
    seconds: float


def pretrain_base(
    arch: str, x: np.ndarray, y: np.ndarray, *, num_classes: int, epochs: int, seed: int
) -> dict[str, torch.Tensor]:
    """The one base model every node starts from (the paper fine-tunes one model and deploys it)."""
    model = build_model(arch, num_classes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adaptability(errors: Sequence[float], drift_at: int, *, window: int, tolerance: float, pre_drift: float) -> tuple[int, bool]:
    """Batches from the drift onset until the rolling error is back within ``tolerance`` of ``pre_drift``.

    Returns (batches, recovered); a run that never recovers counts every post-drift batch.
    """
    for t in range(drift_at, len(errors)):
        lo = max(drift_at, t - window + 1)
        if t - lo + 1 < window:
            continue
        if float(np.mean(errors[lo : t + 1])) <= pre_drift + tolerance:
            return t - drift_at + 1, True
    return len(errors) - drift_at, False


class InProcessFleet:
    """N learners, each with its help coordinator, and an in-process stand-in for the MdS and the
    KT channel: the coordinators' commands are carried out with function calls."""

    def __init__(self, learners: list[Learner]) -> None:
        self.learners = learners
        self.coordinators = [HelpCoordinator(help_policy(lr.config)) for lr in learners]

    def find_helpers(self, asker: int, classes: Sequence[int], k: int) -> list[int]:
        """The MdS's answer: the top-k nodes by similarity among those holding every class asked for."""
        hists = np.stack([lr.histogram() for lr in self.learners]).astype(np.float64)
        ids = [str(i) for i in range(len(self.learners))]
        mask = eligible_mask(
            node_ids=ids,
            online=np.ones(len(ids), dtype=bool),
            arch_ids=[lr.arch_id for lr in self.learners],
            lineages=[lr.lineage for lr in self.learners],
            asker_id=ids[asker],
            arch_id=self.learners[asker].arch_id,
            lineage=self.learners[asker].lineage,
            hists=hists,
            required_classes=list(classes),
        )
        if not mask.any():
            return []
        idx, _ = top_k(hists[asker], hists, k, eligible=mask)
        return [int(i) for i in idx]

    def after_batch(self, node: int, result: BatchResult) -> list[dict[str, Any]]:
        """Give node ``node``'s coordinator what the batch showed; returns the transfers it made."""
        if not result.learnt:
            return []
        learner, help = self.learners[node], self.coordinators[node]
        todo = deque(help.on_batch(result.batch_index, drift=result.drift_report, dropped=result.dropped, pool=learner.pool_state()))
        transfers: list[dict[str, Any]] = []
        pick_seconds = 0.0
        while todo:
            command = todo.popleft()
            pool = learner.pool_state()
            if isinstance(command, QueryHelpers):
                found = self.find_helpers(node, command.classes, command.k)
                todo.extend(help.on_candidates(command.flow, [CandidateInfo(str(i)) for i in found], pool=pool))
            elif isinstance(command, AskHelper):
                t0 = time.perf_counter()
                try:
                    blob = self.learners[int(command.helper)].kt_blob(command.classes, command.z, command.value_codec)
                except KtRejected as exc:
                    todo.extend(help.on_answer(command.flow, None, error=str(exc), pool=pool))
                    continue
                pick_seconds = time.perf_counter() - t0
                todo.extend(help.on_answer(command.flow, blob, pool=pool))
            elif isinstance(command, Install):
                reason = help.active.reason if help.active is not None else ""
                try:
                    installed = learner.accept_kt_blob(
                        command.blob, classes=command.classes, z=command.z, source=command.source, baseline=command.baseline
                    )
                except KtRejected as exc:
                    todo.extend(help.install_refused(command.flow, str(exc), pool=pool))
                    continue
                transfers.append({
                    "helper": int(command.source),
                    "classes": list(command.classes),
                    "bytes": len(command.blob),
                    "params": installed.count,
                    "bytes_per_param": len(command.blob) / max(1, installed.count),
                    "pick_seconds": pick_seconds,
                    "install_seconds": installed.seconds,
                    "reason": reason,
                })
                todo.extend(help.installed(command.flow, installed.classes, pool=learner.pool_state()))
        return transfers


def _learner_config(settings: ExperimentSettings, mode: str) -> LearnerConfig:
    base = {
        "z": settings.z,
        "lr": settings.lr,
        "value_codec": settings.value_codec,
        "picker_samples": settings.picker_samples,
        "drift": {"type": "rolling_error", "window": settings.window, "margin": settings.margin},
    }
    base.update(MODES[mode])
    if base.get("operator", {}).get("type") == "class_aware":
        base["operator"] = {"type": "class_aware", "w": settings.class_aware_w}
    return LearnerConfig.model_validate(base)


def load_data(arch: str) -> tuple[np.ndarray, np.ndarray, int]:
    x, y = load_fashion_mnist(split="train")
    return x.astype(np.float32), y.astype(np.int64), 10


def run_mode(
    settings: ExperimentSettings,
    mode: str,
    seed: int,
    data: tuple[np.ndarray, np.ndarray, int],
    base_cache: dict[int, dict[str, torch.Tensor]] | None = None,
) -> RunResult:
    """Run every node of the fleet for ``settings.batches`` batches in one mode; report the target."""
    torch.set_num_threads(settings.threads)
    x, y, num_classes = data
    workload: Workload = introduction_workload(
        helpers=settings.helpers,
        kind=settings.workload,
        num_classes=num_classes,
        initial=settings.initial_classes,
        drift_at=settings.drift_at,
        new_share=settings.new_share,
    )
    pre_idx, rest = split_pool(y, holdout_classes=workload.target_classes, holdout=settings.pretrain_samples, seed=seed)
    if base_cache is not None and seed in base_cache:
        base = base_cache[seed]
    else:
        base = pretrain_base(
            settings.arch, x[pre_idx], y[pre_idx], num_classes=num_classes, epochs=settings.pretrain_epochs, seed=seed
        )
        if base_cache is not None:
            base_cache[seed] = base
    config = _learner_config(settings, mode)
    learners = []
    for node in range(settings.nodes):
        model = build_model(settings.arch, num_classes)
        model.load_state_dict(copy.deepcopy(base))
        learners.append(Learner(model, num_classes=num_classes, config=config, base_state=base, seed=seed * 100 + node))
    streams = [BatchStream(x, y, indices=rest, seed=seed * 1000 + node) for node in range(settings.nodes)]
    fleet = InProcessFleet(learners)
    trace = NodeTrace()
    kt_events: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for batch in range(settings.batches):
        for node, (learner, stream) in enumerate(zip(learners, streams)):
            bx, by = stream.batch(workload.mix(node, batch), settings.batch_size)
            result = learner.process_batch(torch.from_numpy(bx), torch.from_numpy(by))
            if node == 0:
                trace.served_error.append(result.served_error)
                trace.target_error.append(result.target_error)
                trace.class_errors.append(result.class_errors)
                trace.helpers.append(len(result.helpers))
            for event in fleet.after_batch(node, result):
                event.update(node=node, batch=batch)
                kt_events.append(event)
    seconds = time.perf_counter() - t0
    return _summarise(settings, workload, mode, seed, trace, kt_events, seconds)


def _class_error(trace: NodeTrace, start: int, stop: int, classes: Sequence[int]) -> float:
    errs = [e[c] for e in trace.class_errors[start:stop] for c in classes if c in e]
    return float(np.mean(errs)) if errs else math.nan


def _summarise(settings, workload, mode, seed, trace, kt_events, seconds) -> RunResult:
    d = settings.drift_at
    pre = float(np.mean(trace.served_error[max(0, d - 10) : d]))
    adapt, recovered = adaptability(
        trace.served_error, d, window=settings.window, tolerance=settings.recovery_tolerance, pre_drift=pre
    )
    stop = min(len(trace.served_error), d + settings.post_drift_batches)
    unseen = tuple(c for c in workload.target_classes if c not in workload.helper_classes)
    return RunResult(
        mode=mode,
        seed=seed,
        target=trace,
        kt_events=kt_events,
        adaptability=adapt,
        recovered=recovered,
        pre_drift_error=pre,
        post_drift_error=float(np.mean(trace.served_error[d:stop])),
        new_class_error=_class_error(trace, d, stop, workload.new_classes),
        unseen_class_error=_class_error(trace, d, stop, unseen) if unseen else None,
        seconds=seconds,
    )


def codec_payloads(settings: ExperimentSettings, seed: int, data) -> dict[str, float]:
    """Bytes per transferred parameter for each value codec, on a real helper's answer at the drift."""
    x, y, num_classes = data
    workload = introduction_workload(helpers="overlapping", num_classes=num_classes, initial=settings.initial_classes)
    pre_idx, rest = split_pool(y, holdout_classes=workload.target_classes, holdout=settings.pretrain_samples, seed=seed)
    base = pretrain_base(settings.arch, x[pre_idx], y[pre_idx], num_classes=num_classes, epochs=settings.pretrain_epochs, seed=seed)
    model = build_model(settings.arch, num_classes)
    model.load_state_dict(copy.deepcopy(base))
    helper = Learner(model, num_classes=num_classes, config=_learner_config(settings, "clue_class_aware"), base_state=base)
    stream = BatchStream(x, y, indices=rest, seed=seed)
    for batch in range(settings.drift_at):
        bx, by = stream.batch(workload.mix(1, batch), settings.batch_size)
        helper.process_batch(torch.from_numpy(bx), torch.from_numpy(by))
    sig = helper.significant_for(workload.new_classes, settings.z)
    out = {}
    for name in codec.VALUE_CODECS:
        if name not in codec.DELTA_CODECS:
            out[name] = codec.bytes_per_param(codec.encode_blob(sig, value_codec=name), sig)
        out[f"{name}+delta"] = codec.bytes_per_param(
            codec.encode_blob(sig, value_codec=name, base=helper._base_params), sig
        )
    return out


def run_experiment(
    settings: ExperimentSettings,
    modes: Sequence[str],
    seeds: Sequence[int],
    *,
    data=None,
    progress: Callable[[str], None] | None = None,
) -> list[RunResult]:
    data = data or load_data(settings.arch)
    base_cache: dict[int, dict[str, torch.Tensor]] = {}
    results = []
    for seed in seeds:
        for mode in modes:
            r = run_mode(settings, mode, seed, data, base_cache)
            if progress:
                progress(f"{settings.helpers:>15} seed {seed} {mode:>17}: adapt {r.adaptability:2d} "
                         f"post-drift err {r.post_drift_error:.3f} ({r.seconds:.1f}s)")
            results.append(r)
    return results


def summarise(results: Sequence[RunResult], baseline: str = "isolated") -> dict[str, dict[str, Any]]:
    """Per mode, mean ± std over seeds, and the per-seed ratio baseline ÷ mode of adaptability."""
    by_seed = {(r.mode, r.seed): r for r in results}
    out: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r.mode for r in results):
        rs = [r for r in results if r.mode == mode]
        ratios = [by_seed[(baseline, r.seed)].adaptability / r.adaptability for r in rs if (baseline, r.seed) in by_seed]
        kt_bytes = [e["bytes"] for r in rs for e in r.kt_events]
        bpp = [e["bytes_per_param"] for r in rs for e in r.kt_events]

        def ms(values):
            v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
            return (float(np.mean(v)), float(np.std(v))) if v else (math.nan, math.nan)

        out[mode] = {
            "seeds": len(rs),
            "adaptability": ms([r.adaptability for r in rs]),
            "recovered": sum(r.recovered for r in rs),
            "ratio_vs_" + baseline: ms(ratios),
            "pre_drift_error": ms([r.pre_drift_error for r in rs]),
            "post_drift_error": ms([r.post_drift_error for r in rs]),
            "new_class_error": ms([r.new_class_error for r in rs]),
            "unseen_class_error": ms([r.unseen_class_error for r in rs]),
            "kt_transfers": len(kt_bytes),
            "kt_bytes": ms(kt_bytes),
            "kt_bytes_per_param": ms(bpp),
        }
    return out


def result_dict(r: RunResult) -> dict[str, Any]:
    return asdict(r)
