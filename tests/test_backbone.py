"""Split serving (agent.backbone) and the backbone export (agent.export): a frozen backbone on torch,
onnxruntime int8 or LiteRT int8 in front of the learner's head."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.backbone import (
    LiteRtBackbone,
    OnnxBackbone,
    TorchBackbone,
    build_engine,
    check_batch,
    sidecar_path,
    split_model,
)
from agent.daemon import main as agent_main
from agent.errors import ConfigError, KtRejected
from agent.export import ExportRefused, export_backbone, litert_available
from agent.export import main as export_main
from agent.learner import Learner
from agent.models import ModelSpec, build_from_spec, save_weights, trainable_params
from agent.settings import load_settings
from service.exit_codes import EXIT_CONFIG

SPEC = ModelSpec(model="fixtures.user_models:backbone_and_head", input_shape=(12,), trainable=["head."])

try:
    import ai_edge_litert  # noqa: F401

    LITERT_RUNTIME = True
except ImportError:
    LITERT_RUNTIME = False
needs_litert_runtime = pytest.mark.skipif(not LITERT_RUNTIME, reason="the LiteRT interpreter is absent: pip install -e '.[litert]'")
needs_litert_converter = pytest.mark.skipif(
    not litert_available(), reason="the LiteRT converter litert-torch (the [litert] extra) is absent: pip install -e '.[litert]'"
)


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian clusters in 12 dimensions."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    return (centres[y] + 0.3 * rng.normal(size=(n, 12))).astype(np.float32), y.astype(np.int64)


def _trained(seed: int = 0) -> torch.nn.Module:
    """backbone_and_head trained as a whole on the clusters (the fleet's base), then its backbone frozen."""
    model = build_from_spec(ModelSpec(model=SPEC.model, input_shape=(12,)), 4, seed=seed)
    x, y = _data(1024, seed=seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.from_numpy(x[i : i + 64])), torch.from_numpy(y[i : i + 64])).backward()
            opt.step()
    from agent.models import freeze_untrainable

    freeze_untrainable(model, ["head."])
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return _trained()


# -- the split ----------------------------------------------------------------------------------


def test_split_gives_the_head_and_the_feature_shape_and_reproduces_the_model(trained):
    split = split_model(trained, backbone="backbone", head="head", input_shape=(12,))
    assert split.feature_shape == (64,)
    assert split.head is trained.head and split.backbone is trained.backbone
    x = torch.from_numpy(_data(32)[0])
    with torch.no_grad():
        assert torch.allclose(split.head(TorchBackbone(split.backbone).features(x)), trained(x), atol=1e-6)
    again = split_model(copy.deepcopy(trained), backbone="backbone", head="head", input_shape=(12,))
    assert again.backbone_id == split.backbone_id
    other = split_model(_trained(seed=5), backbone="backbone", head="head", input_shape=(12,))
    assert other.backbone_id != split.backbone_id


def test_a_split_that_does_not_reproduce_the_model_is_refused_naming_the_fields():
    model = build_from_spec(ModelSpec(model="fixtures.user_models:not_a_chain", input_shape=(12,), trainable=["head."]), 4, seed=0)
    with pytest.raises(ConfigError, match=r"backbone/head: model\(x\) is not head\(backbone\(x\)\)"):
        split_model(model, backbone="backbone", head="head", input_shape=(12,))


@pytest.mark.parametrize(
    ("backbone", "head", "trainable", "match"),
    [
        ("trunk", "head", ["head."], "backbone: the model has no submodule 'trunk'"),
        ("backbone", "classifier", ["head."], "head: the model has no submodule 'classifier'"),
        ("backbone", "head", ["backbone.0.", "head."], "backbone: 'backbone' holds trainable parameters"),
        ("backbone", "head", None, "backbone: 'backbone' holds trainable parameters"),
    ],
)
def test_bad_split_settings_are_refused_naming_the_field(backbone, head, trainable, match):
    model = build_from_spec(ModelSpec(model=SPEC.model, input_shape=(12,), trainable=trainable), 4, seed=0)
    with pytest.raises(ConfigError, match=match):
        split_model(model, backbone=backbone, head=head, input_shape=(12,))


def test_raw_inputs_are_checked_before_the_backbone():
    check_batch(torch.zeros(2, 12), (12,), (-1.0, 1.0))
    with pytest.raises(ValueError, match="input_range"):
        check_batch(torch.full((2, 12), 5.0), (12,), (-1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        check_batch(torch.zeros(2, 11), (12,), (-1.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        check_batch(torch.full((2, 12), float("nan")), (12,), (-1.0, 1.0))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"backbone": "backbone", "trainable": ["head."]}, "set both or neither"),
        ({"backbone": "backbone", "head": "head"}, "trainable: split serving trains the head only"),
        ({"backbone": "backbone", "head": "head", "trainable": ["head."], "backbone_runtime": "onnxruntime"}, "backbone_model"),
        ({"backbone": "backbone", "head": "head", "trainable": ["head."], "litert_delegate": "libedgetpu.so.1"}, "litert_delegate"),
        ({"backbone_runtime": "litert", "backbone_model": "x.tflite"}, "need split serving"),
    ],
)
def test_split_settings_are_validated(values, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(None, node_id="n", model=SPEC.model, input_shape=[12], **values)


# -- the head in the learner --------------------------------------------------------------------


def _head_learner(model: torch.nn.Module, seed: int = 0) -> Learner:
    split = split_model(model, backbone="backbone", head="head", input_shape=(12,))
    return Learner(
        split.head, num_classes=4, base_state=copy.deepcopy(split.head.state_dict()), seed=seed,
        input_shape=split.feature_shape, backbone_id=split.backbone_id,
    )


def test_the_learner_trains_and_transfers_the_head_only_and_helpers_share_the_features(trained):
    engine = TorchBackbone(trained.backbone)
    calls = []
    trained.backbone.register_forward_hook(lambda *_: calls.append(1))
    target, helper = _head_learner(copy.deepcopy(trained)), _head_learner(copy.deepcopy(trained), seed=1)
    assert target.arch_id == helper.arch_id and target.lineage == helper.lineage
    assert {n for n, _ in trainable_params(target.model)} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x, y = _data(64, seed=3)
    features = engine.features(torch.from_numpy(x))
    helper.process_batch(features, torch.from_numpy(y))
    target.process_batch(features, torch.from_numpy(y))
    installed = target.accept_kt_blob(helper.kt_blob([2, 3], 0.5), classes=[2, 3], z=0.5)
    assert installed.helper_id is not None and len(target.pool) == 1
    calls.clear()
    features = engine.features(torch.from_numpy(x))
    result = target.process_batch(features, torch.from_numpy(y))
    # One backbone pass served the target and its pooled helper: the helper is a head.
    assert len(calls) == 1 and result.helpers == (installed.helper_id,)
    assert sum(p.numel() for p in list(target.pool)[0].model.parameters()) == sum(p.numel() for p in trained.head.parameters())


def test_heads_behind_different_backbones_never_exchange_blobs(trained):
    same_head = copy.deepcopy(trained)
    other = copy.deepcopy(trained)
    with torch.no_grad():
        other.backbone[0].weight.add_(0.01)
    a, b = _head_learner(same_head), _head_learner(other)
    plain = Learner(copy.deepcopy(trained.head), num_classes=4, input_shape=(64,))
    assert len({a.arch_id, b.arch_id, plain.arch_id}) == 3
    x, y = _data(64)
    b.process_batch(TorchBackbone(other.backbone).features(torch.from_numpy(x)), torch.from_numpy(y))
    with pytest.raises(KtRejected):
        a.accept_kt_blob(b.kt_blob([2, 3], 0.5), classes=[2, 3], z=0.5)


# -- export and the engines ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    split = split_model(trained, backbone="backbone", head="head", input_shape=(12,))
    x, y = _data(512, seed=7)
    checks = export_backbone(split, x, y, onnx=out / "backbone.int8.onnx")
    return split, out / "backbone.int8.onnx", checks


def test_onnx_int8_export_keeps_the_head_accuracy_and_writes_its_sidecar(exported):
    split, path, checks = exported
    check = checks["onnxruntime"]
    assert check.accuracy_torch > 0.9, "the base classifies the clusters"
    assert abs(check.accuracy_change) <= 1.0 and check.feature_rel_error < 0.05
    side = json.loads(sidecar_path(path).read_text())
    assert side["backbone_id"] == split.backbone_id and side["feature_shape"] == [64] and side["check"]["samples"] == 512
    # The file is int8 QDQ: quantize/dequantize pairs and int8 weights.
    import onnx

    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node) and any(n.op_type == "DequantizeLinear" for n in graph.node)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    engine = build_engine("onnxruntime", split, model_path=path)
    assert isinstance(engine, OnnxBackbone)
    x = torch.from_numpy(_data(50, seed=11)[0])
    f_t, f_q = TorchBackbone(split.backbone).features(x), engine.features(x)
    assert f_q.shape == f_t.shape and float((f_q - f_t).norm() / f_t.norm()) < 0.05


def test_a_backbone_file_from_other_weights_is_refused_naming_backbone_model(exported, tmp_path):
    _, path, _ = exported
    other = split_model(_trained(seed=5), backbone="backbone", head="head", input_shape=(12,))
    with pytest.raises(ConfigError, match="backbone_model: .* was exported from backbone"):
        build_engine("onnxruntime", other, model_path=path)
    split = exported[0]
    tampered = tmp_path / "t.onnx"
    tampered.write_bytes(path.read_bytes() + b"\0")
    sidecar_path(tampered).write_text(sidecar_path(path).read_text())
    with pytest.raises(ConfigError, match="sha256 differs"):
        build_engine("onnxruntime", split, model_path=tampered)
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(ConfigError, match=r"backbone_model: .*lonely.onnx.json is missing"):
        build_engine("onnxruntime", split, model_path=lonely)
    with pytest.raises(ConfigError, match="onnx_providers"):
        build_engine("onnxruntime", split, model_path=path, providers=["NoSuchExecutionProvider"])


