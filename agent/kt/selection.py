"""Choosing the significant parameters: top Z of each tensor by score, or a random control mask."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from agent.kt.significant import SignificantParams, TensorSlice


def _check_z(z: float) -> None:
    if not (isinstance(z, (int, float)) and math.isfinite(z) and 0.0 < z <= 1.0):
        raise ValueError(f"z must be a fraction in (0, 1], got {z!r}")


def keep_count(numel: int, z: float) -> int:
    """How many of ``numel`` entries a fraction ``z`` keeps: ceil, and at least one."""
    _check_z(z)
    return max(1, min(numel, math.ceil(z * numel - 1e-9)))


def top_fraction(score: torch.Tensor, z: float) -> torch.Tensor:
    """Flat positions of the ``keep_count`` highest scores, sorted ascending.

    Partial selection (``np.partition``, an introselect: no full sort). Ties at the threshold go
    to the lowest positions, so the result is deterministic.

    >>> top_fraction(torch.tensor([0.1, 0.9, 0.5, 0.9]), 0.5).tolist()
    [1, 3]
    """
    flat = score.detach().reshape(-1)
    n = flat.numel()
    k = keep_count(n, z)
    if k == n:
        return torch.arange(n, device=flat.device)
    if flat.device.type != "cpu":
        return top_on_device(flat, k)
    # On CPU numpy's introselect is ~3x faster than torch.kthvalue and np.flatnonzero than
    # torch.nonzero; the same order statistic and the same tie rule, so the same positions.
    v = flat.cpu()
    values = (v if v.dtype in (torch.float32, torch.float64) else v.float()).numpy()
    keys = _order_keys(values)
    threshold = np.partition(keys, n - k)[n - k]
    mask = keys >= threshold
    # Ties at the threshold are rare in real scores, so only then pay a second pass to drop the
    # extras from the highest positions.
    extra = int(np.count_nonzero(mask)) - k
    if extra:
        mask[np.flatnonzero(keys == threshold)[-extra:]] = False
    return torch.from_numpy(np.flatnonzero(mask)).to(flat.device)


def top_on_device(flat: torch.Tensor, k: int) -> torch.Tensor:
    """`top_fraction`'s positions computed where ``flat`` lives (a GPU): no copy of the scores to the host.

    The same order statistic and tie rule (ties at the threshold go to the lowest positions) for
    finite scores; one scalar crosses to the host (the tie count).
    """
    values = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    n = values.numel()
    threshold = torch.kthvalue(values, n - k + 1).values
    mask = values >= threshold
    extra = int(mask.sum()) - k
    if extra:
        ties = torch.nonzero(values == threshold).flatten()
        mask[ties[-extra:]] = False
    return torch.nonzero(mask).flatten()


def _order_keys(v: np.ndarray) -> np.ndarray:
    """Unsigned integers in the same order as the floats ``v`` (equal floats, equal keys).

    Integer comparisons make the introselect about twice as fast. Non-negative IEEE floats
    already order as their bit patterns (sensitivity scores always are); with a sign bit set
    anywhere, -0.0 becomes +0.0 (the floats are equal) and negative patterns are flipped.
    """
    bits_dtype = np.uint32 if v.dtype == np.float32 else np.uint64
    bits = v.view(bits_dtype)
    top = bits_dtype(1) << bits_dtype(8 * v.itemsize - 1)
    if not (bits >= top).any():
        return bits
    bits = (v + v.dtype.type(0.0)).view(bits_dtype)
    return np.where(bits >= top, ~bits, bits | top)


def select(scores: Mapping[str, torch.Tensor], z: float) -> dict[str, torch.Tensor]:
    """Top ``z`` of each parameter tensor by score: name → sorted flat positions (int64)."""
    _check_z(z)
    return {name: top_fraction(s, z) for name, s in scores.items()}


def random_mask(
    shapes: Mapping[str, tuple[int, ...]], z: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The control: as many positions per tensor as ``select`` keeps, drawn uniformly at random."""
    _check_z(z)
    out = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = torch.randperm(n, generator=generator)[: keep_count(n, z)].sort().values
    return out


def significant_params(
    model: nn.Module,
    positions: Mapping[str, torch.Tensor],
    *,
    arch_id: str,
    lineage: str,
    classes: Sequence[int],
    z: float,
) -> SignificantParams:
    """Gather the model's weights at the chosen positions into a transferable bundle."""
    tensors = []
    for name, p in model.named_parameters():
        if name not in positions:
            continue
        idx = positions[name].to(torch.int64)
        # index_select copies, so the values never alias the model's weights; only the chosen
        # values cross to the host (on a GPU, not the whole tensor).
        values = p.detach().reshape(-1).index_select(0, idx.to(p.device)).to("cpu", torch.float32)
        idx = idx.cpu()
        tensors.append(TensorSlice(name=name, shape=tuple(p.shape), indices=idx, values=values))
    return SignificantParams(
        arch_id=arch_id, lineage=lineage, classes=tuple(int(c) for c in classes), z=float(z), tensors=tuple(tensors)
    )
