"""The continuous picker (factored, rotating sensitivity map), checked against the on-demand picker."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agent.kt.selection import select
from agent.kt.sensitivity import _class_output_vjp, sensitivity
from agent.kt.sensitivity_map import SensitivityMap
from agent.models import build_model


def _trained_mlp(seed, *, image_like):
    """An MLP after ten Adam steps on ten Gaussian class clusters, and a fresh batch of 64 from them.

    ``image_like``: cluster inputs clamped to [0, 1] like pixels (Fashion-MNIST's case); otherwise
    signed, unit-noise features (the harder case for a rank-1 estimate of the first layer).
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(10, 784, generator=g) if image_like else torch.randn(10, 784, generator=g)

    def batch(n):
        y = torch.randint(10, (n,), generator=g)
        if image_like:
            return (centres[y] + 0.5 * torch.randn(n, 784, generator=g)).clamp_(0, 1), y
        return centres[y] + 1.5 * torch.randn(n, 784, generator=g), y

    model = build_model("mlp4", 10, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        xb, yb = batch(100)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model, batch(64)[0]


def _overlap(got, want):
    """Share of the wanted positions, over all tensors, that ``got`` picked too."""
    hits = sum(len(np.intersect1d(got[k].numpy(), want[k].numpy())) for k in want)
    return hits / sum(len(v) for v in want.values())


def _one_d(model):
    return [name for name, p in model.named_parameters() if p.dim() < 2]


def test_lookup_before_any_update_raises():
    model = build_model("mlp4", 10, seed=0)
    smap = SensitivityMap(model, 10)
    assert smap.updates == 0 and not smap.covers([0])
    with pytest.raises(ValueError, match=r"not yet seen classes \[1\]"):
        smap.lookup([1])


def test_lookup_names_the_classes_not_yet_refreshed():
    model = build_model("mlp4", 10, seed=0)
    smap = SensitivityMap(model, 10, classes_per_update=3)
    smap.update(model, torch.rand(8, 784))
    assert smap.covers([0, 2]) and not smap.covers([2, 3])
    assert set(smap.lookup([0, 2])) == set(dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"not yet seen classes \[3, 9\]"):
        smap.lookup([3, 1, 9])
    with pytest.raises(ValueError, match="duplicates"):
        smap.covers([1, 1])
    with pytest.raises(ValueError, match="outside"):
        smap.lookup([10])


def test_round_robin_order_is_deterministic():
    model = build_model("mlp4", 10, seed=0)
    smap = SensitivityMap(model, 10, classes_per_update=3)
    order = []
    for _ in range(4):
        order.append(smap.next_classes())
        smap.update(model, torch.rand(4, 784))
    assert order == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 0, 1)]
    assert smap.updates == 4 and smap.covers(range(10))


def test_same_seed_same_map_other_seed_other_rows():
    model = build_model("mlp4", 10, seed=0)
    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(0))
    maps = [SensitivityMap(model, 10, samples=8, classes_per_update=10, seed=s) for s in (0, 0, 1)]
    for smap in maps:
        smap.update(model, x)
        smap.update(model, x)
    a, b, c = (m.lookup([4]) for m in maps)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch,shape", [("mlp4", (24, 784)), ("mobilenet_s", (6, 1, 28, 28))], ids=["fast path", "vjp path"])
def test_one_d_parameters_are_exact_and_marginals_match(arch, shape):
    # decay 0 and every row used: 1-D tensors hold the exact mean |G|, and a weight's rank-1
    # estimate has exactly the exact mean's row and column sums (the values keep their scale).
    model = build_model(arch, 10, seed=0)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    smap = SensitivityMap(model, 10, decay=0.0, samples=shape[0], classes_per_update=2)
    smap.update(model, x)
    for classes in ([0], [1, 0]):
        got, want = smap.lookup(classes), sensitivity(model, [x], classes)
        for name, p in model.named_parameters():
            assert got[name].shape == p.shape and got[name].dtype == torch.float32
            if p.dim() < 2:
                assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-10), name
            else:
                g, w = got[name].reshape(p.shape[0], -1), want[name].reshape(p.shape[0], -1)
                assert torch.allclose(g.sum(dim=1), w.sum(dim=1), rtol=1e-4, atol=1e-9), name
                assert torch.allclose(g.sum(dim=0), w.sum(dim=0), rtol=1e-4, atol=1e-9), name
    assert _one_d(model)


def test_moving_average_per_refresh_matches_the_vjp_reference():
    # The old exact map's check, on the marginals: fast path (mlp4) against functorch's VJP,
    # four classes per update (written side by side), decay blended per refresh of a class.
    model = build_model("mlp4", 10, seed=0)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.rand(16, 784, generator=gen) for _ in range(6)]
    smap = SensitivityMap(model, 10, decay=0.5, samples=16, classes_per_update=4)
    for x in xs:
        smap.update(model, x)
    # Updates refresh 0–3, 4–7, 8–1, 2–5, 6–9, 0–3: class 1 at updates 0, 2 and 5.
    refreshed = [i for i in range(6) if 1 in [(4 * i + j) % 10 for j in range(4)]]
    assert refreshed == [0, 2, 5]
    ref = None
    for i in refreshed:
        g = _class_output_vjp(model, xs[i], [1])
        now = {n: t[0].abs() for n, t in g.items()}
        ref = now if ref is None else {n: 0.5 * ref[n] + 0.5 * now[n] for n in now}
    got = smap.lookup([1])
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-10), name
        else:
            g = got[name]
            assert torch.allclose(g.sum(dim=1), ref[name].sum(dim=1), rtol=1e-4, atol=1e-9), name
            assert torch.allclose(g.sum(dim=0), ref[name].sum(dim=0), rtol=1e-4, atol=1e-9), name


