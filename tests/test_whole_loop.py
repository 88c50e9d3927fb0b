"""The whole loop on the classifiers users bring: a CNN with batch norm and a residual connection, a
transformer-style model, tied weights, and a frozen backbone with a trainable head.

Each is named by import path (tests/fixtures/user_models.py) and built by ``build_from_spec`` as the
daemon builds it; two in-process learners descend from one base: a helper that knows every class
and a target to which two new classes come. Then, as a node lives it: predict and retrain, a drift
report, a KT blob served and accepted, the ensemble served (by torch and by onnxruntime), a static
discard, a checkpoint resumed into a fresh learner, and a FedAvg round over the two.

A torchvision model runs the same loop where torchvision imports. Its PyPI builds are made against
one torch release each, and none imports beside the pinned CPU torch 2.13.0 (0.28.0 installs, then
fails: "operator torchvision::nms does not exist"), so that test skips with the reason in this
project's environment; it passed in a venv with torch 2.14.1 and torchvision 0.29.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from agent.checkpoint import load_checkpoint, save_checkpoint
from agent.config import LearnerConfig
from agent.errors import KtRejected
from agent.fl import FlRejected, apply_global, fedavg, global_from_tensors, model_to_update
from agent.learner import Learner
from agent.models import ModelSpec, arch_id, build_from_spec, learnt_state, trainable_params
from agent.runtime import EnsembleRuntime

CLASSES = 6
OLD = [0, 1, 2, 3]
NEW = (4, 5)
Z = 0.5

SPECS = {
    "residual_cnn": ModelSpec(model="fixtures.user_models:residual_cnn", input_shape=(1, 12, 12)),
    "tiny_transformer": ModelSpec(model="fixtures.user_models:tiny_transformer", input_shape=(8, 6)),
    "tied_net": ModelSpec(model="fixtures.user_models:tied_net", input_shape=(12,)),
    "frozen_backbone": ModelSpec(model="fixtures.user_models:backbone_and_head", input_shape=(12,), trainable=["head."]),
}


def _torchvision_missing() -> str | None:
    """Why torchvision's models cannot run here (None: they can)."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a build made for another torch
        return f"torchvision does not import beside torch {torch.__version__}: {exc}"
    return None


TORCHVISION_MISSING = _torchvision_missing()
if TORCHVISION_MISSING is None:
    # resnet18 as torchvision builds it, named the way an operator would (``num_classes`` is its own keyword).
    SPECS["torchvision_resnet18"] = ModelSpec(model="torchvision.models:resnet18", input_shape=(3, 32, 32))
#: Batches before the drift: the tied net learns slowest, and its boosted helper must beat chance on the new classes.
BATCHES = {"tied_net": 40}


class Clusters:
    """Gaussian class clusters shaped like one sample: learnable in a few batches."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(CLASSES, *shape, generator=self.g)

    def batch(self, classes, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(list(classes))[torch.randint(len(classes), (n,), generator=self.g)]
        return self.centres[y] + 0.8 * torch.randn(n, *self.centres.shape[1:], generator=self.g), y


def _config() -> LearnerConfig:
    # A short static discard, so that the pooled helper leaves within the test.
    return LearnerConfig(lr=3e-3, discard={"type": "static", "n_batches": 4}, drop_unhelpful=False)


def _node(spec: ModelSpec, base: dict[str, torch.Tensor], seed: int) -> Learner:
    model = build_from_spec(spec, CLASSES, seed=0)
    model.load_state_dict(base)
    return Learner(model, num_classes=CLASSES, config=_config(), base_state=base, seed=seed, input_shape=spec.input_shape)


@dataclass
class Run:
    """What the loop left behind, for each model's own checks."""

    base: dict[str, torch.Tensor]
    helper: Learner
    target: Learner
    data: Clusters
    blob: bytes
    helper_id: str
    boosted_buffers: dict[str, torch.Tensor]
    target_buffers: dict[str, torch.Tensor]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _error(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((learner.predict(x).argmax(dim=1) != y).float().mean())


def _loop(name: str) -> Run:
    spec = SPECS[name]
    base = _state(build_from_spec(spec, CLASSES, seed=0))
    helper, target = _node(spec, base, 1), _node(spec, base, 2)
    data = Clusters(spec.sample_shape())
    probe_old = data.batch(OLD, n=200)
    before = _error(target, *probe_old)
    for _ in range(BATCHES.get(name, 25)):
        helper.process_batch(*data.batch(range(CLASSES)))
        result = target.process_batch(*data.batch(OLD))
        assert result.learnt and result.train_refused is None
    assert _error(target, *probe_old) < min(before, 0.35), "retraining learnt the old classes"

    result = target.process_batch(*data.batch(range(CLASSES)))
    assert result.drift and result.drift_report is not None, "new classes are a drift"
    report = result.drift_report
    assert set(NEW) <= set(report.classes)

    blob = helper.kt_blob(report.classes, Z)
    installed = target.accept_kt_blob(blob, classes=report.classes, z=Z, source="helper", baseline=report.baseline)
    assert installed.helper_id is not None and installed.count > 0
    pooled = next(h for h in target.pool if h.helper_id == installed.helper_id)
    # The boosted helper keeps the target's buffers (batch-norm statistics travel in no blob).
    boosted_buffers = {k: v.clone() for k, v in pooled.model.named_buffers()}
    target_buffers = {k: v.clone() for k, v in target.model.named_buffers()}

    x, _ = data.batch(range(CLASSES), n=64)
    served = target.predict(x)
    assert served.shape == (64, CLASSES) and bool(torch.isfinite(served).all())
    assert torch.allclose(served.sum(dim=1), torch.ones(64), atol=1e-5)

    # onnxruntime serves the frozen helper beside torch's target and live branch, and agrees with torch.
    runtime = EnsembleRuntime()
    target.inference = runtime
    try:
        by_onnx = target.predict(x)
    finally:
        target.inference = None
    assert runtime.exports == 1 and runtime.fallbacks == {}
    assert (by_onnx - served).abs().max().item() < 1e-4

    discarded: list[str] = []
    for _ in range(8):
        helper.process_batch(*data.batch(range(CLASSES)))
        discarded += target.process_batch(*data.batch(range(CLASSES))).discarded
    assert installed.helper_id in discarded and len(target.pool) == 0, "the static discard let the helper go"
    return Run(base, helper, target, data, blob, installed.helper_id, boosted_buffers, target_buffers)


def _check_checkpoint(run: Run, spec: ModelSpec, tmp_path) -> dict[str, np.ndarray]:
    path = save_checkpoint(tmp_path / "target.ckpt.npz", run.target)
    fresh = _node(spec, run.base, 2)
    load_checkpoint(path, fresh)
    x, _ = run.data.batch(range(CLASSES), n=64)
    assert torch.equal(fresh.predict(x), run.target.predict(x))
    assert fresh.batch_index == run.target.batch_index
    # Training goes on from the same state: the optimiser's moments were restored too.
    batch = run.data.batch(range(CLASSES))
    fresh.process_batch(*batch)
    run.target.process_batch(*batch)
    assert torch.equal(fresh.predict(x), run.target.predict(x))
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files}
    assert {k for k in members if k.startswith("model/")} == {f"model/{k}" for k in learnt_state(run.target.model)}
    return members


def _fedavg_round(run: Run) -> None:
    updates = [
        model_to_update(learner.model, job="j", round=0, node_id=node, samples=samples)
        for learner, node, samples in ((run.helper, "helper", 300), (run.target, "target", 100))
    ]
    averaged = fedavg(updates)
    message = global_from_tensors(averaged, job="j", round=0, samples=400)
    for learner in (run.helper, run.target):
        apply_global(learner.model, message)
        assert _finite(learner.model)
    assert all(torch.equal(a, b) for a, b in zip(learnt_state(run.helper.model).values(), learnt_state(run.target.model).values()))


def _keeps_learning(run: Run) -> None:
    """Both nodes serve and learn on from the global model."""
    for learner in (run.helper, run.target):
        assert learner.process_batch(*run.data.batch(range(CLASSES))).learnt


def test_the_whole_loop_on_a_transformer(tmp_path):
    """Attention exports to ONNX too (``_loop`` checks onnxruntime agrees and nothing fell back)."""
    run = _loop("tiny_transformer")
    _check_checkpoint(run, SPECS["tiny_transformer"], tmp_path)
    _fedavg_round(run)
    _keeps_learning(run)


def test_a_cnn_whose_boosted_helper_keeps_the_targets_batch_norm_statistics_and_fedavg_averages_them(tmp_path):
    spec = SPECS["residual_cnn"]
    run = _loop("residual_cnn")
    assert run.boosted_buffers.keys() == run.target_buffers.keys() and any("running_mean" in k for k in run.boosted_buffers)
    assert all(torch.equal(run.boosted_buffers[k], run.target_buffers[k]) for k in run.boosted_buffers)
    members = _check_checkpoint(run, spec, tmp_path)
    assert {"model/stem.1.running_mean", "model/stem.1.running_var", "model/stem.1.num_batches_tracked"} <= set(members)

    helper, target = run.helper.model, run.target.model
    counts = {m: int(m.state_dict()["stem.1.num_batches_tracked"]) for m in (helper, target)}
    want_mean = (3 * helper.state_dict()["stem.1.running_mean"].double() + target.state_dict()["stem.1.running_mean"].double()) / 4
    _fedavg_round(run)
    for model in (helper, target):
        # Float statistics are averaged by samples (3:1) like the weights; the step counter takes the larger.
        assert torch.allclose(model.state_dict()["stem.1.running_mean"].double(), want_mean, atol=1e-6)
        assert int(model.state_dict()["stem.1.num_batches_tracked"]) == max(counts.values())
    _keeps_learning(run)


