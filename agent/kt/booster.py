"""Turning received significant parameters into knowledge (paper §5.2.2, Fig. 2 and 3).

``boosted_helper`` is CLUE's choice: a frozen copy of the *target's* model with the helper's
significant weights written over it (Equation 2). The others are the paper's alternatives, kept
for comparison: a zero-filled helper, and ``replace``/``average`` that change the target itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from agent.kt.significant import SignificantParams


def _write(model: nn.Module, sig: SignificantParams, *, alpha: float = 1.0) -> None:
    """w[idx] ← (1 − alpha)·w[idx] + alpha·v for every transferred slice, in place."""
    params = dict(model.named_parameters())
    for t in sig.tensors:
        if t.name not in params:
            raise KeyError(f"model has no parameter {t.name!r}")
        p = params[t.name]
        if tuple(p.shape) != t.shape:
            raise ValueError(f"{t.name}: shape {tuple(p.shape)} != transferred {t.shape}")
        flat = p.data.view(-1)
        idx = t.indices.to(flat.device)
        values = t.values.to(device=flat.device, dtype=flat.dtype)
        # index_copy_/index_select rather than flat[idx]: the same writes (indices are unique), and
        # on CPU about twice as fast as advanced indexing.
        if alpha != 1.0:
            values = flat.index_select(0, idx).mul_(1.0 - alpha).add_(values, alpha=alpha)
        flat.index_copy_(0, idx, values)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def boosted_helper(target: nn.Module, sig: SignificantParams) -> nn.Module:
    """Frozen copy of ``target`` with the significant weights overwritten (the target is untouched)."""
    helper = copy.deepcopy(target)
    _write(helper, sig)
    return _frozen(helper)


@torch.no_grad()
def zero_filled_helper(target: nn.Module, sig: SignificantParams) -> nn.Module:
    """Frozen model holding only the significant weights, every other parameter zero (paper Fig. 3)."""
    helper = copy.deepcopy(target)
    for p in helper.parameters():
        p.zero_()
    _write(helper, sig)
    return _frozen(helper)


@torch.no_grad()
def apply_replace(target: nn.Module, sig: SignificantParams) -> None:
    """Write the significant weights into the target's own weights (paper Fig. 2 'replace')."""
    _write(target, sig)


@torch.no_grad()
def apply_average(target: nn.Module, sig: SignificantParams, *, alpha: float = 0.5) -> None:
    """Average the target's weights with the significant ones (paper Fig. 2 'average')."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    _write(target, sig, alpha=alpha)