def test_an_export_that_changes_the_head_accuracy_is_refused_and_nothing_is_written(tmp_path):
    model = build_from_spec(ModelSpec(model="fixtures.user_models:quantises_badly", input_shape=(4,), trainable=["head."]), 2, seed=0)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[0.0, -100.0], [0.0, 100.0]]))
        model.head.bias.zero_()
    split = split_model(model, backbone="backbone", head="head", input_shape=(4,))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=400)
    x = np.stack([rng.random(400), np.where(y == 1, 1.0, -1.0) * (0.5 + rng.random(400)), rng.random(400), rng.random(400)], axis=1).astype(np.float32)
    with pytest.raises(ExportRefused, match=r"not written: the int8 backbone \(onnxruntime\) changes the head's accuracy .* from 100.00 %"):
        export_backbone(split, x, y, onnx=tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def _agent_toml(tmp_path: Path, model: torch.nn.Module, **extra: str) -> Path:
    save_weights(tmp_path / "base.safetensors", model.state_dict())
    lines = [
        f'model = "{SPEC.model}"', "input_shape = [12]", 'trainable = ["head."]', "num_classes = 4",
        f'base_weights = "{tmp_path / "base.safetensors"}"', 'backbone = "backbone"', 'head = "head"',
        f'state_dir = "{tmp_path / "state"}"', 'node_id = "n1"', 'broker = "mqtt://127.0.0.1:1"',
    ] + [f"{k} = {v}" for k, v in extra.items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_export_command_writes_the_model_and_the_agent_refuses_a_split_that_does_not_reproduce(trained, tmp_path, capsys):
    config = _agent_toml(tmp_path, trained)
    x, y = _data(300, seed=2)
    np.savez(tmp_path / "calib.npz", x=x, y=y)
    assert export_main(["--config", str(config), "--data", str(tmp_path / "calib.npz"), "--onnx", str(tmp_path / "bb.onnx")]) == 0
    assert "onnxruntime: head accuracy" in capsys.readouterr().out
    assert (tmp_path / "bb.onnx").is_file() and sidecar_path(tmp_path / "bb.onnx").is_file()
    assert export_main(["--config", str(config), "--data", str(tmp_path / "missing.npz"), "--onnx", str(tmp_path / "b2.onnx")]) == 78
    assert "data: cannot read" in capsys.readouterr().err
    # The agent refuses at start-up, exit 78, naming the field: a file from other weights.
    other = tmp_path / "other"
    other.mkdir()
    config2 = _agent_toml(other, _trained(seed=5), backbone_runtime='"onnxruntime"', backbone_model=f'"{tmp_path / "bb.onnx"}"')
    assert agent_main(["--config", str(config2)]) == EXIT_CONFIG
    # And a model whose named submodules do not chain to the whole.
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("backbone_and_head", "not_a_chain"))
    assert agent_main(["--config", str(bad)]) == EXIT_CONFIG


# -- LiteRT -------------------------------------------------------------------------------------


@needs_litert_runtime
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # ai-edge-litert's Delegate.__del__ after a failed load
def test_a_missing_litert_delegate_is_refused_naming_litert_delegate(exported, tmp_path):
    split, _, _ = exported
    with pytest.raises(ConfigError, match="litert_delegate: cannot load 'libno-such-delegate.so.1'"):
        LiteRtBackbone(tmp_path / "none.tflite", delegate="libno-such-delegate.so.1")


@needs_litert_converter
def test_litert_int8_export_keeps_the_head_accuracy_and_serves_any_batch_size(exported, tmp_path):
    split, _, _ = exported
    x, y = _data(512, seed=7)
    checks = export_backbone(split, x, y, tflite=tmp_path / "backbone.int8.tflite")
    check = checks["litert"]
    assert abs(check.accuracy_change) <= 1.0 and check.feature_rel_error < 0.05
    engine = build_engine("litert", split, model_path=tmp_path / "backbone.int8.tflite")
    assert isinstance(engine, LiteRtBackbone)
    inp = engine.interpreter.get_input_details()[0]
    assert np.dtype(inp["dtype"]) == np.int8, "fully int8, as edgetpu_compiler takes it"
    for n in (1, engine.batch, 2 * engine.batch + 3):
        xs = torch.from_numpy(_data(n, seed=n)[0])
        f_t, f_q = TorchBackbone(split.backbone).features(xs), engine.features(xs)
        assert f_q.shape == (n, 64) and float((f_q - f_t).norm() / f_t.norm()) < 0.05


@pytest.mark.skipif(litert_available(), reason="the converter is installed: the refusal without it cannot be seen")
def test_tflite_export_without_the_extra_says_how_to_install_it(exported, tmp_path):
    split, _, _ = exported
    x, y = _data(64)
    with pytest.raises(ConfigError, match=r"tflite: the LiteRT converter is not installed: pip install -e '\.\[litert\]'"):
        export_backbone(split, x, y, tflite=tmp_path / "b.tflite")
    assert not (tmp_path / "b.tflite").exists()
