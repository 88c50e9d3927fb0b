"""The simulator with split serving: real agents over MQTT serving a frozen CNN backbone on torch,
onnxruntime int8 or LiteRT int8 while they learn and transfer the head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.export import litert_available
from edge_sim.cli_sim import main as sim_main
from edge_sim.scenario import load_scenario

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "frozen-backbone"

# The example, shrunk (the drift detector's novelty trigger wants 1,000 samples seen before the drift).
TINY = f"""
name = "tiny_backbone"
transport = "mqtt"
dataset = "fashion_mnist"
python_path = ["{EXAMPLE}"]
model = "cnn_backbone:factory"
model_args = {{ width = 8, hidden = 32 }}
input_shape = [1, 28, 28]
trainable = ["head."]
backbone = "backbone"
head = "head"
nodes = 3
batch_size = 100
batches = 20
drift_at = 12
post_drift_batches = 8
pretrain_samples = 600
pretrain_epochs = 2
calibration_samples = 256
seeds = [0]
modes = ["isolated", "clue"]

[learner]
lr = 0.01
z = 1.0
serve_max_z = 1.0
"""


def _run(tmp_path: Path, runtime: str) -> dict:
    scn = tmp_path / "scenario.toml"
    scn.write_text(TINY)
    out, work = tmp_path / f"out-{runtime}", tmp_path / f"work-{runtime}"
    assert sim_main(["run", str(scn), "--backbone-runtime", runtime, "--out", str(out), "--workdir", str(work)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert not results["partial"] and all(r["complete"] for r in results["runs"])
    logs = {p.name: p.read_text() for p in (work / "logs").glob("s0-*.log")}
    assert logs and all("split serving: backbone 'backbone'" in text for text in logs.values())
    assert all(("torch on cpu" if runtime == "torch" else runtime) in text for text in logs.values())
    return results


def _target(results: dict, mode: str) -> dict:
    run = next(r for r in results["runs"] if r["mode"] == mode)
    return next(rec for name, rec in run["nodes"].items() if name.endswith("-n0"))


@pytest.fixture(scope="module")
def float_run(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("float"), "torch")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_agents_serve_an_int8_onnx_backbone_learn_and_transfer_the_head_like_the_float_one(float_run, tmp_path):
    int8 = _run(tmp_path, "onnxruntime")
    assert (tmp_path / "work-onnxruntime" / "backbone-s0.int8.onnx").is_file()
    for results in (float_run, int8):
        clue = _target(results, "clue")
        assert clue["stats"]["kt_in"] > 0, "the target received a head blob"
    # The int8 features change few answers: the target's errors batch by batch stay close to the float run's.
    for mode in ("isolated", "clue"):
        f, q = (np.array(_target(r, mode)["target_error"], dtype=float) for r in (float_run, int8))
        assert f.shape == q.shape and float(np.abs(f - q).mean()) < 0.03, (mode, f, q)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not litert_available(), reason="the LiteRT converter litert-torch (the [litert] extra) is absent: pip install -e '.[litert]'")
def test_agents_serve_a_litert_int8_backbone(float_run, tmp_path):
    lite = _run(tmp_path, "litert")
    assert (tmp_path / "work-litert" / "backbone-s0.int8.tflite").is_file()
    assert _target(lite, "clue")["stats"]["kt_in"] > 0
    f, q = (np.array(_target(r, "isolated")["target_error"], dtype=float) for r in (float_run, lite))
    assert float(np.abs(f - q).mean()) < 0.03, (f, q)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (('head = "head"\n', ""), "set both or neither"),
        (('transport = "mqtt"', 'transport = "inprocess"'), "needs trainable .* and the mqtt transport"),
        (('backbone = "backbone"\nhead = "head"\n', 'backbone_runtime = "litert"\n'), "backbone_runtime needs split serving"),
    ],
)
def test_bad_split_scenarios_are_refused(tmp_path, change, match):
    path = tmp_path / "s.toml"
    path.write_text(TINY.replace(*change))
    with pytest.raises(ConfigError, match=match):
        load_scenario(path)
