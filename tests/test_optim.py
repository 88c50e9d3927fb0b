"""agent.optim.Adam: bit-identical to torch.optim.Adam, interchangeable state, no torch._dynamo."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent.checkpoint import load_checkpoint, save_checkpoint
from agent.learner import Learner
from agent.models import build_model
from agent.optim import Adam

ROOT = Path(__file__).resolve().parents[1]


def _pair(lr=1e-3):
    """Two identical mlp4s, one under torch.optim.Adam and one under agent.optim.Adam."""
    ours, theirs = build_model("mlp4", 10, seed=0), build_model("mlp4", 10, seed=0)
    return (ours, Adam(ours.parameters(), lr=lr)), (theirs, torch.optim.Adam(theirs.parameters(), lr=lr))


def _train(model, optimizer, x, y, *, drop_grad=False):
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    if drop_grad:
        # A parameter without a gradient is skipped by the step, its state untouched.
        model.net[-1].bias.grad = None
    optimizer.step()


def _assert_same(ours, theirs):
    (m1, o1), (m2, o2) = ours, theirs
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), name
    assert len(o1.state) == len(o2.state)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        # .get: indexing the defaultdicts would add state for a parameter that has none yet.
        s1, s2 = o1.state.get(p1, {}), o2.state.get(p2, {})
        assert s1.keys() == s2.keys() and s1.keys() in ({"step", "exp_avg", "exp_avg_sq"}, set())
        for key in s1:
            assert s1[key].dtype == s2[key].dtype and s1[key].device == s2[key].device, key
            assert torch.equal(s1[key], s2[key]), key


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(64, 784, generator=g), torch.randint(10, (64,), generator=g)) for _ in range(n)]


def test_fifty_steps_are_bit_identical_to_torch_adam():
    ours, theirs = _pair()
    for i, (x, y) in enumerate(_batches(50)):
        if i == 30:
            for _, optimizer in (ours, theirs):
                optimizer.param_groups[0]["lr"] = 3e-3
        for model, optimizer in (ours, theirs):
            _train(model, optimizer, x, y, drop_grad=i in (0, 17))
        _assert_same(ours, theirs)
    # The last bias skipped two steps: its counter says so.
    assert float(ours[1].state[ours[0].net[-1].bias]["step"]) == 48.0


def test_state_dicts_interchange_with_torch_adam():
    ours, theirs = _pair()
    batches = _batches(20)
    for x, y in batches[:10]:
        _train(*theirs, x, y)
    ours[0].load_state_dict(theirs[0].state_dict())
    # Copied, as a checkpoint hands it over: a loaded state dict's tensors are taken, not cloned.
    ours[1].load_state_dict(copy.deepcopy(theirs[1].state_dict()))
    _assert_same(ours, theirs)
    mine, torchs = ours[1].state_dict(), theirs[1].state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for x, y in batches[10:15]:
        for model, optimizer in (ours, theirs):
            _train(model, optimizer, x, y)
    _assert_same(ours, theirs)
    # And back: torch.optim.Adam takes ours.
    theirs[1].load_state_dict(copy.deepcopy(ours[1].state_dict()))
    for x, y in batches[15:]:
        for model, optimizer in (ours, theirs):
            _train(model, optimizer, x, y)
    _assert_same(ours, theirs)


def test_a_torch_adam_checkpoint_resumes_bit_identically(tmp_path):
    def learner(optimizer_cls):
        model = build_model("mlp4", 10, seed=0)
        out = Learner(model, num_classes=10)
        out.optimizer = optimizer_cls(model.parameters(), lr=out.config.lr)
        return out

    batches = _batches(8)
    written = learner(torch.optim.Adam)
    for x, y in batches[:4]:
        written.process_batch(x, y)
    path = save_checkpoint(tmp_path / "a.ckpt.npz", written)
    resumed = learner(Adam)
    load_checkpoint(path, resumed)
    for x, y in batches[4:]:
        written.process_batch(x, y)
        resumed.process_batch(x, y)
    _assert_same((resumed.model, resumed.optimizer), (written.model, written.optimizer))


@pytest.mark.parametrize(
    "change",
    [
        lambda g: g.update(amsgrad=True),
        lambda g: g.update(betas=(0.8, 0.999)),
        lambda g: g.update(fused=True),
        lambda g: g.__setitem__("params", g["params"][:-1]),
    ],
)
def test_load_state_dict_refuses_what_it_cannot_follow_and_changes_nothing(change):
    ours, _ = _pair()
    x, y = _batches(1)[0]
    _train(*ours, x, y)
    saved = copy.deepcopy(ours[1].state_dict())
    change(saved["param_groups"][0])
    saved["param_groups"][0]["lr"] = 0.5
    before = copy.deepcopy(ours[1].state_dict())
    with pytest.raises(ValueError):
        ours[1].load_state_dict(saved)
    after = ours[1].state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i, s in before["state"].items() for k, v in s.items())


def test_an_empty_parameter_list_or_negative_lr_is_refused():
    with pytest.raises(ValueError):
        Adam([])
    with pytest.raises(ValueError):
        Adam(build_model("mlp4", 10).parameters(), lr=-1.0)


_NO_DYNAMO = """
import json, sys, torch
from agent.models import build_model
from agent.optim import Adam
model = build_model("mlp4", 10, seed=0)
opt = Adam(model.parameters(), lr=1e-3)
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(torch.rand(8, 784)), torch.randint(0, 10, (8,))).backward()
    opt.step()
opt.load_state_dict(opt.state_dict())
print(json.dumps(sorted(name for name in sys.modules if name.startswith("torch._dynamo"))))
"""


@pytest.mark.timeout(120)
def test_it_never_imports_torch_dynamo():
    # A fresh interpreter: the test session may have imported torch._dynamo already.
    out = subprocess.run([sys.executable, "-c", _NO_DYNAMO], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []
