"""Split serving: the frozen backbone on torch float32, onnxruntime int8 and LiteRT int8, ÷ torch float32.

The model is ``examples/frozen-backbone/cnn_backbone.py`` (a 3-block CNN backbone, ≈93k
parameters, ≈7.5 M multiply-adds a 28×28 image, and a 2-layer head), trained whole on 8,000
Fashion-MNIST training images (3 epochs), then split (``trainable = ["head."]``): the backbone frozen, the
head the learner's model. The backbone is exported by `agent.export.export_backbone` (calibrated
on 512 other training images, checked against torch) to int8 QDQ ONNX and, where the ``[litert]``
extra is installed, to int8 LiteRT.

1. **Served batch** (batch 200, labelled, as the agent serves it): the backbone's features once,
   then ``Learner.process_batch`` on the head (predict with one pooled helper + train). Each
   engine has its own copy of the same learner; cases interleaved, ratios paired per repetition.
2. **Backbone alone**: the features of a batch of 200.
3. **Head accuracy** on the 10,000 Fashion-MNIST test images with each engine's features, and the
   change in points against torch float32.
4. Where torch finds a CUDA device: the served batch (predict + train) and the picker's
   sensitivity scores with the backbone and head on CUDA ÷ on the CPU.

One thread each, in this process; a ratio < 1 is faster than torch float32. The issue's targets:
int8 head accuracy within 1 point, served batch ≤ 0.5× torch float32 on this CPU.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.backbone import BackboneEngine, LiteRtBackbone, OnnxBackbone, Split, TorchBackbone, split_model
from agent.config import LearnerConfig
from agent.export import export_backbone, head_accuracy, litert_available
from agent.kt.pool import StaticDiscardConfig
from agent.learner import Learner
from agent.models import freeze_untrainable
from bench.common import interleave, paired_ratio, parse_args, setup, stats, summary_row, table, write_json

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "frozen-backbone"
BATCH = 200
REPS = {True: 8, False: 30}


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from edge_sim.datasets.images import load_fashion_mnist

    (x_tr, y_tr), (x_te, y_te) = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    return (x_tr.reshape(-1, 1, 28, 28).astype(np.float32), y_tr.astype(np.int64),
            x_te.reshape(-1, 1, 28, 28).astype(np.float32), y_te.astype(np.int64))


def trained_split(x: np.ndarray, y: np.ndarray, *, samples: int = 8000, epochs: int = 3, seed: int = 0) -> Split:
    """The example's CNN trained whole on ``samples`` images, then split with the backbone frozen."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    from cnn_backbone import factory

    torch.manual_seed(seed)
    model = factory(10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = np.random.default_rng(seed).permutation(samples)
        for i in range(0, samples, 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            opt.step()
    freeze_untrainable(model, ["head."])
    return split_model(model.eval(), backbone="backbone", head="head", input_shape=(1, 28, 28))


def _learner(split: Split, x: np.ndarray, y: np.ndarray) -> Learner:
    """A head learner with one frozen boosted helper pooled for the whole run (what the operator combines)."""
    config = LearnerConfig(discard=StaticDiscardConfig(n_batches=1_000_000), drop_unhelpful=False, kt_apply="boost", operator={"type": "class_aware"})
    base = copy.deepcopy(split.head.state_dict())
    feats = TorchBackbone(split.backbone).features(torch.from_numpy(x[:BATCH]))
    target, helper = (
        Learner(copy.deepcopy(split.head), num_classes=10, config=config, base_state=base, seed=i, input_shape=split.feature_shape, backbone_id=split.backbone_id)
        for i in range(2)
    )
    target.process_batch(feats, torch.from_numpy(y[:BATCH]))
    helper.process_batch(feats, torch.from_numpy(y[:BATCH]))
    target.install(helper.significant_for((8, 9), 0.5))
    return target


def engines(split: Split, x_cal: np.ndarray, y_cal: np.ndarray, workdir: Path) -> dict[str, BackboneEngine]:
    out: dict[str, BackboneEngine] = {"torch_fp32": TorchBackbone(split.backbone)}
    export_backbone(split, x_cal, y_cal, onnx=workdir / "backbone.int8.onnx")
    out["onnxruntime_int8"] = OnnxBackbone(workdir / "backbone.int8.onnx")
    if litert_available():
        export_backbone(split, x_cal, y_cal, tflite=workdir / "backbone.int8.tflite")
        out["litert_int8"] = LiteRtBackbone(workdir / "backbone.int8.tflite")
    return out


def measure_cpu(split: Split, engs: dict[str, BackboneEngine], data: tuple[np.ndarray, ...], reps: int) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = data
    node = _learner(split, x_tr[30_000:], y_tr[30_000:])
    learners = {name: copy.deepcopy(node) for name in engs}
    batches = [(torch.from_numpy(x_tr[40_000 + i * BATCH : 40_000 + (i + 1) * BATCH]), torch.from_numpy(y_tr[40_000 + i * BATCH : 40_000 + (i + 1) * BATCH])) for i in range(8)]
    counter = {name: 0 for name in engs}

    def served(name: str):
        def one() -> None:
            xb, yb = batches[counter[name] % len(batches)]
            counter[name] += 1
            learners[name].process_batch(engs[name].features(xb), yb)

        return one

    def backbone(name: str):
        return lambda: engs[name].features(batches[0][0])

    served_s = interleave({name: served(name) for name in engs}, reps=reps, warmup=2)
    backbone_s = interleave({name: backbone(name) for name in engs}, reps=reps, warmup=2)
    accuracy = {name: head_accuracy(split, e, x_te, y_te)[0] for name, e in engs.items()}
    return {
        "served_ms": {n: stats(served_s[n], 1e3) for n in engs},
        "backbone_ms": {n: stats(backbone_s[n], 1e3) for n in engs},
        "served_over_torch": {n: paired_ratio(served_s[n], served_s["torch_fp32"]) for n in engs},
        "backbone_over_torch": {n: paired_ratio(backbone_s[n], backbone_s["torch_fp32"]) for n in engs},
        "test_accuracy": accuracy,
        "accuracy_change_points": {n: 100.0 * (accuracy[n] - accuracy["torch_fp32"]) for n in engs},
    }


def measure_cuda(split: Split, data: tuple[np.ndarray, ...], reps: int) -> dict[str, Any] | None:
    """Torch on CUDA ÷ torch on the CPU: the served batch and the picker's scores (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    x_tr, y_tr, _, _ = data
    node = _learner(split, x_tr[30_000:], y_tr[30_000:])
    xb, yb = torch.from_numpy(x_tr[40_000 : 40_000 + BATCH]), torch.from_numpy(y_tr[40_000 : 40_000 + BATCH])
    cases: dict[str, Any] = {}
    for dev in ("cpu", "cuda"):
        learner = copy.deepcopy(node)
        learner.device = torch.device(dev)
        learner.model.to(dev)
        for h in learner.pool:
            h.model.to(dev)
        learner.optimizer = type(learner.optimizer)([p for p in learner.model.parameters() if p.requires_grad], lr=learner.config.lr)
        engine = TorchBackbone(copy.deepcopy(split.backbone), dev)

        def step(learner: Learner = learner, engine: TorchBackbone = engine, dev: str = dev) -> None:
            learner.process_batch(engine.features(xb), yb)
            if dev == "cuda":
                torch.cuda.synchronize()

        def pick(learner: Learner = learner, dev: str = dev) -> None:
            learner.significant_for((0, 1), 0.3)
            if dev == "cuda":
                torch.cuda.synchronize()

        cases[f"served_{dev}"], cases[f"pick_{dev}"] = step, pick
    s = interleave(cases, reps=reps, warmup=3)
    return {
        "device": torch.cuda.get_device_name(0),
        "served_ms": {d: stats(s[f"served_{d}"], 1e3) for d in ("cpu", "cuda")},
        "pick_ms": {d: stats(s[f"pick_{d}"], 1e3) for d in ("cpu", "cuda")},
        "served_cuda_over_cpu": paired_ratio(s["served_cuda"], s["served_cpu"]),
        "pick_cuda_over_cpu": paired_ratio(s["pick_cuda"], s["pick_cpu"]),
    }


def run(quick: bool) -> dict[str, Any]:
    setup(1)
    data = _fashion_mnist()
    x_tr, y_tr, _, _ = data
    split = trained_split(x_tr, y_tr)
    with tempfile.TemporaryDirectory() as tmp:
        engs = engines(split, x_tr[20_000:20_512], y_tr[20_000:20_512], Path(tmp))
        cpu = measure_cpu(split, engs, data, REPS[quick])
    print(f"batch {BATCH}, 1 thread; served = backbone features + process_batch on the head (one helper pooled)")
    print(table(
        ["backbone", "served p50 ms", "÷ torch fp32", "backbone p50 ms", "÷ torch fp32", "test accuracy %", "Δ points"],
        [[n, round(cpu["served_ms"][n]["p50"], 2), round(cpu["served_over_torch"][n], 3), round(cpu["backbone_ms"][n]["p50"], 2),
          round(cpu["backbone_over_torch"][n], 3), round(100 * cpu["test_accuracy"][n], 2), round(cpu["accuracy_change_points"][n], 2)] for n in engs],
    ))
    if not litert_available():
        print("LiteRT int8: the converter (the [litert] extra) is not installed here: pip install -e '.[litert]'")
    cuda = measure_cuda(split, data, REPS[quick])
    if cuda is None:
        print("CUDA: torch finds no CUDA device here; the CUDA ÷ CPU figures need a GPU")
    else:
        print(f"CUDA ({cuda['device']}) ÷ CPU: served batch {cuda['served_cuda_over_cpu']:.3f}×, picker {cuda['pick_cuda_over_cpu']:.3f}×")
    summary = [
        summary_row(
            f"served batch with the backbone on {n} ÷ torch float32", "—", "≤ 0.5× and accuracy within 1 point",
            f"{cpu['served_over_torch'][n]:.2f}×, accuracy {cpu['accuracy_change_points'][n]:+.2f} points",
            cpu["served_over_torch"][n] <= 0.5 and abs(cpu["accuracy_change_points"][n]) <= 1.0,
        )
        for n in engs if n != "torch_fp32"
    ]
    if cuda is not None:
        summary.append(summary_row(f"torch CUDA ÷ CPU ({cuda['device']})", "—", "—",
                                   f"served {cuda['served_cuda_over_cpu']:.2f}×, picker {cuda['pick_cuda_over_cpu']:.2f}×", None))
    path = write_json("backbone_engines", quick=quick, settings={"batch": BATCH, "reps": REPS[quick], "engines": list(engs)},
                      results={"cpu": cpu, "cuda": cuda}, summary=summary)
    print(f"\nwritten {path}")
    return {"cpu": cpu, "cuda": cuda, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
