"""The on-demand picker over a random sample of the reservoir's rows (``picker_samples``)."""

import copy

import numpy as np
import pytest
import torch

from agent.config import LearnerConfig
from agent.errors import ConfigError
from agent.kt.selection import select
from agent.kt.sensitivity import sensitivity
from agent.learner import Learner
from agent.models import build_model


def _x(n=64, seed=0):
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(seed))


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_samples_at_or_above_the_row_count_use_every_row():
    model, x = build_model("mlp4", 10, seed=0), _x(32)
    every = sensitivity(model, [x[:16], x[16:]], [8, 9])
    for samples in (32, 1000):
        got = sensitivity(model, [x[:16], x[16:]], [8, 9], samples=samples, generator=torch.Generator().manual_seed(1))
        assert _same(got, every)


def test_samples_below_the_row_count_are_the_generators_draw():
    model, x = build_model("mlp4", 10, seed=0), _x(64)
    got = sensitivity(model, [x], [2, 5], samples=8, generator=torch.Generator().manual_seed(3))
    rows = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:8]
    want = sensitivity(model, [x[rows]], [2, 5])
    assert _same(got, want)
    assert not _same(got, sensitivity(model, [x], [2, 5]))


def test_samples_must_be_positive():
    with pytest.raises(ValueError, match="samples must be at least 1"):
        sensitivity(build_model("mlp4", 10, seed=0), [_x(4)], [1], samples=0)


def test_a_sample_keeps_most_of_the_exact_selection():
    """Far above what a random mask keeps (Z itself): the sample ranks the same weights highest."""
    model, x = build_model("mlp4", 10, seed=0), _x(200)
    # A few training steps, so the sensitivity has the structure of a real helper's.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randint(10, (200,), generator=torch.Generator().manual_seed(4))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    exact = select(sensitivity(model, [x], [8, 9]), 0.5)
    sampled = select(sensitivity(model, [x], [8, 9], samples=32, generator=torch.Generator().manual_seed(0)), 0.5)
    kept = sum(np.intersect1d(exact[k].numpy(), sampled[k].numpy()).size for k in exact)
    assert kept / sum(v.numel() for v in exact.values()) > 0.75


def _learner(**cfg):
    base = build_model("mlp4", 10, seed=0).state_dict()
    model = build_model("mlp4", 10)
    model.load_state_dict(copy.deepcopy(base))
    return Learner(model, num_classes=10, config=LearnerConfig(**cfg), base_state=base, seed=0)


def test_learner_picks_from_every_row_by_default_and_from_a_sample_when_set():
    sampled, every = _learner(picker_samples=32), _learner()
    assert every.config.picker_samples == 0
    x = _x(100)
    y = torch.randint(10, (100,), generator=torch.Generator().manual_seed(0))
    for node in (sampled, every):
        node.process_batch(x, y)
    a, b = sampled.significant_for((8, 9), 0.5), every.significant_for((8, 9), 0.5)
    assert a.count == b.count
    assert any(not torch.equal(s.indices, t.indices) for s, t in zip(a.tensors, b.tensors))
    exact = select(sensitivity(every.model, every.reservoir.batches(), (8, 9)), 0.5)
    assert all(torch.equal(t.indices, exact[t.name]) for t in b.tensors)


def test_picker_samples_is_a_validated_run_time_knob():
    node = _learner()
    assert node.apply_config({"picker_samples": 64}).picker_samples == 64
    with pytest.raises(ConfigError, match="picker_samples"):
        node.apply_config({"picker_samples": -1})
    assert node.config.picker_samples == 64


def _reference_top(v, z):
    """The definition: the keep_count highest, ties to the lowest positions, sorted."""
    from agent.kt.selection import keep_count

    k = keep_count(v.size, z)
    return sorted(sorted(range(v.size), key=lambda i: (-v[i], i))[:k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_fraction_integer_keys_keep_the_float_order_and_ties(dtype):
    """Signs, -0.0 against +0.0 (equal, so a tie), infinities and heavy ties, in both widths."""
    from agent.kt.selection import top_fraction

    rng = np.random.default_rng(0)
    draws = [
        lambda n: rng.standard_normal(n),
        lambda n: rng.integers(-3, 3, n).astype(float),
        lambda n: rng.integers(0, 3, n).astype(float),
        lambda n: rng.choice([-0.0, 0.0, 1.0, -1.0, np.inf, -np.inf], n),
    ]
    for trial in range(200):
        v = draws[trial % 4](int(rng.integers(1, 60))).astype(dtype)
        for z in (0.1, 0.3, 0.5, 0.9):
            assert top_fraction(torch.from_numpy(v.copy()), z).tolist() == _reference_top(v, z), (v, z)


def test_cnn_sensitivity_leaves_grads_alone_and_works_under_no_grad():
    """The autograd path (one backward pass per class) builds its own leaves; a frozen parameter
    is never transferred, so it gets no score."""
    model = build_model("mobilenet_s", 10, seed=0)
    model.features[0].weight.requires_grad_(False)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        under_no_grad = sensitivity(model, [x], [2, 7])
    plain = sensitivity(model, [x], [2, 7])
    assert _same(under_no_grad, plain)
    assert all(p.grad is None for p in model.parameters())
    assert not model.features[0].weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "features.0.weight")
    assert "features.0.weight" not in plain
    assert set(plain) == {name for name, p in model.named_parameters() if p.requires_grad}


def test_cnn_sensitivity_matches_the_definition_in_eval_mode():
    model = build_model("mobilenet_s", 10, seed=0)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    got = sensitivity(model, [x], [3, 8])
    model.eval()
    want = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for c in (3, 8):
        model.zero_grad()
        torch.softmax(model(x), dim=1)[:, c].sum().backward()
        for name, p in model.named_parameters():
            want[name] += p.grad.abs() / 2
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_fraction_on_a_gpu_picks_what_the_host_path_picks(dtype):
    """The device path (no copy of the scores to the host) run here on CPU tensors: the same
    positions as the host path for finite scores, heavy ties included."""
    from agent.kt.selection import keep_count, top_fraction, top_on_device

    rng = np.random.default_rng(1)
    draws = [lambda n: rng.random(n), lambda n: rng.integers(0, 3, n).astype(float), lambda n: rng.choice([-0.0, 0.0, 1.0], n)]
    for trial in range(150):
        v = draws[trial % 3](int(rng.integers(2, 80))).astype(dtype)
        for z in (0.1, 0.3, 0.5, 0.9):
            k = keep_count(v.size, z)
            if k == v.size:
                continue
            assert top_on_device(torch.from_numpy(v.copy()), k).tolist() == top_fraction(torch.from_numpy(v.copy()), z).tolist() == _reference_top(v, z), (v, z)