@pytest.mark.skipif(TORCHVISION_MISSING is not None, reason=TORCHVISION_MISSING or "")
def test_the_whole_loop_on_a_torchvision_resnet(tmp_path):
    spec = SPECS["torchvision_resnet18"]
    run = _loop("torchvision_resnet18")
    members = _check_checkpoint(run, spec, tmp_path)
    assert "model/bn1.running_mean" in members
    assert all(torch.equal(run.boosted_buffers[k], run.target_buffers[k]) for k in run.boosted_buffers)
    _fedavg_round(run)
    _keeps_learning(run)


def test_tied_weights_stay_tied_and_travel_once(tmp_path):
    spec = SPECS["tied_net"]
    run = _loop("tied_net")
    names = [t.name for t in run.target.decode_blob(run.blob).tensors]
    assert "mid.weight" in names and "mid2.weight" not in names, "a tied weight travels once, under its first name"
    assert "mid2.weight" in run.target.model.state_dict() and "mid2.bias" in names
    members = _check_checkpoint(run, spec, tmp_path)
    assert "model/mid.weight" in members and "model/mid2.weight" not in members
    update = model_to_update(run.target.model, job="j", round=0, node_id="t", samples=1)
    assert "mid2.weight" not in {t.name for t in update.tensors}
    _fedavg_round(run)
    for learner in (run.helper, run.target):
        model = learner.model
        assert model.mid2.weight is model.mid.weight, "adopting a global model keeps the tie"
        assert learner.optimizer.param_groups[0]["params"][2] is model.mid.weight
    _keeps_learning(run)
    assert all(learner.model.mid2.weight is learner.model.mid.weight for learner in (run.helper, run.target))


def test_a_frozen_backbone_never_moves_and_only_the_head_travels(tmp_path):
    spec = SPECS["frozen_backbone"]
    run = _loop("frozen_backbone")
    backbone = {k: v for k, v in run.base.items() if k.startswith("backbone.")}
    assert any("running_mean" in k for k in backbone)

    def backbone_unchanged(model: nn.Module) -> bool:
        state = model.state_dict()
        return all(torch.equal(state[k], v) for k, v in backbone.items())

    assert backbone_unchanged(run.helper.model) and backbone_unchanged(run.target.model), "training moved no frozen weight or statistic"
    assert {name for name, _ in trainable_params(run.target.model)} == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    assert all(not p.requires_grad for p in run.target.model.backbone.parameters())

    sig = run.target.decode_blob(run.blob)
    assert sig.tensors and all(t.name.startswith("head.") for t in sig.tensors)

    # The same model with every parameter trainable, through the same batches: its blob is far larger.
    everything = ModelSpec(model=spec.model, input_shape=spec.input_shape)
    full = _node(everything, run.base, 1)
    assert full.arch_id != run.helper.arch_id, "nodes that train other parameters do not exchange blobs"
    data = Clusters(spec.sample_shape())
    for _ in range(25):
        full.process_batch(*data.batch(range(CLASSES)))
    full_blob = full.kt_blob(NEW, Z)
    assert len(run.blob) < 0.35 * len(full_blob), (len(run.blob), len(full_blob))
    with pytest.raises(KtRejected, match="arch_id"):
        run.target.accept_kt_blob(full_blob, classes=NEW, z=Z)

    members = _check_checkpoint(run, spec, tmp_path)
    assert not any(k.startswith("model/backbone.") for k in members), "a frozen backbone is not checkpointed"

    update = model_to_update(run.target.model, job="j", round=0, node_id="t", samples=1)
    assert all(t.name.startswith("head.") for t in update.tensors)
    _fedavg_round(run)
    assert backbone_unchanged(run.helper.model) and backbone_unchanged(run.target.model)

    # A global model that names a frozen tensor is refused whole.
    tensors = {t.name: t.array.to_numpy() for t in update.tensors} | {"backbone.0.bias": np.zeros(64, np.float32)}
    before = _state(run.target.model)
    with pytest.raises(FlRejected, match=r"frozen tensors \['backbone.0.bias'\]"):
        apply_global(run.target.model, global_from_tensors(tensors, job="j", round=0, samples=1))
    assert all(torch.equal(before[k], v) for k, v in run.target.model.state_dict().items())
    _keeps_learning(run)
    assert backbone_unchanged(run.helper.model) and backbone_unchanged(run.target.model)


def test_a_learner_refuses_a_frozen_parameter_that_is_not_the_base():
    spec = SPECS["frozen_backbone"]
    base = _state(build_from_spec(spec, CLASSES, seed=0))
    moved = build_from_spec(spec, CLASSES, seed=1)
    with pytest.raises(ValueError, match="frozen parameter backbone.0.weight is not the base"):
        Learner(moved, num_classes=CLASSES, base_state=base)
    assert arch_id(moved) == arch_id(build_from_spec(spec, CLASSES, seed=0))
