"""Sensitivity, selection and boosting: the pure KT mechanisms, checked on exact small cases."""

import copy
import math

import pytest
import torch
from torch import nn

from agent.kt import booster
from agent.kt.selection import keep_count, random_mask, select, significant_params, top_fraction
from agent.kt.sensitivity import (
    Reservoir,
    _class_output_vjp,
    _dense_stack,
    class_output_grads,
    sensitivity,
)
from agent.kt.sensitivity_map import SensitivityMap
from agent.models import arch_id, build_model, freeze_untrainable, lineage, param_shapes


def _loop_sensitivity(model, x, classes):
    """The definition, one class and one autograd call at a time: the reference."""
    out = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for c in classes:
        model.zero_grad()
        torch.softmax(model(x), dim=1)[:, c].sum().backward()
        for name, p in model.named_parameters():
            out[name] += p.grad.abs() / len(classes)
    return out


@pytest.mark.parametrize("arch,shape", [("mlp4", (16, 784)), ("intrusion_dnn", (16, 122))])
def test_sensitivity_matches_definition(arch, shape):
    model = build_model(arch, 10 if arch == "mlp4" else 5, seed=0)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    got = sensitivity(model, [x[:8], x[8:]], classes=[1, 3])
    want = _loop_sensitivity(model, x, [1, 3])
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), name


class _Forward(nn.Module):
    """A net whose forward is not just ``self.net(x)``: the fast path must not claim it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(2 * x)


def _plain_sequential():
    # No Flatten, a Linear without bias, and two Linears in a row (no ReLU between them).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 5), nn.Linear(5, 4))


class _UserMLP(nn.Module):
    """A user's dense model, none of the built-ins: nested stacks behind an annotated, documented forward."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            hidden = nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 8), nn.ReLU())
            self.body = nn.Sequential(nn.Flatten(), hidden, nn.Linear(8, 3))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits over three classes."""
        return self.body(inputs)


class _Residual(nn.Module):
    """Dense layers only, but the forward adds a skip connection: not a stack."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.hidden, self.out = nn.Linear(6, 6), nn.Linear(6, 3)
            self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.hidden(x)) + x)


DENSE = {
    "mlp4": (lambda: build_model("mlp4", 10, seed=0), (24, 784)),
    "intrusion_dnn": (lambda: build_model("intrusion_dnn", 5, seed=0), (24, 122)),
    "sequential": (_plain_sequential, (9, 6)),
    "image rows": (lambda: build_model("mlp4", 10, seed=1), (7, 28, 28)),
    "user model": (_UserMLP, (10, 3, 4)),
}


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_fast_path_equals_the_vjp_reference(name):
    build, shape = DENSE[name]
    model = build()
    assert _dense_stack(model) is not None
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    out = int(model(x).shape[1])
    classes = [out - 1, 0, 2]
    fast, ref = class_output_grads(model, x, classes), _class_output_vjp(model, x, classes)
    assert list(fast) == list(ref)
    for k in ref:
        assert fast[k].shape == ref[k].shape
        assert torch.allclose(fast[k], ref[k], rtol=1e-5, atol=1e-8), k
    # What the picker ranks by, and what it picks, are the reference's.
    s_fast = {k: g.abs().mean(dim=0) for k, g in fast.items()}
    s_ref = {k: g.abs().mean(dim=0) for k, g in ref.items()}
    for z in (0.05, 0.3, 0.5):
        assert all(torch.equal(a, b) for a, b in zip(select(s_fast, z).values(), select(s_ref, z).values()))


_SHARED = nn.Linear(4, 4)


@pytest.mark.parametrize("model", [
    build_model("mobilenet_s", 10, seed=0),
    _Forward(),
    _Residual(),
    nn.Sequential(nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3)),
    nn.Sequential(nn.Linear(6, 4), nn.ReLU()),
    nn.Sequential(nn.ReLU(), nn.Linear(6, 3)),
    nn.Sequential(nn.Linear(6, 4), nn.Flatten(), nn.Linear(4, 3)),
    nn.Sequential(_SHARED, nn.ReLU(), _SHARED),
], ids=["cnn", "custom forward", "residual", "sigmoid", "ends in relu", "starts with relu", "flatten inside",
        "layer run twice"])