def test_first_refresh_sets_and_later_ones_blend():
    model = build_model("mlp4", 10, seed=0)
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.rand(8, 784, generator=gen), torch.rand(8, 784, generator=gen)
    smap = SensitivityMap(model, 10, decay=0.8, samples=8, classes_per_update=10)
    smap.update(model, x1)
    s1 = sensitivity(model, [x1], [5])
    assert torch.allclose(smap.lookup([5])["net.7.bias"], s1["net.7.bias"], rtol=1e-5)
    smap.update(model, x2)
    want = 0.8 * s1["net.7.bias"] + 0.2 * sensitivity(model, [x2], [5])["net.7.bias"]
    assert torch.allclose(smap.lookup([5])["net.7.bias"], want, rtol=1e-5)


def test_subset_is_scaled_to_the_whole_batch():
    # 64 copies of one row: any 16 of them, scaled by 64/16, give the whole batch's sensitivity.
    model = build_model("mlp4", 10, seed=0)
    x = torch.rand(1, 784, generator=torch.Generator().manual_seed(4)).expand(64, 784).contiguous()
    smap = SensitivityMap(model, 10, decay=0.0, samples=16, classes_per_update=10)
    smap.update(model, x)
    want = sensitivity(model, [x], [2, 7])
    got = smap.lookup([2, 7])
    for name in _one_d(model):
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-10), name


@pytest.mark.parametrize("image_like,floor", [(True, 0.9), (False, 0.65)], ids=["pixel inputs", "signed inputs"])
@pytest.mark.parametrize("z", [0.2, 0.5])
def test_top_z_from_the_map_overlaps_the_on_demand_pick(image_like, floor, z):
    # Measured at seeds 0–4: pixel-like inputs 0.97–0.99 (Fashion-MNIST itself gives ~0.90 at
    # Z = 0.5), signed inputs 0.63–0.80 (~0.75 at Z = 0.5); random positions would give Z.
    model, x = _trained_mlp(0, image_like=image_like)
    smap = SensitivityMap(model, 10, decay=0.0, samples=x.shape[0])
    for _ in range(10):
        smap.update(model, x)
    assert smap.covers(range(10))
    for classes in ([8, 9], [3]):
        got = select(smap.lookup(classes), z)
        want = select(sensitivity(model, [x], classes), z)
        assert _overlap(got, want) >= max(floor, z + 0.15), classes


def test_stream_tracks_the_on_demand_pick_of_the_latest_batch():
    # Defaults (16 rows, one class per batch, decay 0.5) on a stream from a frozen model: the
    # map's pick agrees with the on-demand pick of the last batch (all 64 rows) about as well as
    # two on-demand picks of different batches agree (both 0.97–0.98 at seeds 0–4).
    model, _ = _trained_mlp(1, image_like=True)
    g = torch.Generator().manual_seed(5)
    smap = SensitivityMap(model, 10)
    for _ in range(30):
        x = torch.rand(64, 784, generator=g)
        smap.update(model, x)
    got = select(smap.lookup([8, 9]), 0.5)
    want = select(sensitivity(model, [x], [8, 9]), 0.5)
    assert _overlap(got, want) >= 0.9


@pytest.mark.parametrize("arch", ["mlp4", "mobilenet_s"])
def test_memory_is_under_the_model_size(arch):
    model = build_model(arch, 10, seed=0)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    smap = SensitivityMap(model, 10)
    assert smap.nbytes <= param_bytes
    if arch == "mlp4":
        # 10 classes × (rows + cols of each weight + each bias), plus one scratch row, float32.
        per_class = (512 + 784) + (128 + 512) + (64 + 128) + (10 + 64) + (512 + 128 + 64 + 10)
        assert smap.nbytes == (10 + 1) * per_class * 4
        assert smap.nbytes < 0.1 * param_bytes


def test_scalar_parameters_are_kept_in_full():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    model.register_parameter("gain", nn.Parameter(torch.tensor(1.0)))
    smap = SensitivityMap(model, 2, decay=0.0, samples=8, classes_per_update=2)
    x = torch.rand(8, 3)
    smap.update(model, x)
    got = smap.lookup([0, 1])
    assert got["gain"].shape == () and float(got["gain"]) == 0.0  # unused by forward: no sensitivity
    assert got["0.weight"].shape == (4, 3)


def test_empty_batch_raises():
    model = build_model("mlp4", 10, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        SensitivityMap(model, 10).update(model, torch.rand(0, 784))


@pytest.mark.parametrize("kwargs,match", [
    ({"decay": -0.1}, "decay"),
    ({"decay": 1.0}, "decay"),
    ({"decay": math.nan}, "decay"),
    ({"samples": 0}, "samples"),
    ({"samples": 1.5}, "samples"),
    ({"samples": True}, "samples"),
    ({"classes_per_update": 0}, "classes_per_update"),
    ({"classes_per_update": 11}, "classes_per_update"),
    ({"classes_per_update": 2.0}, "classes_per_update"),
    ({"num_classes": 0}, "num_classes"),
])
def test_bad_constructor_arguments_raise(kwargs, match):
    model = build_model("mlp4", 10, seed=0)
    num_classes = kwargs.pop("num_classes", 10)
    with pytest.raises(ValueError, match=match):
        SensitivityMap(model, num_classes, **kwargs)
