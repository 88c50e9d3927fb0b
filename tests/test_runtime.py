"""Device choice and onnxruntime serving: agreement with torch, helpers exported once, the target never."""

import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agent import runtime as runtime_module
from agent.config import LearnerConfig
from agent.errors import ConfigError
from agent.learner import Learner
from agent.models import build_model
from agent.runtime import EnsembleRuntime, OnnxModel, resolve_device, select_providers

SHAPES = {"mlp4": (784,), "intrusion_dnn": (122,), "mobilenet_s": (1, 28, 28)}
CLASSES = {"mlp4": 10, "intrusion_dnn": 5, "mobilenet_s": 10}


def _batch(arch, seed, n=16, classes=None):
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(classes if classes is not None else range(CLASSES[arch]))
    y = pool[torch.randint(len(pool), (n,), generator=g)]
    return torch.randn(n, *SHAPES[arch], generator=g), y


def _fleet(arch, n=2, **cfg):
    base = build_model(arch, CLASSES[arch], seed=0).state_dict()
    nodes = []
    for i in range(n):
        model = build_model(arch, CLASSES[arch])
        model.load_state_dict(copy.deepcopy(base))
        nodes.append(Learner(model, num_classes=CLASSES[arch], config=LearnerConfig(**cfg), base_state=base, seed=i))
    return nodes


def _with_two_helpers(arch, **cfg):
    """A target that learnt classes {0, 1} and pooled two boosted helpers from a node that learnt the rest."""
    target, helper = _fleet(arch, **cfg)
    for i in range(2):
        target.process_batch(*_batch(arch, i, classes=[0, 1]))
        helper.process_batch(*_batch(arch, 10 + i, classes=[2, 3, 4]))
    for classes in ([2], [3, 4]):
        target.install(helper.significant_for(classes, 0.3))
    assert len(target.pool) == 2
    return target


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_onnx_ensemble_matches_torch(arch):
    target = _with_two_helpers(arch)
    runtime = EnsembleRuntime()
    x, _ = _batch(arch, 99, n=24)
    served = runtime.predict(target, x)
    assert served.dtype == torch.float32 and served.device.type == "cpu" and served.shape == (24, CLASSES[arch])
    assert (served - target.predict(x).cpu()).abs().max().item() < 1e-5
    onnx_target, onnx_helpers = runtime(target, x.numpy())
    with torch.no_grad():
        torch_helpers = [torch.softmax(m.model.eval()(x), dim=1) for m in target.members()]
    # The default kt_apply ("branch") pools each frozen helper beside its live branch (served by torch).
    assert len(onnx_helpers) == 4 and [m.live for m in target.members()] == [False, True, False, True]
    for got, want in zip(onnx_helpers, torch_helpers):
        assert (got - want).abs().max().item() < 1e-5
    # The helpers differ from the target, so the comparison above is not trivially true.
    assert (onnx_helpers[0] - onnx_target).abs().max().item() > 1e-3


@pytest.fixture
def exported(monkeypatch):
    """The models ``export_onnx`` was called with, in order."""
    models = []
    real = runtime_module.export_onnx

    def counting(model, example, **kwargs):
        models.append(model)
        return real(model, example, **kwargs)

    monkeypatch.setattr(runtime_module, "export_onnx", counting)
    return models


def test_training_exports_each_helper_once_and_never_the_target(exported):
    arch = "mlp4"
    # Both helpers stay pooled, so every batch is served by them.
    torch_node = _with_two_helpers(arch, discard={"type": "static", "n_batches": 1000}, drop_unhelpful=False)
    onnx_node = copy.deepcopy(torch_node)
    onnx_node.inference = runtime = EnsembleRuntime()
    for seed in range(6):
        x, y = _batch(arch, 20 + seed, classes=[0, 1, 2])
        a, b = torch_node.process_batch(x, y), onnx_node.process_batch(x, y)
        assert torch.equal(a.y_hat, b.y_hat) and a.served_error == b.served_error
        assert (torch_node.predict(x) - onnx_node.predict(x)).abs().max().item() < 1e-5
        # An unlabelled batch between two train steps asks for nothing new either.
        assert torch.equal(torch_node.process_batch(x).y_hat, onnx_node.process_batch(x).y_hat)
    assert runtime.exports == 2 and len(onnx_node.pool) == 2
    assert [id(m) for m in exported] == [id(h.model) for h in onnx_node.pool]


def test_target_changes_are_served_without_an_export(exported):
    # Running statistics alone (no train step), then KT "replace" writing through .data (no
    # version counter sees it): both are served at once, since the target is served by torch.
    target, _ = _fleet("mobilenet_s")
    runtime = EnsembleRuntime()
    x, _ = _batch("mobilenet_s", 1)
    runtime(target, x)
    target.model.train()
    with torch.no_grad():
        target.model(x)
    assert (runtime.predict(target, x) - target.predict(x)).abs().max().item() < 1e-5
    target, helper = _fleet("intrusion_dnn", kt_apply="replace")
    x, y = _batch("intrusion_dnn", 4)
    helper.process_batch(x, y)
    before = runtime.predict(target, x)
    target.install(helper.significant_for([0, 2], 0.5))
    served = runtime.predict(target, x)
    assert (served - target.predict(x)).abs().max().item() < 1e-5 and not torch.equal(served, before)
    assert runtime.exports == 0 and exported == []


