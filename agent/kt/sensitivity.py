"""Parameter sensitivity to class outputs (paper §5.2.1): which weights matter for classes S.

For class c the sensitivity of weight W_j is |∂(Σ_batch softmax_c)/∂W_j|; for a set of requested
classes S it is the mean over S. One forward pass builds the graph and one backward pass (VJP) per
requested class reads it, so there is no Python loop over samples.

Plain Flatten/Linear/ReLU stacks (the MLPs, or any model built the same way) take a hand-written
path with the same arithmetic: one forward pass keeping each layer's input, then per layer one GEMM
for all classes of S together (∂/∂W of a dense layer is the batch sum of outer products, ``δᵀ·a``).
It avoids autograd's per-call overhead and does all classes of a layer in one GEMM; the GEMMs are
the same size, so the cost floor stays one forward pass plus |S| weight-gradient GEMMs (for |S| = 2
about one training step's arithmetic). Results equal the VJP's to float32 rounding (a GEMM may sum
in another order); the tests check both paths agree and pick the same positions.

Only trainable parameters (``requires_grad``) get a sensitivity: a frozen one is never sent, so
the autograd path does not make it a leaf and the dense path stops its backward pass at the first
layer that trains. Tied parameters count once, under ``named_parameters``' name, their gradient
summed over every use (autograd does that; the dense path refuses a stack that shares one).
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from torch.func import functional_call


def _class_output_vjp(
    model: nn.Module, x: torch.Tensor, classes: Sequence[int], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Per requested class, ``scale`` · ∂(Σ_batch softmax_c)/∂W for every parameter: tensors of shape (|S|, *W.shape).

    One forward pass, then one backward pass (a VJP) per class over the same graph. Batching the
    classes with ``torch.func.vmap`` instead (its batched convolution and batch-norm kernels) made
    ``bench.picker``'s CNN picker 3.2x a batch against 1.4x, for the same numbers to float32
    rounding.
    """
    # Detached leaves: the model's own parameters, their .grad and requires_grad stay untouched.
    # Frozen parameters are left to the module; functional_call ties a leaf to every name of its parameter.
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in trainable]
    leaves = [p.detach().requires_grad_(True) for _, p in trainable]
    buffers = {name: b for name, b in model.named_buffers()}
    was_training = model.training
    # eval(): batch-norm must use its running statistics and must not update them here.
    model.eval()
    try:
        with torch.enable_grad():
            logits = functional_call(model, (dict(zip(names, leaves)), buffers), (x,))
            totals = torch.softmax(logits, dim=1).sum(dim=0)
            per_class = [
                torch.autograd.grad(
                    totals[int(c)] * scale, leaves, retain_graph=i < len(classes) - 1, materialize_grads=True
                )
                for i, c in enumerate(classes)
            ]
    finally:
        model.train(was_training)
    return {name: torch.stack([g[j] for g in per_class]) for j, name in enumerate(names)}


def _calls_one_child(self, x):
    return self.child(x)


# The code of a forward that is exactly ``return self.<child>(x)`` (the child's name aside), as
# compiled by this interpreter: comparing code reads what a forward does, whatever its class.
_ONE_CALL = _calls_one_child.__code__


def _forward_child(module: nn.Module) -> nn.Module | None:
    """If ``module``'s forward is exactly ``return self.<child>(x)``, that child; else None."""
    code = getattr(type(module).forward, "__code__", None)
    if (
        code is None
        or code.co_code != _ONE_CALL.co_code
        or code.co_argcount != 2
        or code.co_kwonlyargcount
        or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
        or len(code.co_names) != 1
    ):
        return None
    child = dict(module.named_children()).get(code.co_names[0])
    # A property or class attribute of that name would win over the child at call time.
    return child if child is not None and getattr(module, code.co_names[0], None) is child else None


def _chain(module: nn.Module) -> list[nn.Module]:
    """The modules ``module``'s forward runs one after the other, as far as its structure tells."""
    if type(module).forward is nn.Sequential.forward:
        return [m for child in cast(nn.Sequential, module) for m in _chain(child)]
    child = _forward_child(module)
    return [module] if child is None else _chain(child)


