"""The significant parameters a helper sends: per tensor, flat positions and their values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSlice:
    """Selected entries of one parameter tensor.

    ``indices`` are flat positions into the tensor (int64, 1-D, strictly increasing);
    ``values`` are the helper's weights at those positions (float32, 1-D, same length).
    """

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SignificantParams:
    """Everything a target needs to build a helper model, before or after the wire."""

    arch_id: str
    lineage: str
    classes: tuple[int, ...]
    z: float
    tensors: tuple[TensorSlice, ...]

    @property
    def count(self) -> int:
        """Number of transferred parameters."""
        return sum(int(t.indices.numel()) for t in self.tensors)

    def by_name(self) -> dict[str, TensorSlice]:
        return {t.name: t for t in self.tensors}
