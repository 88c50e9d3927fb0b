"""Vetting received significant parameters: the blob answers the request, the helper works."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from agent.kt import booster, codec
from agent.kt.errors import KtRejected
from agent.kt.selection import keep_count, select, significant_params
from agent.kt.sensitivity import sensitivity
from agent.kt.significant import SignificantParams, TensorSlice
from agent.kt.vetting import vet_helper_outputs, vet_significant

NUM_CLASSES = 10
CLASSES = (8, 9)
Z = 0.3


class Fleet:
    """A target that learnt classes 0-7 and a helper that learnt 0-9, from one base.

    Gaussian clusters in 16-d: the helper's significant parameters for 8 and 9 make a boosted
    helper that gets those classes right where the target gets none, in a fraction of a second.
    """

    def __init__(self) -> None:
        self.g = torch.Generator().manual_seed(0)
        self.centres = 3 * torch.randn(NUM_CLASSES, 16, generator=self.g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
        self.target = self.trained(range(8))
        self.helper = self.trained(range(NUM_CLASSES))
        # The target's last request batch: mostly old classes, a few of the new ones.
        self.x, self.y = self.batch(list(range(8)) + [8, 9] * 4)
        scores = sensitivity(self.helper, [self.x], CLASSES)
        self.sig = significant_params(
            self.helper, select(scores, Z), arch_id="arch", lineage="lin", classes=CLASSES, z=Z
        )

    def batch(self, classes: list[int] | range, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(list(classes))[torch.randint(len(classes), (n,), generator=self.g)]
        return self.centres[y] + torch.randn(n, 16, generator=self.g), y

    def trained(self, classes: range) -> nn.Module:
        model = copy.deepcopy(self.base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            x, y = self.batch(classes)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    def reference(self) -> dict[str, torch.Tensor]:
        return dict(self.target.named_parameters())

    def decode(self, blob: bytes) -> SignificantParams:
        shapes = {name: tuple(p.shape) for name, p in self.target.named_parameters()}
        return codec.decode_blob(blob, arch_id="arch", lineage="lin", shapes=shapes, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


def _vet(fleet: Fleet, sig: SignificantParams, **kw: object) -> None:
    args: dict[str, object] = {"classes": CLASSES, "z": Z, "reference": fleet.reference()}
    args.update(kw)
    vet_significant(sig, **args)


def _slices(sig: SignificantParams, edit: Callable[[TensorSlice], TensorSlice | None]) -> SignificantParams:
    kept = tuple(t for t in (edit(t) for t in sig.tensors) if t is not None)
    return SignificantParams(sig.arch_id, sig.lineage, sig.classes, sig.z, kept)


def _head(t: TensorSlice, n: int) -> TensorSlice:
    return TensorSlice(t.name, t.shape, t.indices[:n], t.values[:n])


# --- the honest path ---------------------------------------------------------------------------


@pytest.mark.parametrize("value_codec", ["float32", "float16", "int8"])
def test_honest_blob_and_helper_pass(fleet: Fleet, value_codec: str) -> None:
    blob = codec.encode_blob(fleet.sig, value_codec=value_codec)
    sig = fleet.decode(blob)
    _vet(fleet, sig)
    helper = booster.boosted_helper(fleet.target, sig)
    vet_helper_outputs(helper, fleet.x, fleet.y, CLASSES, NUM_CLASSES)
    vet_helper_outputs(helper, fleet.x, None, CLASSES, NUM_CLASSES)
    # The check has teeth here: the target alone is below chance on the classes the helper brings.
    new = torch.isin(fleet.y, torch.tensor(CLASSES))
    with torch.no_grad():
        assert float((fleet.target(fleet.x).argmax(1)[new] == fleet.y[new]).float().mean()) < 1 / NUM_CLASSES


# --- the blob must answer the request ----------------------------------------------------------


def test_other_classes_than_asked_rejected(fleet: Fleet) -> None:
    with pytest.raises(KtRejected, match=r"^blob carries classes \[8, 9\], \[4, 6\] were asked for$"):
        _vet(fleet, fleet.sig, classes=(4, 6))
    with pytest.raises(KtRejected, match=r"classes \[8, 9\], \[8\] were asked for"):
        _vet(fleet, fleet.sig, classes=(8,))
    _vet(fleet, fleet.sig, classes=(9, 8))


def test_other_z_than_asked_rejected(fleet: Fleet) -> None:
    with pytest.raises(KtRejected, match="^blob carries z=0.3, 0.5 was asked for$"):
        _vet(fleet, fleet.sig, z=0.5)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: _head(t, 1), r"'0.weight' carries 1 of 512 parameters, z=0.3 asks for 154"),
        (lambda t: _head(t, t.indices.numel() // 2), r"'0.weight' carries 77 of 512 parameters"),
        (lambda t: None if t.name == "2.bias" else t, r"^blob lacks tensors \['2.bias'\]$"),
    ],
    ids=["one each", "half each", "tensor missing"],
)
def test_fewer_parameters_than_asked_rejected(
    fleet: Fleet, edit: Callable[[TensorSlice], TensorSlice | None], match: str
) -> None:
    with pytest.raises(KtRejected, match=match):
        _vet(fleet, _slices(fleet.sig, edit))


def test_more_parameters_than_asked_rejected(fleet: Fleet) -> None:
    w = fleet.reference()["0.weight"].detach().reshape(-1)
    every = TensorSlice("0.weight", (32, 16), torch.arange(512), w.clone())
    with pytest.raises(KtRejected, match="'0.weight' carries 512 of 512 parameters, z=0.3 asks for 154"):
        _vet(fleet, _slices(fleet.sig, lambda t: every if t.name == "0.weight" else t))
    extra = TensorSlice("3.weight", (2,), torch.tensor([0]), torch.tensor([0.1]))
    sig = SignificantParams("arch", "lin", CLASSES, Z, (*fleet.sig.tensors, extra))
    with pytest.raises(KtRejected, match=r"^blob carries tensors \['3.weight'\] that the model lacks$"):
        _vet(fleet, sig)


def test_count_slack_forgives_rounding(fleet: Fleet) -> None:
    # One short of keep_count in every tensor: what a helper rounding z·numel down would send.
    assert all(t.indices.numel() == keep_count(t.numel, Z) for t in fleet.sig.tensors)
    _vet(fleet, _slices(fleet.sig, lambda t: _head(t, t.indices.numel() - 1)))


# --- values must be in range of the target's own weights ---------------------------------------


def test_huge_finite_values_pass_the_codec_but_not_vetting(fleet: Fleet) -> None:
    huge = _slices(
        fleet.sig, lambda t: TensorSlice(t.name, t.shape, t.indices, torch.full_like(t.values, 3e38))
    )
    blob = codec.encode_blob(huge, value_codec="float32")
    sig = fleet.decode(blob)
    with pytest.raises(KtRejected, match=r"^tensor '0.weight' carries values up to 3e\+38, over its bound "):
        _vet(fleet, sig)
    # And were it installed, the helper it makes overflows.
    with pytest.raises(KtRejected, match="^helper's outputs on the last batch are not finite$"):
        vet_helper_outputs(booster.boosted_helper(fleet.target, sig), fleet.x, None, CLASSES, NUM_CLASSES)


def _one(name: str, shape: tuple[int, ...], value: float) -> SignificantParams:
    sl = TensorSlice(name, shape, torch.tensor([0]), torch.tensor([value]))
    return SignificantParams("arch", "lin", CLASSES, 0.5, (sl,))


@pytest.mark.parametrize(
    ("value", "ok"),
    [(1.9, True), (-2.0, True), (2.1, False), (-2.1, False), (float("nan"), False)],
)
def test_value_bound_is_a_multiple_of_the_largest_local_weight(value: float, ok: bool) -> None:
    reference = {"w": torch.tensor([0.1, -0.2])}  # bound: 10 x 0.2
    sig = _one("w", (2,), value)
    if ok:
        vet_significant(sig, classes=CLASSES, z=0.5, reference=reference)
    else:
        with pytest.raises(KtRejected, match="'w' carries values up to .*, over its bound 2$"):
            vet_significant(sig, classes=CLASSES, z=0.5, reference=reference)


@pytest.mark.parametrize(("value", "ok"), [(0.99, True), (-1.0, True), (1.01, False)])
def test_value_bound_has_a_floor_for_tensors_held_at_zero(value: float, ok: bool) -> None:
    reference = {"b": torch.zeros(2)}
    sig = _one("b", (2,), value)
    if ok:
        vet_significant(sig, classes=CLASSES, z=0.5, reference=reference)
    else:
        with pytest.raises(KtRejected, match="over its bound 1$"):
            vet_significant(sig, classes=CLASSES, z=0.5, reference=reference)


# --- the helper must work on the last batch ----------------------------------------------------


def _constant(predicts: int) -> nn.Module:
    """A model that predicts one class whatever its input."""
    model = nn.Linear(16, NUM_CLASSES)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.bias[predicts] = 1.0
    return model.eval()


def test_helper_below_chance_on_its_classes_rejected(fleet: Fleet) -> None:
    # Output rows rolled by one: in range and finite, but every class comes out as the next.
    garbled = booster.boosted_helper(fleet.target, fleet.sig)
    with torch.no_grad():
        garbled[2].weight.copy_(garbled[2].weight.roll(1, dims=0))
        garbled[2].bias.copy_(garbled[2].bias.roll(1))
    n = int(torch.isin(fleet.y, torch.tensor(CLASSES)).sum())
    want = rf"^helper gets 0 of {n} samples of classes \[8, 9\] right on the last batch, below chance \(1/10\)$"
    with pytest.raises(KtRejected, match=want):
        vet_helper_outputs(garbled, fleet.x, fleet.y, CLASSES, NUM_CLASSES)
    # With no labelled sample of its classes, finite outputs are all that can be asked.
    old, old_y = fleet.batch(range(8))
    vet_helper_outputs(garbled, old, old_y, CLASSES, NUM_CLASSES)
    vet_helper_outputs(garbled, fleet.x, None, CLASSES, NUM_CLASSES)


def test_chance_is_one_in_num_classes() -> None:
    always_8 = _constant(8)
    # 1 of 10 right is chance exactly, and kept; 0 of 10 is below.
    vet_helper_outputs(always_8, torch.randn(10, 16), torch.tensor([8] + [9] * 9), CLASSES, NUM_CLASSES)
    with pytest.raises(KtRejected, match="gets 0 of 10 samples"):
        vet_helper_outputs(always_8, torch.randn(10, 16), torch.tensor([9] * 10), CLASSES, NUM_CLASSES)
    # Only samples of the helper's classes count: 1 of 11, whatever the four of class 0.
    y = torch.tensor([8] + [9] * 10 + [0] * 4)
    with pytest.raises(KtRejected, match="gets 1 of 11 samples"):
        vet_helper_outputs(always_8, torch.randn(15, 16), y, CLASSES, NUM_CLASSES)


def test_non_finite_outputs_rejected_without_labels() -> None:
    overflow = _constant(8)
    with torch.no_grad():
        overflow.weight.fill_(3e38)
    with pytest.raises(KtRejected, match="not finite"):
        vet_helper_outputs(overflow, torch.ones(4, 16), None, CLASSES, NUM_CLASSES)