def test_other_models_take_the_vjp_path(model):
    assert _dense_stack(model) is None


def test_a_model_that_is_not_a_stack_gets_its_own_gradients():
    # The residual forward's gradients, which the hand-written path could not give.
    model = _Residual()
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(1))
    got = sensitivity(model, [x], classes=[0, 2])
    want = _loop_sensitivity(model, x, [0, 2])
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), name


def test_sensitivity_with_batchnorm_leaves_running_stats_alone():
    model = build_model("mobilenet_s", 10, seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = sensitivity(model, [torch.rand(4, 1, 28, 28)], classes=[0])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(s) == set(dict(model.named_parameters()))


def test_sensitivity_bad_inputs():
    model = build_model("mlp4", 10, seed=0)
    x = torch.rand(4, 784)
    with pytest.raises(ValueError, match="outside"):
        sensitivity(model, [x], classes=[10])
    with pytest.raises(ValueError, match="duplicates"):
        sensitivity(model, [x], classes=[1, 1])
    with pytest.raises(ValueError, match="at least one requested"):
        sensitivity(model, [x], classes=[])
    with pytest.raises(ValueError, match="stored batch"):
        sensitivity(model, [], classes=[1])


def test_last_layer_sensitivity_concentrates_on_requested_rows():
    model = build_model("mlp4", 10, seed=0)
    s = sensitivity(model, [torch.rand(32, 784)], classes=[8, 9])
    rows = s["net.7.weight"].sum(dim=1)
    assert rows[8] > rows[:8].max() and rows[9] > rows[:8].max()


def test_reservoir_keeps_last_b():
    r = Reservoir(2)
    for i in range(4):
        r.add(torch.full((1,), float(i)))
    assert [float(t) for t in r.batches()] == [2.0, 3.0]
    r.resize(1)
    assert [float(t) for t in r.batches()] == [3.0]
    with pytest.raises(ValueError):
        Reservoir(0)


@pytest.mark.parametrize("z,expected", [(0.25, [1]), (0.5, [1, 3]), (0.75, [1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_fraction_exact(z, expected):
    assert top_fraction(torch.tensor([0.1, 0.9, 0.5, 0.9]), z).tolist() == expected


def test_top_fraction_ties_go_to_lowest_positions():
    assert top_fraction(torch.ones(10), 0.3).tolist() == [0, 1, 2]
    score = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert top_fraction(score, 0.5).tolist() == [1, 2]


def _kthvalue_top_fraction(score, z):
    """The selection rule with torch.kthvalue, as the fast numpy path must reproduce it."""
    flat = score.reshape(-1)
    n, k = flat.numel(), keep_count(flat.numel(), z)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    mask[(flat == threshold).nonzero().reshape(-1)[: k - int(mask.sum())]] = True
    return mask.nonzero().reshape(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_top_fraction_equals_kthvalue_rule_with_ties(dtype):
    g = torch.Generator().manual_seed(4)
    # Few distinct values: many ties straddle every threshold.
    score = torch.randint(0, 5, (50, 13), generator=g).to(dtype)
    for z in (0.01, 0.1, 0.37, 0.5, 0.9):
        got = top_fraction(score, z)
        assert got.dtype == torch.int64
        assert got.tolist() == _kthvalue_top_fraction(score.float(), z).tolist()


def test_select_matches_full_sort_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(37, 11, generator=g), "b": torch.rand(5, generator=g)}
    for z in (0.01, 0.2, 0.5, 0.99):
        picked = select(scores, z)
        for name, s in scores.items():
            k = keep_count(s.numel(), z)
            want = torch.sort(torch.argsort(s.reshape(-1), descending=True, stable=True)[:k]).values
            assert picked[name].tolist() == want.tolist()


@pytest.mark.parametrize("z", [0.0, -0.1, 1.01, math.nan, math.inf])
def test_z_out_of_range(z):
    with pytest.raises(ValueError, match="z must be"):
        select({"a": torch.rand(4)}, z)


def test_random_mask_same_count_as_select():
    shapes = {"a": (10, 10), "b": (7,)}
    m = random_mask(shapes, 0.3, torch.Generator().manual_seed(0))
    assert [len(v) for v in m.values()] == [30, 3]
    assert all(torch.equal(v, v.sort().values) and len(set(v.tolist())) == len(v) for v in m.values())


def _pair():
    target = build_model("mlp4", 10, seed=0)
    helper = build_model("mlp4", 10, seed=0)
    with torch.no_grad():
        for p in helper.parameters():
            p.add_(1.0)
    return target, helper


def _sig(helper, z, classes=(8, 9)):
    scores = sensitivity(helper, [torch.rand(16, 784)], classes)
    return significant_params(helper, select(scores, z), arch_id=arch_id(helper), lineage=lineage(helper), classes=classes, z=z)


def test_boost_with_z_one_gives_the_helpers_weights():
    target, helper = _pair()
    boosted = booster.boosted_helper(target, _sig(helper, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(boosted.parameters(), helper.parameters()))
    assert not any(p.requires_grad for p in boosted.parameters()) and not boosted.training


def test_boost_writes_only_selected_positions_and_leaves_target_untouched():
    target, helper = _pair()
    before = [p.clone() for p in target.parameters()]
    sig = _sig(helper, 0.3)
    boosted = booster.boosted_helper(target, sig)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    by_name = sig.by_name()
    for (name, p), t0 in zip(boosted.named_parameters(), before):
        changed = (p != t0).reshape(-1).nonzero().reshape(-1)
        assert changed.tolist() == by_name[name].indices.tolist()


def test_zero_filled_helper_is_zero_elsewhere():
    target, helper = _pair()
    sig = _sig(helper, 0.2)
    zf = booster.zero_filled_helper(target, sig)
    for name, p in zf.named_parameters():
        t = sig.by_name()[name]
        flat = p.reshape(-1)
        assert torch.equal(flat[t.indices], t.values)
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[t.indices] = False
        assert not flat[mask].any()


def test_replace_and_average_change_the_target_in_place():
    target, helper = _pair()
    sig = _sig(helper, 0.5)
    t = sig.tensors[0]
    original = dict(target.named_parameters())[t.name].detach().reshape(-1)[t.indices].clone()
    booster.apply_average(target, sig, alpha=0.5)
    now = dict(target.named_parameters())[t.name].detach().reshape(-1)[t.indices]
    assert torch.allclose(now, (original + t.values) / 2)
    booster.apply_replace(target, sig)
    assert torch.equal(dict(target.named_parameters())[t.name].detach().reshape(-1)[t.indices], t.values)


def _storages(model):
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}


def _trained_cnn():
    model = build_model("mobilenet_s", 10, seed=0).train()
    model(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))).sum().backward()  # stats + grads
    return model


@pytest.mark.parametrize("build", [lambda: build_model("mlp4", 10, seed=0), _trained_cnn], ids=["mlp4", "mobilenet_s"])
def test_frozen_copy_is_an_independent_frozen_equal_model(build):
    target = build()
    state = {k: v.clone() for k, v in target.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in target.parameters()]
    frozen = booster.frozen_copy(target)
    # The target: same values, still training, still trainable, its grads untouched.
    assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())
    assert all(m.training for m in target.modules()) and all(p.requires_grad for p in target.parameters())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, target.parameters()))
    # The copy: the same parameters and buffers (batch-norm statistics included), in storage of its own.
    assert type(frozen) is type(target) and frozen is not target
    assert list(frozen.state_dict()) == list(target.state_dict())
    assert all(torch.equal(state[k], v) for k, v in frozen.state_dict().items())
    assert not _storages(frozen) & _storages(target)
    assert not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())
    assert all(type(p) is nn.Parameter for p in frozen.parameters())
    # It computes what the target does in eval mode, and writing into it leaves the target alone.
    x = torch.rand(3, 784, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = copy.deepcopy(target).eval()(x)
        assert torch.equal(frozen(x), want)
        for t in [*frozen.parameters(), *frozen.buffers()]:
            t.fill_(3)
    assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())