def test_helpers_exported_once_and_dropped_with_the_pool():
    target, helper = _fleet("intrusion_dnn")
    x, y = _batch("intrusion_dnn", 3)
    helper.process_batch(x, y)
    target.process_batch(x, y)
    runtime = EnsembleRuntime()
    runtime(target, x)
    assert runtime.exports == 0
    installed = target.install(helper.significant_for([1], 0.5))
    runtime(target, x)
    runtime(target, x)
    assert runtime.exports == 1
    target.pool.remove(installed.helper_id)
    assert (runtime.predict(target, x) - target.predict(x)).abs().max().item() < 1e-5
    assert runtime.exports == 1 and runtime._helpers == {}


def test_onnxruntime_is_imported_only_when_used():
    code = (
        "import sys, agent.daemon, agent.runtime; assert 'onnxruntime' not in sys.modules, 'imported early'; "
        "agent.runtime.select_providers(['CPUExecutionProvider']); assert 'onnxruntime' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_onnx_model_inputs():
    model = build_model("mobilenet_s", 10, seed=0).eval()
    x = torch.randn(3, 1, 28, 28)
    onnx_model = OnnxModel(model, x, intra_op_num_threads=2)
    probs = onnx_model.predict_proba(x.numpy().astype(np.float64))
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-6)
    assert onnx_model.providers == ["CPUExecutionProvider"]
    assert onnx_model.sample_shape == (1, 28, 28)
    with pytest.raises(ValueError, match="does not match"):
        onnx_model.predict_proba(torch.randn(3, 784))
    with pytest.raises(ValueError, match="opset"):
        OnnxModel(model, x, opset=13)
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def test_unavailable_providers():
    with pytest.raises(ConfigError, match="none of the requested onnxruntime providers"):
        EnsembleRuntime(providers=["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        OnnxModel(build_model("intrusion_dnn", 5), torch.zeros(1, 122), providers=["NoSuchExecutionProvider"])


def test_partly_available_providers_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        assert select_providers(["NoSuchExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="'auto', 'cpu' or 'cuda"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="'auto', 'cpu' or 'cuda"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        resolve_device("cuda:3")


def test_cnn_on_flat_rows_exports_and_agrees():
    """The feeder sends flat (N, 784) rows: the CNN must take them through onnxruntime too."""
    from agent.models import build_model
    from agent.runtime import OnnxModel

    model = build_model("mobilenet_s", 10, seed=0).eval()
    x = torch.rand(4, 784)
    onnx_probs = OnnxModel(model, x.numpy()).predict_proba(x.numpy())
    with torch.no_grad():
        torch_probs = torch.softmax(model(x), dim=1)
    assert torch.allclose(onnx_probs, torch_probs, atol=1e-5)


class _Spectral(torch.nn.Module):
    """A user's model with an operator ONNX lacks (``torch.fft``): onnxruntime cannot serve it."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.fft.rfft(x, dim=1).abs())


def test_a_helper_that_cannot_be_exported_is_served_by_torch(caplog):
    base = _Spectral().state_dict()
    target, helper = (Learner(_Spectral(), num_classes=3, base_state=base, seed=i) for i in range(2))
    for node in (target, helper):
        node.model.load_state_dict(base)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 14, generator=g), torch.randint(3, (16,), generator=g)
    helper.process_batch(x, y)
    target.process_batch(x, y)
    installed = target.install(helper.significant_for([2], 0.5))
    runtime = EnsembleRuntime()
    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        for _ in range(2):
            assert torch.equal(runtime.predict(target, x), target.predict(x))
    assert runtime.exports == 1, "a failed export is not tried again for the same helper"
    assert set(runtime.fallbacks) == {installed.helper_id} and "fft" in runtime.fallbacks[installed.helper_id]
    assert sum("cannot run in onnxruntime" in r.getMessage() for r in caplog.records) == 1
    target.pool.remove(installed.helper_id)
    runtime(target, x)
    assert runtime.fallbacks == {} and runtime._helpers == {}


def test_attention_exports_with_the_fused_kernel_off_and_back_on_after():
    layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    class Attend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = layer, torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.attn(x, x, x, need_weights=False)
            return self.head(out.mean(dim=1))

    model = Attend().eval()
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0))
    probs = OnnxModel(model, x).predict_proba(x)
    with torch.no_grad():
        assert torch.allclose(probs, torch.softmax(model(x), dim=1), atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()
