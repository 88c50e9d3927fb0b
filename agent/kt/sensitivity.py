"""Parameter sensitivity to class outputs (paper §5.2.1): which weights matter for classes S.

For class c the sensitivity of weight W_j is |∂(Σ_batch softmax_c)/∂W_j|; for a set of requested
classes S it is the mean over S. One vectorised VJP per parameter set computes every class in S at
once (``torch.func.vmap`` over one-hot cotangents), so there is no Python loop over samples or
classes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap


def _class_output_vjp(
    model: nn.Module, x: torch.Tensor, classes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Per requested class, ∂(Σ_batch softmax_c)/∂W for every parameter: tensors of shape (|S|, *W.shape)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}

    def class_totals(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x,))
        return torch.softmax(logits, dim=1).sum(dim=0)

    was_training = model.training
    # eval(): batch-norm must use its running statistics and must not update them here.
    model.eval()
    try:
        totals, pullback = vjp(class_totals, params)
        cotangents = torch.zeros(len(classes), totals.shape[0], dtype=totals.dtype, device=totals.device)
        cotangents[torch.arange(len(classes)), torch.as_tensor(list(classes), device=totals.device)] = 1.0
        (grads,) = vmap(pullback)(cotangents)
    finally:
        model.train(was_training)
    return grads


def _check_classes(model_out: int, classes: Sequence[int]) -> None:
    if len(classes) == 0:
        raise ValueError("sensitivity needs at least one requested class")
    if len(set(classes)) != len(classes):
        raise ValueError(f"requested classes contain duplicates: {list(classes)}")
    bad = [c for c in classes if not 0 <= int(c) < model_out]
    if bad:
        raise ValueError(f"requested classes {bad} outside [0, {model_out})")


@torch.no_grad()
def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        return int(model(x[:1]).shape[1])
    finally:
        model.train(was_training)


def sensitivity(
    model: nn.Module, batches: Iterable[torch.Tensor], classes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Mean over ``classes`` of |∂(Σ softmax_c)/∂W| over the samples of ``batches``.

    ``batches`` is the helper's reservoir (the last B request batches, each (n, …) inputs); the sum
    runs over all their samples. Returns one non-negative tensor per parameter, shaped like it.

    >>> from agent.models import build_model
    >>> m = build_model("mlp4", 10, seed=0)
    >>> s = sensitivity(m, [torch.rand(8, 784)], classes=[8, 9])
    >>> s["net.1.weight"].shape
    torch.Size([512, 784])
    """
    xs = [b for b in batches]
    if not xs:
        raise ValueError("sensitivity needs at least one stored batch")
    x = torch.cat(xs, dim=0)
    _check_classes(_num_outputs(model, x), classes)
    grads = _class_output_vjp(model, x, classes)
    return {name: g.abs().mean(dim=0) for name, g in grads.items()}


class SensitivityMap:
    """The continuous picker: per-class sensitivity kept up to date after every batch.

    Each update adds |∂(Σ softmax_c)/∂W| of the new batch for every class into an exponential
    moving average (``decay`` per batch), so a request is a lookup and a mean instead of a fresh
    backward pass. Stored in ``dtype`` (float16 by default) to halve the memory; ranking only needs
    the order of the scores, not their last bits.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        decay: float = 0.9,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_classes = num_classes
        self.decay = decay
        self.updates = 0
        self._maps = {
            name: torch.zeros((num_classes, *p.shape), dtype=dtype, device=p.device)
            for name, p in model.named_parameters()
        }

    def update(self, model: nn.Module, x: torch.Tensor) -> None:
        """Fold one batch's per-class sensitivity into the map."""
        grads = _class_output_vjp(model, x, range(self.num_classes))
        for name, g in grads.items():
            m = self._maps[name]
            m.mul_(self.decay).add_(g.abs().to(m.dtype), alpha=1.0 - self.decay)
        self.updates += 1

    def lookup(self, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        """Mean over ``classes`` of the stored sensitivity, per parameter (float32)."""
        if self.updates == 0:
            raise ValueError("the sensitivity map has seen no batch yet")
        _check_classes(self.num_classes, classes)
        idx = torch.as_tensor(list(classes))
        return {name: m[idx.to(m.device)].float().mean(dim=0) for name, m in self._maps.items()}

    @property
    def nbytes(self) -> int:
        """Memory held by the map, in bytes."""
        return sum(m.numel() * m.element_size() for m in self._maps.values())


class Reservoir:
    """The helper's last B request batches (inputs only), for the on-demand picker."""

    def __init__(self, batches: int) -> None:
        if batches < 1:
            raise ValueError(f"reservoir needs at least one batch, got {batches}")
        self._items: deque[torch.Tensor] = deque(maxlen=batches)

    def add(self, x: torch.Tensor) -> None:
        self._items.append(x.detach())

    def resize(self, batches: int) -> None:
        if batches < 1:
            raise ValueError(f"reservoir needs at least one batch, got {batches}")
        self._items = deque(self._items, maxlen=batches)

    def batches(self) -> list[torch.Tensor]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items)
