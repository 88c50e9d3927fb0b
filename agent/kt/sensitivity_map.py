"""The continuous picker (paper §5.2.1): a running per-class sensitivity map, factored and rotated.

The on-demand picker (``agent.kt.sensitivity.sensitivity``) runs a backward pass over the
reservoir when a request comes; the continuous picker keeps the answer ready. Keeping the exact map
(|∂(Σ softmax_c)/∂W| per class per weight, every class after every batch) costs C times the model's
memory and more than a training step per batch, so this one stores and refreshes less:

- **Factored.** A weight tensor (viewed as a matrix ``shape[0] × prod(shape[1:])``) keeps, per
  class, only the row sums and column sums of |G_c|; a lookup rebuilds the rank-1 estimate
  ``outer(rows, cols) / total``. Callers only rank positions within a tensor (top Z), and on the
  MLP that ranking recovers most of the exact top-Z positions (figures below; random would
  recover Z). 1-D tensors (biases, norms) are small and keep their full vector. Memory is
  ~C·Σ(rows + cols) floats, a few percent of the model.
- **Rotated.** Each update refreshes only ``classes_per_update`` classes, round-robin, on a random
  subset of at most ``samples`` rows of the batch: one forward pass on those rows and a few
  weight-gradient GEMMs, a fraction of the training step it follows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from agent.kt.sensitivity import check_classes, class_output_grads


class SensitivityMap:
    """The continuous picker: per-class sensitivity marginals, a few classes refreshed per batch.

    Per class c and parameter W, an exponential moving average (``decay`` per refresh of c) of
    |∂(Σ_batch softmax_c)/∂W|, stored as row and column sums for tensors of two or more dims and
    in full for 1-D ones. A refresh uses at most ``samples`` rows of the batch, drawn at random, and
    scales the sums by rows ÷ samples so they stay on the scale of the whole batch (the on-demand
    picker's scale). A class's first refresh sets its average instead of blending it with zeros:
    classes are refreshed at different times, and a lookup averages several of them, so none may
    start biased towards zero.

    ``lookup`` needs every requested class refreshed at least once (``covers``); with the default
    one class per update that takes ``num_classes`` updates, and until then the caller answers
    from its reservoir.

    Defaults, on the MLP with Fashion-MNIST batches of 200 and online Adam training
    (``bench.picker``): one class and 16 rows per update cost ~0.2× a batch (predict + train), and
    a lookup keeps ~0.87 (Z = 0.5) and ~0.73–0.78 (Z = 0.2) of the exact pick's positions, where a
    random mask keeps Z. More rows per update cost more for little more overlap. ``decay`` = 0.5
    per refresh averages about two refreshes, which damps the 16-row noise; with ten classes that
    is ~20 batches, so the map still follows a model that trains online.

    >>> from agent.models import build_model
    >>> m = build_model("mlp4", 10, seed=0)
    >>> smap = SensitivityMap(m, 10, classes_per_update=5)
    >>> smap.update(m, torch.rand(64, 784)); smap.update(m, torch.rand(64, 784))
    >>> smap.covers([8, 9]), smap.lookup([8, 9])["net.1.weight"].shape
    (True, torch.Size([512, 784]))
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        decay: float = 0.5,
        samples: int = 16,
        classes_per_update: int = 1,
        seed: int = 0,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int ≥ 1, got {samples!r}")
        if (
            isinstance(classes_per_update, bool)
            or not isinstance(classes_per_update, int)
            or not 1 <= classes_per_update <= num_classes
        ):
            raise ValueError(f"classes_per_update must be an int in [1, {num_classes}], got {classes_per_update!r}")
        self.num_classes = num_classes
        self.decay = float(decay)
        self.samples = samples
        self.classes_per_update = classes_per_update
        self.updates = 0
        self._next = 0
        self._refreshes = [0] * num_classes
        self._gen = torch.Generator().manual_seed(seed)
        # The trainable parameters only: what ``class_output_grads`` returns and a helper sends.
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        device = params[0][1].device if params else torch.device("cpu")
        # One flat float32 row per class holds every parameter's marginals side by side, so an
        # update's moving average is two ops per class instead of two per class per tensor.
        # name → (shape, offset, rows, cols): a tensor of ≥ 2 dims keeps rows then cols
        # (shape[0] and prod(shape[1:]) floats); a 1-D one keeps rows = numel, cols = 0 (in full).
        self._layout: dict[str, tuple[torch.Size, int, int, int]] = {}
        width = 0
        for name, p in params:
            rows, cols = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 else (p.numel(), 0)
            self._layout[name] = (p.shape, width, rows, cols)
            width += rows + cols
        self._store = torch.zeros(num_classes, width, dtype=torch.float32, device=device)
        self._fresh = torch.empty(classes_per_update, width, dtype=torch.float32, device=device)

    def next_classes(self) -> tuple[int, ...]:
        """The classes the next ``update`` refreshes (round-robin from class 0)."""
        return tuple((self._next + i) % self.num_classes for i in range(self.classes_per_update))

    def update(self, model: nn.Module, x: torch.Tensor) -> None:
        """Refresh the next ``classes_per_update`` classes from (a random subset of) batch ``x``."""
        n = x.shape[0]
        if n == 0:
            raise ValueError("the sensitivity map needs a non-empty batch")
        classes = self.next_classes()
        if n > self.samples:
            idx = torch.randperm(n, generator=self._gen)[: self.samples]
            x = x.index_select(0, idx.to(x.device))
        grads = class_output_grads(model, x, classes)
        fresh = self._fresh
        for name, g in grads.items():
            _, off, rows, cols = self._layout[name]
            g = g.abs_()
            if cols:
                g = g.view(len(classes), rows, cols)
                torch.sum(g, dim=2, out=fresh[:, off : off + rows])
                torch.sum(g, dim=1, out=fresh[:, off + rows : off + rows + cols])
            else:
                fresh[:, off : off + rows].copy_(g.view(len(classes), rows))
        # Rows ÷ samples: the sums stay on the scale of the whole batch, the on-demand picker's.
        scale = n / x.shape[0]
        for i, c in enumerate(classes):
            if self._refreshes[c]:
                self._store[c].mul_(self.decay).add_(fresh[i], alpha=scale * (1.0 - self.decay))
            else:
                # A first refresh sets the average: blending with zeros would bias it low.
                torch.mul(fresh[i], scale, out=self._store[c])
            self._refreshes[c] += 1
        self._next = (self._next + self.classes_per_update) % self.num_classes
        self.updates += 1

    def covers(self, classes: Sequence[int]) -> bool:
        """Whether every class of ``classes`` has been refreshed at least once (so ``lookup`` answers)."""
        check_classes(self.num_classes, classes)
        return all(self._refreshes[int(c)] for c in classes)

    def lookup(self, classes: Sequence[int]) -> dict[str, torch.Tensor]:
        """Mean over ``classes`` of the estimated sensitivity, per parameter (float32, its shape).

        A tensor of two or more dims gets, per class, the rank-1 estimate from its marginals
        (whose row and column sums equal the stored ones); 1-D tensors get the stored vectors.
        Raises ValueError naming any requested class not refreshed yet.
        """
        check_classes(self.num_classes, classes)
        unseen = [int(c) for c in classes if not self._refreshes[int(c)]]
        if unseen:
            raise ValueError(
                f"the sensitivity map has not yet seen classes {unseen} "
                f"({self.updates} updates, {self.classes_per_update} class(es) each)"
            )
        picked = self._store.index_select(0, torch.as_tensor([int(c) for c in classes], device=self._store.device))
        out: dict[str, torch.Tensor] = {}
        for name, (shape, off, rows, cols) in self._layout.items():
            r = picked[:, off : off + rows]
            if not cols:
                out[name] = r.mean(dim=0).view(shape)
                continue
            total = r.sum(dim=1, keepdim=True)
            # A class with no sensitivity at all on this tensor contributes zeros, not NaN.
            r = torch.where(total > 0, r / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
            # Σ_c outer(rows_c / total_c, cols_c) ÷ |S| as one GEMM over the class axis.
            out[name] = (r.t() @ picked[:, off + rows : off + rows + cols]).div_(len(classes)).view(shape)
        return out

    @property
    def nbytes(self) -> int:
        """Memory held by the map, in bytes."""
        # The scratch row an update fills counts too: it lives as long as the map.
        return (self._store.numel() + self._fresh.numel()) * self._store.element_size()
