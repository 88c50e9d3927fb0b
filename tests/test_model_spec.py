"""The user's own classifier: named by import path, built and checked once, its base weights read
from ``.safetensors`` or ``.npz`` and refused whole when they do not fit (agent.models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from agent.daemon import AgentDaemon
from agent.errors import ConfigError
from agent.models import (
    ARCHITECTURES,
    ModelError,
    ModelSpec,
    arch_id,
    build_from_spec,
    build_model,
    freeze_untrainable,
    frozen_modules,
    learnt_state,
    lineage,
    load_weights,
    save_weights,
    train_mode,
    trainable_params,
)
from agent.settings import load_settings
from service.exit_codes import EXIT_CONFIG

TESTS = Path(__file__).parent
TINY = "fixtures.user_models:tiny_mlp"


def _spec(model: str = TINY, **fields) -> ModelSpec:
    return ModelSpec(model=model, **({"input_shape": (12,)} | fields))


def test_an_import_path_factory_gets_num_classes_and_model_args():
    model = build_from_spec(_spec(model_args={"hidden": 8}), 3, seed=0)
    assert model(torch.zeros(5, 12)).shape == (5, 3)
    assert model[0].out_features == 8
    assert lineage(model) == lineage(build_from_spec(_spec(model_args={"hidden": 8}), 3, seed=0))
    assert lineage(model) != lineage(build_from_spec(_spec(model_args={"hidden": 8}), 3, seed=1))
    assert arch_id(model) != arch_id(build_from_spec(_spec(), 3, seed=0)), "hidden 16 is another architecture"


def test_the_check_leaves_every_submodule_in_the_mode_it_was_built_in():
    model = build_from_spec(_spec(model_args={"dropout": 0.5}), 3, seed=0)
    assert all(m.training for m in model.modules())
    frozen = build_from_spec(_spec("fixtures.user_models:partly_frozen"), 3, seed=0)
    assert [m.training for m in frozen] == [True, False, True]
    assert torch.equal(frozen[1].running_mean, torch.zeros(8)), "the check's forward pass moved no statistics"


def test_the_built_ins_keep_their_arch_ids():
    """Checkpoints, KT blobs and the MdS all carry these: the refactoring must not move them."""
    ids = {
        (name, classes): arch_id(build_model(name, classes))
        for name in ARCHITECTURES
        for classes in (10, 5)
    }
    assert ids == {
        ("mlp4", 10): "271b61d03db0ce25",
        ("mlp4", 5): "a21e818c4eaf2d67",
        ("intrusion_dnn", 10): "575c9ca1eaaff484",
        ("intrusion_dnn", 5): "dbd776f589a642de",
        ("mobilenet_s", 10): "b9f5a1791b0f56ad",
        ("mobilenet_s", 5): "7540685d5ea1330f",
    }
    assert arch_id(build_from_spec(ModelSpec(model="mlp4", input_shape=(1, 28, 28)), 10)) == ids[("mlp4", 10)]


@pytest.mark.parametrize(
    "spec, message",
    [
        (ModelSpec(model="resnet9000"), r"model 'resnet9000' is unknown: the built-ins are intrusion_dnn, mlp4, mobilenet_s; .*package\.module:factory"),
        (ModelSpec(model=TINY), r"input_shape is required for the import-path model 'fixtures\.user_models:tiny_mlp'"),
        (_spec("fixtures.no_such_module:tiny_mlp"), r"model 'fixtures\.no_such_module:tiny_mlp': cannot import module 'fixtures\.no_such_module': ModuleNotFoundError"),
        (_spec("fixtures.user_models:no_such_factory"), r"module 'fixtures\.user_models' has no attribute 'no_such_factory'"),
        (_spec("fixtures.user_models:NOT_A_FACTORY"), r"'NOT_A_FACTORY' is a int, not a callable factory"),
        (_spec("fixtures.user_models:raises"), r"factory\(num_classes=10, \*\*model_args\) raised RuntimeError: no GPU here"),
        (_spec(model_args={"depth": 3}), r"raised TypeError: .*unexpected keyword argument 'depth'"),
        (_spec("fixtures.user_models:not_a_module"), r"the factory returned a dict, not a torch\.nn\.Module"),
        (_spec("fixtures.user_models:wrong_outputs"), r"returned shape \(2, 11\), not logits \(2, num_classes=10\)"),
        (_spec("fixtures.user_models:integer_outputs"), r"returned a torch\.int64 tensor, not float logits"),
        (_spec(input_shape=(13,)), r"with input_shape \[13\]: a forward pass on 2 zero samples raised RuntimeError"),
        (ModelSpec(model="intrusion_dnn", input_shape=(784,)), r"model 'intrusion_dnn' with input_shape \[784\]: a forward pass"),
    ],
    ids=[
        "unknown-name", "no-input-shape", "no-module", "no-attribute", "not-callable", "factory-raises",
        "bad-model-args", "not-a-module", "wrong-outputs", "integer-outputs", "wrong-input-shape", "built-in-wrong-shape",
    ],
)
def test_every_failure_is_a_model_error_naming_the_field(spec, message):
    with pytest.raises(ModelError, match=message):
        build_from_spec(spec, 10, seed=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"input_shape": (0, 3)}, "1 to 8 positive sizes, got \\[0, 3\\]"),
        ({"input_shape": tuple(range(1, 10))}, "1 to 8 positive sizes"),
        ({"input_shape": ()}, "1 to 8 positive sizes"),
        ({"input_shape": (True,)}, "valid integer"),
        ({"model_args": {"layers": {"a": 1}}}, "'layers' is a dict: the factory's arguments are strings, numbers, booleans, null or lists of them"),
        ({"model_args": {"layers": [[1]]}}, "'layers' is a list"),
        ({"weights": "x"}, "Extra inputs"),
    ],
)
def test_a_spec_holds_plain_arguments_and_a_sample_shape(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(model=TINY, **fields)


def _small_model() -> nn.Module:
    # A batch-norm layer: buffers (an int64 one too) travel with the parameters.
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source = _small_model()
    source(torch.randn(8, 4))  # moves the batch-norm statistics off their initial values
    path = tmp_path / f"base{suffix}"
    save_weights(path, source.state_dict())
    target = _small_model()
    load_weights(path, target)
    assert lineage(target) == lineage(source)
    model = build_model("mlp4", 10, seed=3)
    save_weights(path, model.state_dict())
    other = build_model("mlp4", 10, seed=4)
    load_weights(path, other)
    assert lineage(other) == lineage(model)


def test_a_safetensors_file_holds_tied_weights_as_copies(tmp_path):
    model = _small_model()
    state = model.state_dict() | {"tied": model[0].weight}
    save_weights(tmp_path / "tied.safetensors", state)
    saved = load_file(tmp_path / "tied.safetensors")
    assert torch.equal(saved["tied"], saved["0.weight"])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_file_that_does_not_fit_is_refused_naming_every_misfit_at_once(tmp_path, suffix):
    model = _small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["2.bias"]
    state["0.weight"] = torch.zeros(3, 5)
    state["head.weight"] = torch.zeros(2)
    path = tmp_path / f"foreign{suffix}"
    save_weights(path, state)
    before = lineage(model)
    with pytest.raises(ValueError) as info:
        load_weights(path, model)
    text = str(info.value)
    assert "weights do not fit Sequential" in text
    assert "missing (1: 2.bias)" in text
    assert "unexpected (1: head.weight)" in text
    assert "mis-shaped (1: 0.weight: file (3, 5) vs model (3, 4))" in text
    assert lineage(model) == before


def test_a_long_list_of_misfits_is_cut_with_a_count(tmp_path):
    path = tmp_path / "other.safetensors"
    save_weights(path, build_model("intrusion_dnn", 5).state_dict() | {f"extra.{i}": torch.zeros(1) for i in range(25)})
    with pytest.raises(ValueError, match=r"unexpected \(25: extra\.\d+(, extra\.\d+){9}, … and 15 more\)"):
        load_weights(path, build_model("intrusion_dnn", 5))
    with pytest.raises(ValueError, match=r"mis-shaped \(1: net\.0\.weight: file \(512, 122\) vs model \(512, 784\)\)"):
        load_weights(path, build_from_spec(ModelSpec(model="intrusion_dnn", model_args={"in_features": 784}, input_shape=(784,)), 5))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_non_finite_weights_are_refused(tmp_path, suffix):
    model = _small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.weight"][0, 0] = float("nan")
    path = tmp_path / f"nan{suffix}"
    save_weights(path, state)
    with pytest.raises(ValueError, match="2.weight holds NaN or infinite values"):
        load_weights(path, model)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_an_unreadable_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"not weights at all")
    with pytest.raises(ValueError, match=f"not a readable \\{suffix} weights file"):
        load_weights(path, _small_model())
    with pytest.raises(ValueError, match="not a readable"):
        load_weights(tmp_path / f"absent{suffix}", _small_model())


def test_npz_weights_hold_no_pickle(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"0.weight": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_weights(path, _small_model())


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_agent_exits_78_naming_the_model_or_the_weights_that_do_not_fit(tmp_path):
    weights = tmp_path / "mlp4.safetensors"
    save_weights(weights, build_model("mlp4", 10, seed=0).state_dict())
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "CLUE_INPUT_SHAPE": "[12]"}
    cases = {
        "no such module": (["--model", "fixtures.no_such_module:factory"], "model 'fixtures.no_such_module:factory': cannot import module"),
        "weights of another model": (["--model", TINY, "--base-weights", str(weights)], "base_weights: "),
    }
    # All at once: each pays for importing torch.
    runs = {
        case: subprocess.Popen(
            [sys.executable, "-m", "agent", "--node-id", "n1", "--state-dir", str(tmp_path / case.replace(" ", "-")), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS.parent,
        )
        for case, (argv, _) in cases.items()
    }
    errors = {case: run.communicate(timeout=100)[1] for case, run in runs.items()}
    for case, run in runs.items():
        assert run.returncode == EXIT_CONFIG, (case, errors[case])
        assert "cannot start" in errors[case] and cases[case][1] in errors[case] and "Traceback" not in errors[case], (case, errors[case])
    refused = errors["weights of another model"]
    assert "weights do not fit Sequential: missing (4: 0.weight" in refused and "unexpected (8: net.1.bias" in refused, refused


# --- trainable: which parameters a node trains --------------------------------------------------

BACKBONE = "fixtures.user_models:backbone_and_head"


def test_trainable_prefixes_freeze_every_other_parameter_and_name_the_architecture():
    everything = build_from_spec(_spec(BACKBONE), 4, seed=0)
    head = build_from_spec(_spec(BACKBONE, trainable=["head."]), 4, seed=0)
    assert [n for n, _ in trainable_params(head)] == ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    assert [n for n, _ in trainable_params(everything)] == [n for n, _ in everything.named_parameters()]
    assert lineage(head) == lineage(everything), "the same base weights"
    assert len({arch_id(everything), arch_id(head), arch_id(build_from_spec(_spec(BACKBONE, trainable=["head.2."]), 4, seed=0))}) == 3


def test_frozen_modules_run_in_eval_mode_while_the_rest_trains():
    model = build_from_spec(_spec(BACKBONE, trainable=["head."]), 4, seed=0)
    assert [name for name, _ in frozen_modules(model)] == ["backbone"]
    train_mode(model)
    assert model.training and model.head.training and not model.backbone.training and not model.backbone[1].training
    assert set(learnt_state(model)) == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    everything = build_from_spec(_spec(BACKBONE), 4, seed=0)
    assert frozen_modules(everything) == [] and list(learnt_state(everything)) == list(everything.state_dict())


def test_a_tied_parameter_is_trainable_when_any_of_its_names_is_matched():
    model = build_from_spec(_spec("fixtures.user_models:tied_net"), 3, seed=0)
    freeze_untrainable(model, ["mid2."])
    assert [n for n, _ in trainable_params(model)] == ["mid.weight", "mid2.bias"], "mid2.weight is mid.weight, listed under its first name"
    assert list(learnt_state(model)) == ["mid.weight", "mid2.bias"]


@pytest.mark.parametrize(
    "prefixes, message",
    [
        (["heads."], r"trainable prefix 'heads\.' matches no parameter of the model; its parameters are 10: backbone\.0\.weight, backbone\.0\.bias, .*, … and 4 more"),
        (["head.", "neck.", "tail"], r"trainable prefixes 'neck\.', 'tail' match no parameter"),
    ],
)
def test_a_trainable_prefix_that_matches_nothing_is_refused_naming_it(prefixes, message):
    model = build_from_spec(_spec(BACKBONE), 4, seed=0)
    with pytest.raises(ModelError, match=message):
        freeze_untrainable(model, prefixes)
    assert all(p.requires_grad for p in model.parameters()), "nothing was frozen"
    with pytest.raises(ModelError, match=message):
        build_from_spec(_spec(BACKBONE, trainable=prefixes), 4, seed=0)


@pytest.mark.parametrize("trainable, message", [([], "at least 1 item"), ([""], "at least 1 character"), (["a.", "a."], r"repeat: \['a\.'\]")])
def test_trainable_is_a_list_of_distinct_prefixes(trainable, message):
    with pytest.raises(ValidationError, match=message):
        _spec(trainable=trainable)


def test_the_daemon_builds_its_model_with_the_trainable_setting(tmp_path):
    settings = load_settings(node_id="n1", state_dir=str(tmp_path), model=BACKBONE, input_shape=[12], trainable=["head."])
    daemon = AgentDaemon(settings)
    assert [n for n, _ in trainable_params(daemon.learner.model)] == ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    assert daemon.learner.arch_id == arch_id(build_from_spec(_spec(BACKBONE, trainable=["head."]), 10))
    with pytest.raises(ConfigError, match="trainable prefix 'body.' matches no parameter"):
        AgentDaemon(load_settings(node_id="n1", state_dir=str(tmp_path), model=BACKBONE, input_shape=[12], trainable=["body."]))
