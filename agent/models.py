"""The model architectures every node of a fleet runs, and the ids that say two models can share weights.

Outputs are logits over C classes. ``arch_id`` names an architecture (its class name and ordered
parameter names and shapes); ``lineage`` names the base weights a node started from. Writing one
network's weights into another only means something when both ids agree (ARCHITECTURE §1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn


def _dense_stack(in_features: int, widths: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """Linear + ReLU per hidden width, then the logits layer."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return layers + [nn.Linear(in_features, num_classes)]


class MLP4(nn.Module):
    """4-layer MLP for 28×28 images (≈476k parameters at 10 classes): the default model."""

    arch_name = "mlp4"

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), *_dense_stack(in_features, (512, 128, 64), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class IntrusionDNN(nn.Module):
    """4-layer DNN for the 122 NSL-KDD inputs (≈211k parameters at 5 classes, the paper's ≈209k model)."""

    arch_name = "intrusion_dnn"

    def __init__(self, num_classes: int = 5, in_features: int = 122) -> None:
        super().__init__()
        self.net = nn.Sequential(*_dense_stack(in_features, (512, 256, 64), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class MobileNetS(nn.Module):
    """MobileNet-style CNN (depthwise-separable blocks) for 1×28×28 images, for paper-scale runs."""

    arch_name = "mobilenet_s"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, side: int = 28) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            _separable(32, 64, 1),
            _separable(64, 128, 2),
            _separable(128, 128, 1),
            _separable(128, 256, 2),
            _separable(256, 256, 1),
            _separable(256, 512, 2),
            _separable(512, 512, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # Flat rows (what the feeder sends); fixed sizes keep the ONNX export traceable.
            x = x.reshape(-1, self.in_channels, self.side, self.side)
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    MLP4.arch_name: MLP4,
    IntrusionDNN.arch_name: IntrusionDNN,
    MobileNetS.arch_name: MobileNetS,
}


def build_model(name: str, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """Build an architecture by name; ``seed`` makes its initial weights reproducible."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    if seed is None:
        return ARCHITECTURES[name](num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[name](num_classes=num_classes)


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def arch_id(model: nn.Module) -> str:
    """Stable id of an architecture: its name and the ordered parameter names and shapes."""
    name = getattr(model, "arch_name", type(model).__name__)
    parts = [name.encode()]
    for pname, p in model.named_parameters():
        parts.append(f"{pname}:{tuple(p.shape)}".encode())
    return _digest(parts)


def lineage(state: dict[str, torch.Tensor] | nn.Module) -> str:
    """Id of a set of base weights (parameters and buffers, in order): equal iff bit-identical."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    parts = []
    for name, t in state.items():
        parts.append(name.encode())
        parts.append(t.detach().to("cpu").contiguous().numpy().tobytes())
    return _digest(parts)


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Ordered parameter names and shapes: what a KT blob must match exactly."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict as an uncompressed ``.npz`` (no pickle): how a fleet's base model ships."""
    import numpy as np

    with open(path, "wb") as fh:
        np.savez(fh, **{name: t.detach().cpu().numpy() for name, t in state.items()})


def load_weights(path, model: nn.Module) -> None:
    """Load ``.npz`` weights into ``model``, checking names, shapes and finiteness first."""
    import numpy as np

    expected = model.state_dict()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz weights file: {exc}") from exc
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ValueError(f"{path}: weights do not fit {getattr(model, 'arch_name', type(model).__name__)} (missing {missing[:5]}, unexpected {extra[:5]})")
    state = {}
    for name, ref in expected.items():
        arr = arrays[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {name} has shape {arr.shape}, the model needs {tuple(ref.shape)}")
        t = torch.from_numpy(arr).to(ref.dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
        state[name] = t
    model.load_state_dict(state)