def test_frozen_copy_keeps_ties_and_copies_hooks_and_attributes():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.register_buffer("scale", torch.ones(4))
            self.mask = torch.ones(4)  # a plain tensor attribute
            self.widths = [4, 4]

        def forward(self, x):
            return self.b(self.a(x)) * self.scale * self.mask

    target = Tied()
    calls = []
    target.register_forward_hook(lambda m, i, o: calls.append(1))
    frozen = booster.frozen_copy(target)
    assert frozen.a.weight is frozen.b.weight and frozen.a.weight is not target.a.weight
    assert len(list(frozen.parameters())) == len(list(target.parameters()))
    assert torch.equal(frozen.mask, target.mask) and frozen.mask.data_ptr() != target.mask.data_ptr()
    assert frozen.widths == target.widths and frozen.widths is not target.widths
    frozen(torch.rand(2, 4))
    assert calls == [1]  # the hook came along, as with deepcopy
    frozen.register_forward_hook(lambda m, i, o: calls.append(2))
    target(torch.rand(2, 4))
    assert calls == [1, 1]  # but the tables are the copy's own


def test_frozen_copy_of_aliased_buffers_keeps_them_aliased():
    target = nn.Module()
    target.register_buffer("whole", torch.arange(6.0))
    target.register_buffer("head", target.whole[:3])
    frozen = booster.frozen_copy(target)
    frozen.whole.zero_()
    assert not frozen.head.any() and torch.equal(target.head, torch.arange(3.0))


