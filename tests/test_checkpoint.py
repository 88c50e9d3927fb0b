"""Checkpoints: exact round trip (training resumes bit-identically), refusal of bad files, crash safety."""

import copy
import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from agent.checkpoint import load_checkpoint, save_checkpoint
from agent.config import LearnerConfig
from agent.errors import CheckpointError
from agent.learner import Learner
from agent.models import build_model

SHAPES = {"mlp4": (784,), "intrusion_dnn": (122,), "mobilenet_s": (1, 28, 28)}


def _learner(arch="mlp4", *, num_classes=10, base_seed=0, config=None, seed=0):
    base = build_model(arch, num_classes, seed=base_seed).state_dict()
    model = build_model(arch, num_classes)
    model.load_state_dict(copy.deepcopy(base))
    return Learner(model, num_classes=num_classes, base_state=base, config=config, seed=seed)


def _batch(arch, num_classes, seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPES[arch], generator=g), torch.randint(num_classes, (n,), generator=g)


def _snapshot(learner):
    """Everything a checkpoint restores, as plain values to compare."""
    optim = learner.optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in learner.model.state_dict().items()},
        "optim_state": {i: {k: v.clone() for k, v in s.items()} for i, s in optim["state"].items()},
        "param_groups": copy.deepcopy(optim["param_groups"]),
        "hist": learner.longrun_hist.copy(),
        "batch_index": learner.batch_index,
        "config": learner.config,
    }


