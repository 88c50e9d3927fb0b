"""Vetting received significant parameters before they serve: does the blob answer the request,
and does the helper built from it work?

``codec.decode_blob`` proves a blob well formed and made for this model. A well-formed blob can
still be useless or hostile: for other classes than asked, a handful of parameters where ``z`` of
every tensor was asked, values far outside anything the shared base could have trained into
(finite, so the codec passes them), or a helper whose outputs overflow or are worse than chance.
These checks refuse such a blob with :class:`KtRejected` before it is installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from agent.kt.errors import KtRejected
from agent.kt.selection import keep_count
from agent.kt.significant import SignificantParams

# A helper selects exactly keep_count(numel, z) entries per tensor (selection.select and
# random_mask); the slack only forgives a helper that rounds z·numel another way.
COUNT_SLACK = 0.01
# Helper and target descend from one base: on the test fleet the helper's significant values
# reach at most 1.11x the target's largest weight of the same tensor, after 150 more batches of
# training. 10x leaves room for long divergence and still refuses values that blow the outputs
# up (3e38 passes the codec's finiteness check). The floor is for tensors the target holds near
# zero (a zero-initialised bias): any weight up to 1 is ordinary there.
VALUE_FACTOR = 10.0
VALUE_FLOOR = 1.0


def vet_significant(
    sig: SignificantParams,
    *,
    classes: Sequence[int],
    z: float,
    reference: Mapping[str, torch.Tensor],
    count_slack: float = COUNT_SLACK,
    value_factor: float = VALUE_FACTOR,
    value_floor: float = VALUE_FLOOR,
) -> None:
    """Refuse ``sig`` unless it answers a request for ``classes`` at ``z`` on ``reference``.

    ``reference`` is the target's own parameters by name (what ``named_parameters`` gives). The
    blob must carry exactly the requested classes and ``z``; every tensor of ``reference`` and no
    other; ``k = keep_count(numel, z)`` entries of each, to within ``1 + count_slack * k``; and
    values no larger than ``max(value_factor * max|reference tensor|, value_floor)``.
    """
    asked = sorted(int(c) for c in classes)
    if sorted(sig.classes) != asked:
        raise KtRejected(f"blob carries classes {sorted(sig.classes)}, {asked} were asked for")
    if sig.z != float(z):
        raise KtRejected(f"blob carries z={sig.z}, {float(z)} was asked for")
    got = sig.by_name()
    missing = sorted(set(reference) - set(got))
    if missing:
        raise KtRejected(f"blob lacks tensors {missing}")
    unknown = sorted(set(got) - set(reference))
    if unknown:
        raise KtRejected(f"blob carries tensors {unknown} that the model lacks")
    for name, ref in reference.items():
        t = got[name]
        n, numel = int(t.indices.numel()), ref.numel()
        want = keep_count(numel, z)
        if abs(n - want) > 1 + count_slack * want:
            raise KtRejected(
                f"tensor {name!r} carries {n} of {numel} parameters, z={float(z)} asks for {want}"
            )
        if n == 0:
            continue
        bound = max(value_factor * float(ref.detach().abs().max()), value_floor)
        peak = float(t.values.abs().max())
        # not (peak <= bound): a NaN peak is refused too.
        if not peak <= bound:
            raise KtRejected(f"tensor {name!r} carries values up to {peak:.3g}, over its bound {bound:.3g}")


@torch.no_grad()
def vet_helper_outputs(
    helper: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    classes: Sequence[int],
    num_classes: int,
) -> torch.Tensor:
    """Refuse a helper whose outputs on ``x`` (a recent batch) overflow or are worse than chance;
    return those outputs (logits), so that the caller need not compute them again.

    Outputs must all be finite. Where ``y`` labels some samples of ``classes`` (the classes the
    helper brings), the helper must get at least a ``1 / num_classes`` share of those right, what
    guessing uniformly would; otherwise finiteness is all there is to check. ``helper`` is used as
    it is (``boosted_helper`` gives it in eval mode) and left unchanged.
    """
    out = helper(x)
    if not bool(torch.isfinite(out).all()):
        raise KtRejected("helper's outputs on the last batch are not finite")
    if y is None:
        return out
    mask = torch.isin(y, torch.as_tensor([int(c) for c in classes], device=y.device))
    n = int(mask.sum())
    if n == 0:
        return out
    right = int((out.argmax(dim=1)[mask] == y[mask]).sum())
    # right / n < 1 / num_classes, in integers.
    if right * num_classes < n:
        raise KtRejected(
            f"helper gets {right} of {n} samples of classes {sorted(int(c) for c in classes)} right"
            f" on the last batch, below chance (1/{num_classes})"
        )
    return out
