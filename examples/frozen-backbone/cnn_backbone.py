"""A CNN with a frozen feature extractor (``backbone``) and a small trainable ``head``, for 1×28×28 images.

The shape Coral documents for learning on an Edge TPU box: the backbone runs int8 on the
accelerator (or onnxruntime, or torch), the head trains on the CPU. Used by the scenario beside
this file and by ``bench.backbone_engines``; run it with ``trainable = ["head."]``,
``backbone = "backbone"``, ``head = "head"``.
"""

import torch
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class CnnBackbone(nn.Module):
    """Three conv blocks (``width``, 2×, 4× channels) with pooling, then global average pooling: 4·width features."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *_block(1, width), nn.MaxPool2d(2),
            *_block(width, 2 * width), nn.MaxPool2d(2),
            *_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BackboneAndHead(nn.Module):
    arch_name = "cnn_backbone_head"

    def __init__(self, num_classes: int, width: int, hidden: int) -> None:
        super().__init__()
        self.backbone = CnnBackbone(width)
        self.head = nn.Sequential(nn.Linear(4 * width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def factory(num_classes: int, width: int = 32, hidden: int = 64) -> nn.Module:
    return BackboneAndHead(num_classes, width, hidden)
