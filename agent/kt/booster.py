"""Turning received significant parameters into knowledge (paper §5.2.2, Fig. 2 and 3).

``boosted_helper`` is CLUE's choice: a frozen copy of the *target's* model with the helper's
significant weights written over it (Equation 2). ``branch`` (ours, the default) pools the same
frozen boosted model *and* a live copy of it that keeps training beside the target on the same
labelled batches (the target with the knowledge written in, as ``replace`` would leave it, but
on the side): the learner promotes the live copy into the target once it has proved better, and
the old target stays pooled in its place, still learning, as a guard for the classes the helper
never saw. The others are the paper's
alternatives, kept for comparison: a zero-filled helper, and ``replace``/``average`` that change
the target itself.
Each is a `KnowledgeUse`, built from the node's ``kt_apply`` config (`KtApplyConfig`).

Buffers (batch-norm running statistics and the like) never travel in a blob: a boosted or
zero-filled helper keeps the *target's* buffers, as it keeps every weight the blob does not
carry, and a live branch then updates its own as it trains. Frozen parameters (``requires_grad``
False on the target: the shared base's, `agent.models.freeze_untrainable`) are never sent either;
a helper keeps the target's, the zero-filled one too (they are the base every node holds, not
knowledge the helper brought), and a live branch leaves them frozen.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from agent.kt.errors import KtRejected
from agent.kt.significant import SignificantParams
from agent.kt.strategy import NamedStrategyConfig

# Attribute types a module copy may share with its original: immutable, and holding no tensor.
_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device})
# Containers every module carries (its registries, hook tables, non-persistent buffer names).
_CONTAINERS = frozenset({dict, OrderedDict, list, set})


class _AliasedBuffers(Exception):
    """Two buffers of the model view one storage: only deepcopy keeps them that way."""


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
        # scatter_/index_select rather than flat[idx]: the same writes (indices are unique), and on
        # CPU about twice as fast as advanced indexing (scatter_ a fifth faster than index_copy_).
        if alpha != 1.0:
            values = flat.index_select(0, idx).mul_(1.0 - alpha).add_(values, alpha=alpha)
        flat.scatter_(0, idx, values)


def _is_atomic(value: object) -> bool:
    if type(value) is tuple:
        return all(_is_atomic(v) for v in value)
    return type(value) in _ATOMIC


def _clone_tensor(t: torch.Tensor, memo: dict[int, Any], zero: bool) -> torch.Tensor:
    new = memo.get(id(t))
    if new is not None:
        return new
    # Only a trainable parameter is zeroed: a frozen one is the base every node holds.
    zero = zero and t.requires_grad
    if type(t) is nn.Parameter or type(t) is torch.Tensor:
        data = torch.zeros_like(t) if zero else t.detach().clone(memory_format=torch.preserve_format)
        new = nn.Parameter(data, False) if type(t) is nn.Parameter else data
    else:
        # A tensor subclass may copy itself its own way.
        new = copy.deepcopy(t, memo)
        new.requires_grad_(False)
        new.grad = None
        if zero:
            new.zero_()
    memo[id(t)] = new
    return new


def _clone_buffer(t: torch.Tensor, memo: dict[int, Any], storages: set[int]) -> torch.Tensor:
    if id(t) not in memo and t.numel():
        # deepcopy keeps buffers that view one storage as views of one new storage; cloning
        # them one by one would part them. (Parameters are cloned one by one by deepcopy too.)
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            raise _AliasedBuffers
        storages.add(ptr)
    return _clone_tensor(t, memo, False)


def _clone_module(module: nn.Module, memo: dict[int, Any], storages: set[int], zero: bool) -> nn.Module:
    new = memo.get(id(module))
    if new is not None:
        return new
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC:
            pass
        elif kind in _CONTAINERS:
            if key == "_parameters":
                value = kind((k, p if p is None else _clone_tensor(p, memo, zero)) for k, p in value.items())
            elif key == "_buffers":
                value = kind((k, b if b is None else _clone_buffer(b, memo, storages)) for k, b in value.items())
            elif key == "_modules":
                value = kind((k, m if m is None else _clone_module(m, memo, storages, zero)) for k, m in value.items())
            elif value:
                value = copy.deepcopy(value, memo)
            else:
                value = kind()
        elif isinstance(value, torch.Tensor):
            value = _clone_buffer(value, memo, storages)
        elif not _is_atomic(value):
            # Anything else (a hook, a submodule held outside _modules, an enum): what deepcopy
            # makes of it, reusing the tensors and modules already copied.
            value = copy.deepcopy(value, memo)
        state[key] = value
    new.__dict__.update(state)
    return new


@torch.no_grad()
def frozen_copy(model: nn.Module, *, zero_params: bool = False) -> nn.Module:
    """An independent copy of ``model`` in eval mode with every parameter ``requires_grad=False``.

    What ``copy.deepcopy`` then ``eval()`` and ``requires_grad_(False)`` give, without deepcopy's
    per-object overhead (a third of its time on the MLP, a quarter on the CNN): each module is
    copied attribute by attribute, its parameters, buffers and tensor attributes are cloned (no
    storage is shared with ``model``, no gradient is copied, nothing requires grad), immutable
    attributes are shared, empty containers made anew, and only what is left (a padding list, a
    registered hook) goes through deepcopy. Tied parameters stay tied; a model whose buffers view
    one another's storage is deep-copied whole, which keeps them so. ``model`` is left as it was.
    With ``zero_params`` every parameter that ``model`` trains (``requires_grad``) is zero in the
    copy; frozen parameters and buffers are still copied.

    >>> net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    >>> frozen = frozen_copy(net)
    >>> frozen.training, frozen[0].weight.requires_grad, net.training, net[0].weight.requires_grad
    (False, False, True, True)
    >>> frozen[0].weight.data_ptr() != net[0].weight.data_ptr()
    True
    """
    try:
        copied = _clone_module(model, {}, set(), zero_params)
    except _AliasedBuffers:
        copied = copy.deepcopy(model)
        for source, p in zip(model.parameters(), copied.parameters()):
            p.requires_grad_(False)
            p.grad = None
            if zero_params and source.requires_grad:
                p.zero_()
    return copied.eval()


@torch.no_grad()
def boosted_helper(target: nn.Module, sig: SignificantParams) -> nn.Module:
    """Frozen copy of ``target`` with the significant weights overwritten (the target is untouched)."""
    helper = frozen_copy(target)
    _write(helper, sig)
    return helper


@torch.no_grad()
def zero_filled_helper(target: nn.Module, sig: SignificantParams) -> nn.Module:
    """Frozen model holding only the significant weights, every other trainable parameter zero (paper Fig. 3)."""
    helper = frozen_copy(target, zero_params=True)
    _write(helper, sig)
    return helper


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


class KnowledgeUse(ABC):
    """What a target does with received significant parameters (``kt_apply``)."""

    name: ClassVar[str]
    #: False only for ``off``: this node takes no knowledge, so it asks for none.
    enabled: ClassVar[bool] = True
    #: The pooled model keeps learning beside the target and may be promoted into it.
    branches: ClassVar[bool] = False

    @abstractmethod
    def use(self, target: nn.Module, sig: SignificantParams, boosted: nn.Module | None = None) -> nn.Module | None:
        """A frozen helper model to pool, or None once the target itself was changed.

        ``boosted``: the boosted helper already built from ``sig`` (to vet it), reused if wanted.
        """


class BoostedHelperUse(KnowledgeUse):
    name = "boost"

    def use(self, target, sig, boosted=None):
        return boosted if boosted is not None else boosted_helper(target, sig)


class BranchUse(KnowledgeUse):
    """The boosted helper, pooled frozen (what the helper knew) beside a live copy of it that the
    learner trains on every labelled batch and may promote into the target (``live_branch``)."""

    name = "branch"
    branches = True

    def use(self, target, sig, boosted=None):
        return boosted if boosted is not None else boosted_helper(target, sig)


@torch.no_grad()
def live_branch(model: nn.Module, trainable: Collection[str]) -> nn.Module:
    """An independent copy of ``model`` (a boosted helper that keeps learning) that trains the
    parameters named in ``trainable`` (the target's), the others left frozen."""
    branch = frozen_copy(model)
    for name, p in branch.named_parameters():
        p.requires_grad_(name in trainable)
    return branch


class ZeroFilledHelperUse(KnowledgeUse):
    name = "zero_filled"

    def use(self, target, sig, boosted=None):
        return zero_filled_helper(target, sig)


class ReplaceUse(KnowledgeUse):
    name = "replace"

    def use(self, target, sig, boosted=None):
        apply_replace(target, sig)
        return None


class AverageUse(KnowledgeUse):
    name = "average"

    def use(self, target, sig, boosted=None):
        apply_average(target, sig)
        return None


class NoKnowledgeUse(KnowledgeUse):
    name = "off"
    enabled = False

    def use(self, target, sig, boosted=None):
        raise KtRejected("knowledge transfer is off on this node (kt_apply = 'off')")


KNOWLEDGE_USES: dict[str, type[KnowledgeUse]] = {
    cls.name: cls for cls in (BranchUse, BoostedHelperUse, ZeroFilledHelperUse, ReplaceUse, AverageUse, NoKnowledgeUse)
}


class KtApplyConfig(NamedStrategyConfig):
    """How received knowledge is used: a boosted model that keeps learning and may be promoted into
    the target (ours), a frozen boosted helper model (the paper's CLUE), a zero-filled helper,
    written into the target, averaged into it, or not at all (isolated learning)."""

    type: Literal["branch", "boost", "zero_filled", "replace", "average", "off"] = "branch"

    def build(self) -> KnowledgeUse:
        return KNOWLEDGE_USES[self.type]()
