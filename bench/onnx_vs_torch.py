"""Serving engine: class probabilities from eager torch against onnxruntime (``OnnxModel``).

For every model and batch size, torch ``softmax(model(x))`` in eval mode under ``no_grad`` and
``OnnxModel.predict_proba`` (the same frozen model, softmax included) run alternately on the same
input, one thread each. Reported: p50 per call and the paired ratio torch ÷ onnx (> 1: onnx is
faster). No target; ARCHITECTURE §8 quotes ≈0.4 s vs ≈0.08 s for a 400-image CNN pass.
"""

from __future__ import annotations

from typing import Any

import torch

from agent.models import build_model
from agent.runtime import OnnxModel
from bench.common import interleave, paired_ratio, parse_args, setup, stats, summary_row, table, write_json

# Sample shapes: the CNN gets images (1, 28, 28), because exporting it from flat (784,) rows fails
# (``MobileNetS.forward`` reshapes with ``round(x.shape[1] ** 0.5)``, which the tracer cannot take).
MODELS = {"mlp4": (10, (784,)), "intrusion_dnn": (5, (122,)), "mobilenet_s": (10, (1, 28, 28))}
BATCHES = (1, 32, 200, 400)
# Repetitions by model: the CNN at batch 400 takes ~0.5 s a call in torch on this box.
REPS = {True: {"mlp4": 20, "intrusion_dnn": 20, "mobilenet_s": 3},
        False: {"mlp4": 200, "intrusion_dnn": 200, "mobilenet_s": 15}}


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


def run(quick: bool) -> dict[str, Any]:
    setup(1)
    results = [measure(arch, b, REPS[quick][arch]) for arch in MODELS for b in BATCHES]
    print(table(["model", "batch", "torch p50 ms", "onnx p50 ms", "torch ÷ onnx"],
                [[r["arch"], r["batch"], round(r["torch_ms"]["p50"], 3), round(r["onnx_ms"]["p50"], 3),
                  round(r["torch_over_onnx"], 2)] for r in results]))
    summary = [
        summary_row(f"torch ÷ onnxruntime, {arch}", "—", "—",
                    ", ".join(f"b{r['batch']} {r['torch_over_onnx']:.2f}×" for r in results if r["arch"] == arch), None)
        for arch in MODELS
    ]
    path = write_json("onnx_vs_torch", quick=quick, settings={"reps": REPS[quick], "batches": BATCHES}, results=results,
                      summary=summary)
    print(f"\nwritten {path}")
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    run(parse_args(__doc__).quick)