def _dense_stack(model: nn.Module) -> list[nn.Module] | None:
    """The layers of ``model`` if its forward is exactly a Flatten/Linear/ReLU stack ending in a Linear, else None.

    Recognised by structure, whatever the model's class: ``nn.Sequential`` containers, and modules
    whose forward is ``return self.<child>(x)``, are opened up; what they run must then be an
    optional leading ``nn.Flatten()`` and ``nn.Linear`` layers, each optionally followed by an
    ``nn.ReLU``, each run once and together holding every parameter of the model. Anything else
    (other layers or activations, a forward that does more) takes the autograd path.
    """
    layers = _chain(model)
    kinds = [type(m) for m in layers]
    if not kinds or kinds[-1] is not nn.Linear or any(k not in (nn.Flatten, nn.Linear, nn.ReLU) for k in kinds):
        return None
    for i, m in enumerate(layers):
        if isinstance(m, nn.Flatten) and (i != 0 or (m.start_dim, m.end_dim) != (1, -1)):
            return None
        if isinstance(m, nn.ReLU) and (i == 0 or kinds[i - 1] is not nn.Linear):
            return None
    # A layer run twice would need its gradients summed; the hand-written path writes each once.
    if len({id(m) for m in layers}) != len(layers):
        return None
    owned = [id(p) for m in layers for p in m.parameters()]
    # A weight shared by two layers would need its gradients summed too.
    if len(set(owned)) != len(owned) or set(owned) != {id(p) for p in model.parameters()}:
        return None
    return layers