def test_frozen_copy_with_zero_params_zeroes_parameters_only():
    target = _trained_cnn()
    frozen = booster.frozen_copy(target, zero_params=True)
    assert not any(p.any() for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen.buffers(), target.buffers()))
    assert any(p.any() for p in target.parameters())


def test_boost_on_a_cnn_with_batch_norm():
    target, helper = build_model("mobilenet_s", 10, seed=0), build_model("mobilenet_s", 10, seed=1)
    rnd = random_mask(param_shapes(helper), 0.5, torch.Generator().manual_seed(0))
    sig = significant_params(helper, rnd, arch_id="a", lineage="l", classes=(8, 9), z=0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    boosted = booster.boosted_helper(target, sig)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    params = dict(boosted.named_parameters())
    for t in sig.tensors:
        flat = params[t.name].reshape(-1)
        assert torch.equal(flat[t.indices], t.values)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[t.indices] = False
        assert torch.equal(flat[keep], before[t.name].reshape(-1)[keep])
    assert not _storages(boosted) & _storages(target) and not boosted.training


def test_booster_refuses_wrong_shapes():
    target, helper = _pair()
    sig = _sig(helper, 0.5)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 3))
    with pytest.raises((KeyError, ValueError)):
        booster.boosted_helper(other, sig)