def _assert_same(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype and torch.equal(a["model"][k], b["model"][k]), k
    assert a["optim_state"].keys() == b["optim_state"].keys()
    for i in a["optim_state"]:
        for k in a["optim_state"][i]:
            assert torch.equal(a["optim_state"][i][k], b["optim_state"][i][k]), (i, k)
    assert a["param_groups"] == b["param_groups"]
    assert np.array_equal(a["hist"], b["hist"])
    assert a["batch_index"] == b["batch_index"] and a["config"] == b["config"]


@pytest.mark.parametrize("arch, num_classes", [("mlp4", 10), ("mobilenet_s", 10)])
def test_round_trip_resumes_bit_identically(tmp_path, arch, num_classes):
    config = LearnerConfig(z=0.3, lr=3e-3, pool_max=2)
    trained = _learner(arch, num_classes=num_classes, config=config)
    for i in range(3):
        trained.process_batch(*_batch(arch, num_classes, i))
    trained.process_batch(_batch(arch, num_classes, 9)[0])  # unlabelled: counts a batch, no step
    path = save_checkpoint(tmp_path / "agent.ckpt", trained)

    restored = _learner(arch, num_classes=num_classes, seed=1)
    info = load_checkpoint(path, restored)
    assert info.batch_index == 4 and info.config == config and info.saved_at <= time.time()
    _assert_same(_snapshot(trained), _snapshot(restored))
    assert restored.optimizer.param_groups[0]["lr"] == 3e-3

    x, y = _batch(arch, num_classes, 42)
    trained.process_batch(x, y)
    restored.process_batch(x, y)
    _assert_same(_snapshot(trained), _snapshot(restored))


def test_restore_config_false_keeps_current_config(tmp_path):
    trained = _learner(config=LearnerConfig(lr=3e-3))
    trained.process_batch(*_batch("mlp4", 10, 0))
    save_checkpoint(tmp_path / "c", trained)
    mine = LearnerConfig(lr=5e-4, z=0.2)
    restored = _learner(config=mine)
    info = load_checkpoint(tmp_path / "c", restored, restore_config=False)
    assert info.config.lr == 3e-3 and restored.config == mine
    assert restored.optimizer.param_groups[0]["lr"] == 5e-4
    assert torch.equal(restored.model.net[1].weight, trained.model.net[1].weight)


def test_save_is_pickle_free_npz(tmp_path):
    learner = _learner("intrusion_dnn", num_classes=5)
    learner.process_batch(*_batch("intrusion_dnn", 5, 0))
    path = save_checkpoint(tmp_path / "c.npz", learner)
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        assert meta["arch_id"] == learner.arch_id and meta["lineage"] == learner.lineage
        assert meta["version"] == 1 and meta["batch_index"] == 1
        assert {"model/net.0.weight", "optim/0/exp_avg", "optim/0/exp_avg_sq", "optim/0/step", "hist"} <= set(z.files)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a trained mlp4 learner, and a fresh learner of the same lineage to load into."""
    trained = _learner()
    trained.process_batch(*_batch("mlp4", 10, 0))
    path = save_checkpoint(tmp_path / "agent.ckpt", trained)
    target = _learner(seed=3)
    target.process_batch(*_batch("mlp4", 10, 1))
    return path, target


def _refused(path, learner, match):
    before = _snapshot(learner)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, learner)
    _assert_same(before, _snapshot(learner))


def test_truncated_file_is_refused(saved):
    path, learner = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path.write_bytes(data[:cut])
        _refused(path, learner, "corrupt or truncated")


def test_flipped_byte_is_refused(saved):
    path, learner = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a weight array: only the zip CRC can tell
    path.write_bytes(bytes(data))
    _refused(path, learner, "corrupt")


def test_garbage_and_missing_files_are_refused(saved, tmp_path):
    path, learner = saved
    path.write_bytes(os.urandom(4096))
    _refused(path, learner, "corrupt")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    _refused(tmp_path / "plain.npy", learner, "corrupt")
    _refused(tmp_path / "absent.ckpt", learner, "no checkpoint")


def test_pickled_member_is_refused_not_unpickled(saved):
    path, learner = saved
    with np.load(path) as z:
        arrays = dict(z)
    arrays["meta"] = np.array([{"format": "clue-edge-checkpoint"}], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    _refused(path, learner, "corrupt")


def test_foreign_architecture_and_lineage_are_refused(tmp_path):
    dnn = _learner("intrusion_dnn", num_classes=5)
    save_checkpoint(tmp_path / "dnn", dnn)
    _refused(tmp_path / "dnn", _learner(), "architecture")
    other_base = _learner(base_seed=1)
    save_checkpoint(tmp_path / "other", other_base)
    _refused(tmp_path / "other", _learner(), "base weights")


def _rewrite(path, edit):
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    meta = json.loads(arrays["meta"].tobytes())
    edit(arrays, meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_nan_in_a_tensor_is_refused(saved):
    path, learner = saved

    def poison(arrays, meta):
        arrays["model/net.3.weight"] = arrays["model/net.3.weight"].copy()
        arrays["model/net.3.weight"][5, 7] = np.nan

    _rewrite(path, poison)
    _refused(path, learner, "NaN")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a, m: a.__setitem__("optim/0/exp_avg", a["optim/0/exp_avg"][:10]), "shape"),
        (lambda a, m: a.__setitem__("model/net.1.bias", a["model/net.1.bias"].astype(np.float64)), "dtype"),
        (lambda a, m: a.pop("model/net.1.bias"), "lacks"),
        (lambda a, m: a.__setitem__("optim/99/exp_avg", np.zeros(3, np.float32)), "stray"),
        (lambda a, m: a.__setitem__("extra", np.zeros(3)), "unexpected"),
        (lambda a, m: a.__setitem__("hist", np.full(10, -1)), "histogram"),
        (lambda a, m: m["config"].__setitem__("z", 7.0), "invalid config: z:"),
        (lambda a, m: m["optimizer"]["param_groups"][0].__setitem__("betas", [0.9, float("nan")]), "hyper-parameters"),
        (lambda a, m: m.__setitem__("version", 2), "format version"),
        (lambda a, m: m.__setitem__("format", "other"), "not a CLUE Edge checkpoint"),
        (lambda a, m: m.__setitem__("batch_index", -1), "batch counter"),
    ],
)
def test_inconsistent_contents_are_refused(saved, edit, match):
    path, learner = saved
    _rewrite(path, edit)
    _refused(path, learner, match)


def _save_forever(path, learner, start):
    """Child process body: keep saving distinct, self-consistent states (counter from ``start``) until killed."""
    try:
        i = start
        while True:
            i += 1
            learner.batch_index = i
            learner.longrun_hist[:] = i
            with torch.no_grad():
                learner.model.net[1].bias.fill_(float(i))
            save_checkpoint(path, learner)
    finally:
        os._exit(1)


def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "agent.ckpt"
    tmp = tmp_path / ".agent.ckpt.tmp"
    writer = _learner()
    writer.process_batch(*_batch("mlp4", 10, 0))
    save_checkpoint(path, writer)
    rng = random.Random(0)
    mid_write = 0
    last = 0
    for kill in range(1, 11):
        start = kill * 1_000_000
        pid = os.fork()
        if pid == 0:
            _save_forever(path, writer, start)
        time.sleep(rng.uniform(0.03, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += tmp.exists()
        reader = _learner(seed=5)
        load_checkpoint(path, reader)
        # Every member comes from one and the same save: this child's last, or an earlier one.
        i = reader.batch_index
        assert i == last or start < i < start + 1_000_000
        assert (reader.longrun_hist == i).all() and bool((reader.model.net[1].bias == float(i)).all())
        last = i
    assert last > 1_000_000
    # Most kills land inside a save: the loop spends its time writing.
    assert mid_write >= 1