@torch.no_grad()
def _dense_class_grads(
    model: nn.Module, layers: list[nn.Module], x: torch.Tensor, classes: Sequence[int], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """``_class_output_vjp`` for a dense stack, by hand: same shapes, same values to rounding."""
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    a = x.reshape(x.shape[0], -1) if isinstance(layers[0], nn.Flatten) else x
    # Per Linear: its input, and whether that input is a ReLU's output (so the backward gates on it).
    linears: list[tuple[nn.Linear, torch.Tensor, bool]] = []
    gated = False
    for m in layers:
        if isinstance(m, nn.Linear):
            linears.append((m, a, gated))
            a, gated = m(a), False
        elif isinstance(m, nn.ReLU):
            a, gated = torch.relu(a), True
    # Below the first layer that trains, the backward pass has nothing left to compute.
    first = next(j for j, (lin, _, _) in enumerate(linears) if any(w.requires_grad for w in lin.parameters()))
    p = torch.softmax(a, dim=1)
    n, s = p.shape[0], len(classes)
    idx = torch.as_tensor(list(classes), device=p.device)
    onehot = torch.zeros(s, 1, p.shape[1], dtype=p.dtype, device=p.device)
    onehot[torch.arange(s), 0, idx] = 1.0
    # softmax's backward for the cotangent e_c on Σ_batch softmax: p ⊙ (e_c − p_c), per sample.
    delta = p.unsqueeze(0) * (onehot - p.t()[idx].unsqueeze(2))
    if scale != 1.0:
        delta.mul_(scale)
    grads: dict[str, torch.Tensor] = {}
    for j in range(len(linears) - 1, -1, -1):
        lin, a_in, relu_in = linears[j]
        out_f = lin.out_features
        if lin.weight.requires_grad:
            # All classes in one GEMM: (S·out, n) @ (n, in).
            grads[names[id(lin.weight)]] = torch.mm(delta.transpose(1, 2).reshape(s * out_f, n), a_in).view(s, out_f, -1)
        if lin.bias is not None and lin.bias.requires_grad:
            grads[names[id(lin.bias)]] = delta.sum(dim=1)
        if j == first:
            break
        delta = torch.mm(delta.reshape(s * n, out_f), lin.weight).view(s, n, -1)
        if relu_in:
            delta.mul_(a_in > 0)
    return {name: grads[name] for name in names.values()}


def class_output_grads(
    model: nn.Module, x: torch.Tensor, classes: Sequence[int], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Per class c of ``classes``, ``scale`` · ∂(Σ_batch softmax_c)/∂W over batch ``x``, per parameter.

    Returns, in ``named_parameters`` order, one tensor of shape (|S|, *W.shape) per trainable
    parameter (``requires_grad``; frozen ones are never sent, so they get none): row i
    is class ``classes[i]``'s signed gradient, for the caller to take |·| and reduce over classes as
    it needs. Dense stacks take the hand-written path, other models one VJP per class; the values
    agree to float32 rounding. The model's parameters, gradients and train/eval mode are left as
    they were.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter to take a sensitivity of")
    # ``scale`` multiplies the cotangent: the gradients are linear in it, and scaling the few
    # cotangents is cheaper than scaling |S| model-sized results afterwards.
    layers = _dense_stack(model)
    if layers is None or (x.dim() != 2 and not isinstance(layers[0], nn.Flatten)):
        return _class_output_vjp(model, x, classes, scale)
    return _dense_class_grads(model, layers, x, classes, scale)


def check_classes(model_out: int, classes: Sequence[int]) -> None:
    """Raise ValueError unless ``classes`` are distinct, at least one, and in [0, ``model_out``)."""
    if len(classes) == 0:
        raise ValueError("sensitivity needs at least one requested class")
    if len(set(classes)) != len(classes):
        raise ValueError(f"requested classes contain duplicates: {list(classes)}")
    bad = [c for c in classes if not 0 <= int(c) < model_out]
    if bad:
        raise ValueError(f"requested classes {bad} outside [0, {model_out})")


@torch.no_grad()
def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    layers = _dense_stack(model)
    if layers is not None:
        # A dense stack's width is its last Linear's: no forward pass (about 0.5 ms on the MLP).
        return int(cast(nn.Linear, layers[-1]).out_features)
    was_training = model.training
    model.eval()
    try:
        return int(model(x[:1]).shape[1])
    finally:
        model.train(was_training)


def sensitivity(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    classes: Sequence[int],
    *,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over ``classes`` of |∂(Σ softmax_c)/∂W| over the samples of ``batches``.

    ``batches`` is the helper's reservoir (the last B request batches, each (n, …) inputs); the sum
    runs over all their samples, or over ``samples`` of them drawn without replacement (with
    ``generator``) when there are more. Returns one non-negative tensor per trainable parameter,
    shaped like it.

    Why a sample is enough: the picker only needs each tensor's top-Z order, and the cost has a
    floor that does not shrink with the rows (|S| gradient tensors the size of the model), so the
    rows are what can go. On the MLP, 32 of 200 request rows keep 0.88–0.90 (Z = 0.5) and
    0.77–0.84 (Z = 0.2) of the exact top-Z positions, where a random mask keeps Z
    (``bench.picker``). The in-process experiment adapted as fast with 32 rows, but the fleet's
    default scenario did not, so the learner uses every row unless told otherwise.

    >>> from agent.models import build_model
    >>> m = build_model("mlp4", 10, seed=0)
    >>> s = sensitivity(m, [torch.rand(8, 784)], classes=[8, 9])
    >>> s["net.1.weight"].shape
    torch.Size([512, 784])
    """
    xs = [b for b in batches]
    if not xs:
        raise ValueError("sensitivity needs at least one stored batch")
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    x = torch.cat(xs, dim=0) if len(xs) > 1 else xs[0]
    if samples is not None and samples < x.shape[0]:
        rows = torch.randperm(x.shape[0], generator=generator)[:samples]
        x = x.index_select(0, rows.to(x.device))
    check_classes(_num_outputs(model, x), classes)
    # One or two classes (the usual request): 1/|S| goes into the cotangent, exact for a power of
    # two since the gradients are linear in it, and |g0| + |g1| needs no model-sized division.
    # More classes: the mean as it always was, so the scores are the same bits either way.
    if len(classes) > 2:
        grads = class_output_grads(model, x, classes)
        return {name: g.abs_().mean(dim=0) for name, g in grads.items()}
    grads = class_output_grads(model, x, classes, scale=1.0 / len(classes))
    return {name: _sum_abs(g) for name, g in grads.items()}


def _sum_abs(g: torch.Tensor) -> torch.Tensor:
    """Σ |g| over the class axis, overwriting ``g`` (a scratch tensor) to save passes."""
    out = g[0].abs_()
    for i in range(1, g.shape[0]):
        out.add_(g[i].abs_())
    return out


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