def test_sensitive_transfer_beats_random_at_same_z():
    """On a helper that learnt classes the target never saw, Z=0.5 by sensitivity carries them; random does not."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 784, generator=g)

    def data(classes, n):
        y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        return centres[y] + 0.8 * torch.randn(n, 784, generator=g), y

    base = build_model("mlp4", 10, seed=0)
    target, helper = build_model("mlp4", 10), build_model("mlp4", 10)
    target.load_state_dict(base.state_dict())
    helper.load_state_dict(base.state_dict())
    for model, classes in ((target, list(range(8))), (helper, list(range(10)))):
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(30):
            x, y = data(classes, 64)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    x, y = data([8, 9], 400)
    sig = _sig(helper, 0.5)
    rnd = random_mask(param_shapes(helper), 0.5, torch.Generator().manual_seed(0))
    rsig = significant_params(helper, rnd, arch_id="a", lineage="l", classes=(8, 9), z=0.5)

    def acc(m):
        return float((m(x).argmax(1) == y).float().mean())

    assert acc(target) < 0.05
    assert acc(booster.boosted_helper(target, sig)) > acc(booster.boosted_helper(target, rsig)) + 0.3


# --- frozen and tied parameters ----------------------------------------------------------------


def _frozen_mlp():
    """A dense stack whose first layer is frozen (``trainable = ["2."]``, the rest)."""
    model = _plain_sequential()
    freeze_untrainable(model, ["2.", "3."])
    return model


def _tied_stack():
    # Two layers, one weight: a dense stack by its modules, but its gradients must be summed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    return model


def test_a_stack_that_shares_a_weight_takes_the_vjp_path_and_sums_its_uses():
    model = _tied_stack()
    assert _dense_stack(model) is None
    x = torch.rand(7, 6, generator=torch.Generator().manual_seed(2))
    got = sensitivity(model, [x], classes=[0, 2])
    want = _loop_sensitivity(model, x, [0, 2])
    assert list(got) == ["0.weight", "0.bias", "2.bias", "4.weight", "4.bias"]
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), name


def test_only_trainable_parameters_get_a_sensitivity_on_either_path():
    model = _frozen_mlp()
    assert _dense_stack(model) is not None
    x = torch.rand(9, 6, generator=torch.Generator().manual_seed(3))
    fast, ref = class_output_grads(model, x, [0, 3]), _class_output_vjp(model, x, [0, 3])
    assert list(fast) == list(ref) == ["2.weight", "2.bias", "3.weight", "3.bias"]
    for k in ref:
        assert torch.allclose(fast[k], ref[k], rtol=1e-5, atol=1e-8), k
    full = _class_output_vjp(_plain_sequential(), x, [0, 3])
    assert all(torch.allclose(ref[k], full[k], rtol=1e-5, atol=1e-8) for k in ref), "freezing a layer changes no other gradient"
    assert not any(p.grad is not None for p in model.parameters()) and not model[0].weight.requires_grad
    assert list(param_shapes(model)) == ["2.weight", "2.bias", "3.weight", "3.bias"]
    smap = SensitivityMap(model, 4, classes_per_update=4)
    smap.update(model, x)
    assert list(smap.lookup([1])) == list(ref)
    frozen = nn.Sequential(nn.Linear(3, 2))
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        sensitivity(frozen, [torch.rand(2, 3)], classes=[0])


def test_helpers_of_a_partly_frozen_target_keep_its_frozen_weights():
    target, helper = _frozen_mlp(), _plain_sequential()
    with torch.no_grad():
        for p in helper.parameters():
            p.add_(1.0)
    shapes = param_shapes(target)
    positions = random_mask(shapes, 0.5, torch.Generator().manual_seed(0))
    sig = significant_params(helper, positions, arch_id="a", lineage="l", classes=(1,), z=0.5)
    assert [t.name for t in sig.tensors] == list(shapes)
    zero = booster.zero_filled_helper(target, sig)
    assert torch.equal(zero[0].weight, target[0].weight), "the frozen layer is the base, not knowledge: never zeroed"
    assert not zero[3].bias.reshape(-1)[[i for i in range(4) if i not in sig.by_name()["3.bias"].indices.tolist()]].any()
    branch = booster.live_branch(booster.boosted_helper(target, sig), shapes.keys())
    assert [name for name, p in branch.named_parameters() if p.requires_grad] == list(shapes)
    assert torch.equal(branch[0].weight, target[0].weight)
