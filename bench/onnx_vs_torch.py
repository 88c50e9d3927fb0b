"""Serving engine: eager torch against onnxruntime, alone and in a training agent's served path.

1. Inference alone: for every model and batch size, torch ``softmax(model(x))`` in eval mode under
   ``no_grad`` and ``OnnxModel.predict_proba`` (the same frozen model, softmax included) run
   alternately on the same input. Reported: p50 per call and the paired ratio torch ÷ onnx.
2. The served path: a ``Learner`` with one boosted helper in its pool runs ``process_batch`` on
   labelled batches (predict + train, as the agent does), with ``learner.inference`` None (torch),
   an ``EnsembleRuntime`` (``runtime = "onnx"``, as ``agent.daemon`` sets it: helpers in
   onnxruntime, target in torch), and, for comparison, a hook that exports the target again after
   every train step (what an ONNX target costs an agent that trains every batch; without the
   weight comparison that decided it, so a lower bound). Reported: p50 per batch and the paired
   ratios torch ÷ each.

One thread each, all in this process, interleaved; > 1: faster than torch. ARCHITECTURE §8 quotes
≈0.4 s vs ≈0.08 s for a 400-image CNN pass.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch

from agent.config import LearnerConfig
from agent.kt.pool import StaticDiscardConfig
from agent.learner import Learner
from agent.models import build_model
from agent.runtime import EnsembleRuntime, OnnxModel
from bench.common import interleave, paired_ratio, parse_args, setup, stats, summary_row, table, write_json

# Sample shapes: the CNN gets images (1, 28, 28), because exporting it from flat (784,) rows fails
# (``MobileNetS.forward`` reshapes with ``round(x.shape[1] ** 0.5)``, which the tracer cannot take).
MODELS = {"mlp4": (10, (784,)), "intrusion_dnn": (5, (122,)), "mobilenet_s": (10, (1, 28, 28))}
BATCHES = (1, 32, 200, 400)
# Repetitions by model: the CNN at batch 400 takes ~0.5 s a call in torch on this box.
REPS = {True: {"mlp4": 20, "intrusion_dnn": 20, "mobilenet_s": 3},
        False: {"mlp4": 200, "intrusion_dnn": 200, "mobilenet_s": 15}}
# The served path at the scenario's batch size; the CNN, ~2 s a batch here, only in the full run.
SERVED_BATCH = 200
SERVED_REPS = {True: {"mlp4": 20, "intrusion_dnn": 20},
               False: {"mlp4": 100, "intrusion_dnn": 100, "mobilenet_s": 8}}
SERVED_CASES = ("torch", "onnx", "onnx_reexport")


def measure(arch: str, batch: int, reps: int) -> dict[str, Any]:
    num_classes, shape = MODELS[arch]
    model = build_model(arch, num_classes, seed=0).eval()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
    onnx = OnnxModel(model, x, intra_op_num_threads=1)

    @torch.no_grad()
    def eager() -> torch.Tensor:
        return torch.softmax(model(x), dim=1)

    def ort() -> torch.Tensor:
        return onnx.predict_proba(x)

    # Same model, same numbers: a speed-up that changed the answer would be no speed-up.
    if not torch.allclose(eager(), ort(), atol=1e-4):
        raise RuntimeError(f"{arch} batch {batch}: torch and onnxruntime disagree")
    samples = interleave({"torch": eager, "onnx": ort}, reps=reps, warmup=2)
    return {
        "arch": arch,
        "batch": batch,
        "torch_ms": stats(samples["torch"], 1e3),
        "onnx_ms": stats(samples["onnx"], 1e3),
        "torch_over_onnx": paired_ratio(samples["torch"], samples["onnx"]),
    }


class ReexportTarget:
    """Inference hook for comparison only: helpers exported once, the target on every call."""

    def __init__(self, learner: Learner, example: torch.Tensor) -> None:
        self.helpers = {h.helper_id: OnnxModel(h.model, example) for h in learner.pool}

    def __call__(self, learner: Learner, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        target = OnnxModel(learner.model, x).predict_proba(x)
        return target, [self.helpers[h.helper_id].predict_proba(x) for h in learner.pool]


def _labelled(arch: str, n: int, classes: range | tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape = MODELS[arch]
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(classes)
    return torch.rand(n, *shape, generator=g), pool[torch.randint(len(pool), (n,), generator=g)]


def _node_with_helper(arch: str) -> Learner:
    """A target with one frozen boosted helper for the last class, which stays pooled for the whole run.

    Frozen (``kt_apply = "boost"``, the class-aware operator): what onnxruntime serves. The default's
    live copy of a helper trains every batch, so it stays on torch like the target.
    """
    num_classes, _ = MODELS[arch]
    base = build_model(arch, num_classes, seed=0).state_dict()
    config = LearnerConfig(
        discard=StaticDiscardConfig(n_batches=1_000_000), drop_unhelpful=False, kt_apply="boost", operator={"type": "class_aware"}
    )
    target, helper = (
        Learner(build_model(arch, num_classes, seed=0), num_classes=num_classes, config=config, base_state=base, seed=i)
        for i in range(2)
    )
    target.process_batch(*_labelled(arch, SERVED_BATCH, range(num_classes - 1), seed=1))
    helper.process_batch(*_labelled(arch, SERVED_BATCH, (num_classes - 1,), seed=2))
    target.install(helper.significant_for((num_classes - 1,), 0.5))
    return target


def measure_served(arch: str, reps: int) -> dict[str, Any]:
    num_classes, _ = MODELS[arch]
    batches = [_labelled(arch, SERVED_BATCH, range(num_classes), seed=10 + i) for i in range(8)]
    node = _node_with_helper(arch)
    nodes = {name: copy.deepcopy(node) for name in SERVED_CASES}
    runtime = EnsembleRuntime(intra_op_num_threads=1)
    nodes["onnx"].inference = runtime
    x = batches[0][0]
    nodes["onnx_reexport"].inference = ReexportTarget(nodes["onnx_reexport"], x)
    for name in SERVED_CASES[1:]:
        if not torch.allclose(nodes["torch"].predict(x), nodes[name].predict(x), atol=1e-4):
            raise RuntimeError(f"{arch}: {name} serves other probabilities than torch")
    predict_s: dict[str, list[float]] = {name: [] for name in SERVED_CASES}

    def step(name: str) -> Callable[[], None]:
        order = itertools.cycle(batches)

        def one() -> None:
            predict_s[name].append(nodes[name].process_batch(*next(order)).timings["predict"])

        return one

    warmup = 2
    samples = interleave({name: step(name) for name in SERVED_CASES}, reps=reps, warmup=warmup)
    # One export for the one helper, served all along, however many train steps: the point of the design.
    if runtime.exports != 1 or len(nodes["onnx"].pool) != 1:
        raise RuntimeError(f"{arch}: {runtime.exports} exports, {len(nodes['onnx'].pool)} pooled helpers; expected 1 and 1")
    return {
        "arch": arch,
        "batch": SERVED_BATCH,
        "helpers": len(node.pool),
        "onnx_exports": runtime.exports,
        "batch_ms": {name: stats(samples[name], 1e3) for name in SERVED_CASES},
        "predict_ms": {name: stats(predict_s[name][warmup:], 1e3) for name in SERVED_CASES},
        "torch_over": {name: paired_ratio(samples["torch"], samples[name]) for name in SERVED_CASES[1:]},
    }


def _summary(arch: str, results: list[dict[str, Any]], served: dict[str, Any] | None) -> str:
    text = "inference " + ", ".join(f"b{r['batch']} {r['torch_over_onnx']:.2f}×" for r in results if r["arch"] == arch)
    if served is None:
        return text
    ratios = served["torch_over"]
    return (f"{text}; served batch (predict + train, one helper) b{served['batch']} {ratios['onnx']:.2f}×, "
            f"target re-exported every batch {ratios['onnx_reexport']:.2f}×")


def run(quick: bool) -> dict[str, Any]:
    setup(1)
    results = [measure(arch, b, REPS[quick][arch]) for arch in MODELS for b in BATCHES]
    print(table(["model", "batch", "torch p50 ms", "onnx p50 ms", "torch ÷ onnx"],
                [[r["arch"], r["batch"], round(r["torch_ms"]["p50"], 3), round(r["onnx_ms"]["p50"], 3),
                  round(r["torch_over_onnx"], 2)] for r in results]))
    served = {arch: measure_served(arch, reps) for arch, reps in SERVED_REPS[quick].items()}
    print(f"\nserved path, batch {SERVED_BATCH}, one helper pooled: process_batch (predict + train) p50 ms, predict p50 ms")
    print(table(["model", "torch", "onnx", "onnx, target re-exported", "predict: torch", "onnx", "re-exported",
                 "torch ÷ onnx", "torch ÷ re-exported"],
                [[r["arch"], *(round(r["batch_ms"][c]["p50"], 2) for c in SERVED_CASES),
                  *(round(r["predict_ms"][c]["p50"], 2) for c in SERVED_CASES),
                  round(r["torch_over"]["onnx"], 2), round(r["torch_over"]["onnx_reexport"], 2)] for r in served.values()]))
    summary = [
        summary_row(f"torch ÷ onnxruntime, {arch}", "—", "—", _summary(arch, results, served.get(arch)), None)
        for arch in MODELS
    ]
    path = write_json("onnx_vs_torch", quick=quick,
                      settings={"reps": REPS[quick], "batches": BATCHES, "served_batch": SERVED_BATCH,
                                "served_reps": SERVED_REPS[quick]},
                      results={"inference": results, "served": served}, summary=summary)
    print(f"\nwritten {path}")
    return {"results": results, "served": served, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
