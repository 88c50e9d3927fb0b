"""A user's own classifier for the simulator: a small CNN with batch norm for 1x28x28 images.

What the agent asks of a model (docs/bring-your-own.md): a factory that takes ``num_classes`` (and
the scenario's ``model_args``) and returns a ``torch.nn.Module`` mapping a float32 batch
``(N, *input_shape)`` to logits ``(N, num_classes)``. The scenario beside this file names it
``small_cnn:factory`` and puts this folder on the import path (``python_path = ["."]``).
"""

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, batch norm, ReLU, 2x2 max-pool), then a two-layer head."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(2 * width * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def factory(num_classes: int, width: int = 16) -> nn.Module:
    """``width`` channels in the first block, twice as many in the second."""
    return SmallCNN(num_classes, width)
