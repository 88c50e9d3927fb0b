"""Every learner path on ``device = "cuda"``: predict, retrain, sensitivity (both pickers), the booster,
the codec, FedAvg, checkpoints and split serving's torch backbone. Marked ``gpu``; skipped, with the
reason, where torch finds no CUDA device (CI, and the machine this was written on)."""

from __future__ import annotations

import copy

import pytest
import torch

from agent.backbone import TorchBackbone, split_model
from agent.checkpoint import load_checkpoint, save_checkpoint
from agent.config import LearnerConfig
from agent.fl import apply_global, fedavg, global_from_tensors, model_to_update
from agent.learner import Learner
from agent.models import ModelSpec, build_from_spec, build_model, trainable_params
from agent.runtime import resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=f"no CUDA device: torch {torch.__version__} finds none"),
]


def _batch(n: int, classes: range | tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 784, generator=torch.Generator().manual_seed(99))
    pool = torch.tensor(list(classes))
    y = pool[torch.randint(len(pool), (n,), generator=g)]
    return (centres[y] + 0.5 * torch.randn(n, 784, generator=g)).clamp(-8, 8), y


def _pair(device: str, **config) -> tuple[Learner, Learner]:
    base = build_model("mlp4", 10, seed=0).state_dict()
    cfg = LearnerConfig.model_validate(config)
    return tuple(
        Learner(build_model("mlp4", 10, seed=0), num_classes=10, config=cfg, base_state=base, device=device, seed=i) for i in range(2)
    )  # type: ignore[return-value]


def _on(model: torch.nn.Module, device: str) -> bool:
    return all(t.device.type == device for t in [*model.parameters(), *model.buffers()])


def test_resolve_device_gives_the_gpu():
    assert resolve_device("cuda").type == "cuda" and resolve_device("auto").type == "cuda"


def test_predict_and_retrain_on_cuda_stay_on_the_gpu_and_match_the_cpu():
    gpu, _ = _pair("cuda")
    cpu, _ = _pair("cpu")
    for t in range(5):
        x, y = _batch(100, range(8), seed=t)
        rg, rc = gpu.process_batch(x, y), cpu.process_batch(x, y)
        assert rg.train_refused is None and rg.y_hat.device.type == "cpu"
        assert abs(rg.target_error - rc.target_error) <= 0.02
    assert _on(gpu.model, "cuda")
    for (name, pg), (_, pc) in zip(trainable_params(gpu.model), trainable_params(cpu.model)):
        assert torch.allclose(pg.detach().cpu(), pc.detach(), atol=1e-4), name
    assert gpu.predict(_batch(10, range(8), seed=9)[0]).device.type == "cuda"


@pytest.mark.parametrize("picker", ["on_demand", "continuous"])
def test_sensitivity_codec_and_booster_on_cuda_interoperate_with_a_cpu_node(picker):
    target, helper = _pair("cuda", picker={"type": picker})
    cpu_target, _ = _pair("cpu", picker={"type": picker})
    for t in range(4):
        x, y = _batch(100, range(8), seed=t)
        target.process_batch(x, y)
        cpu_target.process_batch(x, y)
        helper.process_batch(*_batch(100, range(10), seed=100 + t))
    blob = helper.kt_blob([8, 9], 0.3)
    installed = target.accept_kt_blob(blob, classes=[8, 9], z=0.3)
    assert installed.helper_id is not None
    assert all(_on(h.model, "cuda") for h in target.pool)
    # The blob of a GPU node is a CPU node's too: same arch_id, lineage and bytes on the wire.
    assert cpu_target.accept_kt_blob(blob, classes=[8, 9], z=0.3).helper_id is not None
    result = target.process_batch(*_batch(100, (8, 9), seed=50))
    assert result.helpers and result.train_refused is None


def test_fedavg_round_on_cuda():
    a, b = _pair("cuda")
    for t in range(3):
        a.process_batch(*_batch(100, range(5), seed=t))
        b.process_batch(*_batch(100, range(5, 10), seed=10 + t))
    updates = [model_to_update(m.model, job="j", round=0, node_id=n, samples=100) for n, m in (("a", a), ("b", b))]
    mean = fedavg(updates)
    apply_global(a.model, global_from_tensors(mean, job="j", round=0, samples=200))
    assert _on(a.model, "cuda")
    for name, p in trainable_params(a.model):
        assert torch.allclose(p.detach().cpu(), torch.from_numpy(mean[name]), atol=1e-6), name


def test_checkpoint_from_cuda_restores_on_cuda_and_on_the_cpu(tmp_path):
    gpu, _ = _pair("cuda")
    for t in range(3):
        gpu.process_batch(*_batch(100, range(8), seed=t))
    path = save_checkpoint(tmp_path / "n.ckpt.npz", gpu)
    for device in ("cuda", "cpu"):
        fresh, _ = _pair(device)
        load_checkpoint(path, fresh)
        assert fresh.batch_index == 3 and _on(fresh.model, device)
        for (name, pa), (_, pb) in zip(trainable_params(gpu.model), trainable_params(fresh.model)):
            assert torch.equal(pa.detach().cpu(), pb.detach().cpu()), name
        fresh.process_batch(*_batch(50, range(8), seed=7))


def test_split_serving_with_the_backbone_on_cuda():
    model = build_from_spec(ModelSpec(model="fixtures.user_models:backbone_and_head", input_shape=(12,), trainable=["head."]), 4, seed=0)
    split = split_model(model.to("cuda"), backbone="backbone", head="head", input_shape=(12,))
    engine = TorchBackbone(split.backbone, "cuda")
    learner = Learner(
        split.head, num_classes=4, base_state=copy.deepcopy(split.head.state_dict()), device="cuda",
        input_shape=split.feature_shape, backbone_id=split.backbone_id,
    )
    x, y = torch.randn(64, 12), torch.randint(0, 4, (64,))
    features = engine.features(x)
    assert features.device.type == "cuda"
    result = learner.process_batch(features, y)
    assert result.train_refused is None and _on(learner.model, "cuda")
