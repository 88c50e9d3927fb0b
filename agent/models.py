"""The model architectures every node of a fleet runs, and the ids that say two models can share weights.

A node's model is named by ``model``: a built-in (``mlp4``, ``intrusion_dnn``, ``mobilenet_s``) or
the import path of the user's own factory, ``package.module:factory`` (`ModelSpec`,
`build_from_spec`). Outputs are logits over C classes. ``arch_id`` names an architecture (its
class name and ordered parameter names and shapes, and which of them are trainable); ``lineage``
names the base weights a node started from. Writing one network's weights into another only means
something when both ids agree (ARCHITECTURE §1).

**Trainable and frozen.** ``ModelSpec.trainable`` lists parameter-name prefixes (``["head."]``);
`freeze_untrainable` sets ``requires_grad = False`` on every other parameter, and from then on
``requires_grad`` is what every mechanism reads (`trainable_params`): only trainable parameters are
retrained, picked and sent in a KT blob, averaged by FedAvg and checkpointed. A module holding
parameters none of which is trainable is *frozen* (`frozen_modules`): it runs in eval mode while
the target trains (`train_mode`), so its buffers (batch-norm statistics) stay the base's too. What a
node learns is then `learnt_state`; everything else equals the shared base weights on every node,
by construction, and never travels. Tied parameters (one ``nn.Parameter`` under two names:
``state_dict`` lists both, ``named_parameters`` the first) are trainable when any of their names
matches, and travel and are stored once, under the first name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints
from torch import nn


def _dense_stack(in_features: int, widths: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """Linear + ReLU per hidden width, then the logits layer."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return layers + [nn.Linear(in_features, num_classes)]


class MLP4(nn.Module):
    """4-layer MLP for 28×28 images (≈476k parameters at 10 classes): the default model."""

    arch_name = "mlp4"

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), *_dense_stack(in_features, (512, 128, 64), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class IntrusionDNN(nn.Module):
    """4-layer DNN for the 122 NSL-KDD inputs (≈211k parameters at 5 classes, the paper's ≈209k model)."""

    arch_name = "intrusion_dnn"

    def __init__(self, num_classes: int = 5, in_features: int = 122) -> None:
        super().__init__()
        self.net = nn.Sequential(*_dense_stack(in_features, (512, 256, 64), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class MobileNetS(nn.Module):
    """MobileNet-style CNN (depthwise-separable blocks) for 1×28×28 images, for paper-scale runs."""

    arch_name = "mobilenet_s"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, side: int = 28) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            _separable(32, 64, 1),
            _separable(64, 128, 2),
            _separable(128, 128, 1),
            _separable(128, 256, 2),
            _separable(256, 256, 1),
            _separable(256, 512, 2),
            _separable(512, 512, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # Flat rows (what the feeder sends); fixed sizes keep the ONNX export traceable.
            x = x.reshape(-1, self.in_channels, self.side, self.side)
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    MLP4.arch_name: MLP4,
    IntrusionDNN.arch_name: IntrusionDNN,
    MobileNetS.arch_name: MobileNetS,
}

#: One sample's shape for each built-in (mobilenet_s also takes 1×28×28 images, but feeders send flat rows).
BUILT_IN_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    MLP4.arch_name: (784,),
    IntrusionDNN.arch_name: (122,),
    MobileNetS.arch_name: (784,),
}

#: ``package.module:factory`` (Flower's convention); the attribute may be dotted (``module:Class.create``).
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

#: What ``model_args`` may hold: values a TOML file, JSON and an environment variable all spell alike.
PlainScalar = str | int | float | bool | None
PlainValue = PlainScalar | list[PlainScalar]
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _plain_values(value: Any) -> Any:
    # Before the union of types: one line naming the key, not an error per member of the union.
    if isinstance(value, dict):
        for key, item in value.items():
            if not (isinstance(item, _PLAIN_SCALARS) or (isinstance(item, list) and all(isinstance(v, _PLAIN_SCALARS) for v in item))):
                raise ValueError(f"{key!r} is a {type(item).__name__}: the factory's arguments are strings, numbers, booleans, null or lists of them")
    return value


def _sample_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if not 1 <= len(shape) <= 8 or min(shape) < 1:
        raise ValueError(f"one sample's shape is 1 to 8 positive sizes, got {list(shape)}")
    return shape


def _distinct(prefixes: list[str]) -> list[str]:
    repeated = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if repeated:
        raise ValueError(f"trainable prefixes repeat: {repeated}")
    return prefixes


ModelArgs = Annotated[dict[str, PlainValue], BeforeValidator(_plain_values)]
#: One sample's shape: 1 to 8 positive sizes; a batch of N samples is ``(N, *shape)``.
InputShape = Annotated[tuple[StrictInt, ...], AfterValidator(_sample_shape)]
#: Parameter-name prefixes of the parameters a node trains (``["head."]``); each must match one.
TrainablePrefixes = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=256)]],
    Field(min_length=1, max_length=256),
    AfterValidator(_distinct),
]


class ModelError(ValueError):
    """A model spec that cannot be built, or builds something that is not a classifier; the message names the field."""


class ModelSpec(BaseModel):
    """Which classifier a node runs, and what one of its samples looks like.

    ``model`` is a built-in name or an import path ``package.module:factory``; the factory is called
    as ``factory(num_classes=C, **model_args)`` and must return a ``torch.nn.Module`` that maps a
    batch ``(N, *input_shape)`` of float32 to logits ``(N, C)``. ``check_spec`` checks what needs no
    import, ``build_from_spec`` the rest. ``trainable`` must be the same on every node of a fleet
    (it is part of ``arch_id``): `build_from_spec` freezes every parameter it does not match.

    >>> model = build_from_spec(ModelSpec(model="intrusion_dnn"), num_classes=5, seed=0)
    >>> model(torch.zeros(3, 122)).shape
    torch.Size([3, 5])
    """

    # ``model_args`` is a field, not pydantic's namespace.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field("mlp4", description="a built-in name or an import path package.module:factory")
    model_args: ModelArgs = Field(default_factory=dict, description="keyword arguments of the factory besides num_classes")
    input_shape: InputShape | None = Field(None, description="one sample's shape; absent: the built-in's")
    trainable: TrainablePrefixes | None = Field(
        None, description="prefixes of the parameter names a node trains, such as ['head.']; the rest stay the base's; absent: every parameter"
    )

    def sample_shape(self) -> tuple[int, ...]:
        """``input_shape``, else the built-in's; ModelError when neither is known."""
        check_input_shape(self.model, self.input_shape)
        return self.input_shape if self.input_shape is not None else BUILT_IN_INPUT_SHAPES[self.model]


def check_model_name(name: str) -> None:
    """ModelError unless ``name`` is a built-in or reads as an import path (nothing is imported)."""
    if name not in ARCHITECTURES and not _IMPORT_PATH.fullmatch(name):
        raise ModelError(
            f"model {name!r} is unknown: the built-ins are {', '.join(sorted(ARCHITECTURES))}; "
            "name your own with an import path, package.module:factory"
        )


def check_input_shape(name: str, input_shape: tuple[int, ...] | None) -> None:
    """ModelError when ``name`` is an import path and ``input_shape`` is not given (nothing else says it)."""
    if input_shape is None and name not in ARCHITECTURES:
        raise ModelError(f"input_shape is required for the import-path model {name!r}: one sample's shape, such as [784] or [3, 32, 32]")


def check_spec(spec: ModelSpec) -> None:
    """The checks that import nothing and build nothing: what settings validation can afford."""
    check_model_name(spec.model)
    check_input_shape(spec.model, spec.input_shape)


def build_from_spec(spec: ModelSpec, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """Build ``spec``'s classifier for ``num_classes`` classes and check it on two zero samples.

    ``seed`` makes its initial weights reproducible and leaves the global RNG as it was. Raises
    ModelError naming the field at fault: a name neither built in nor importable, a factory that
    raises or returns no ``nn.Module``, a forward pass that raises or gives anything but float
    logits of shape (2, num_classes), a ``trainable`` prefix that matches no parameter. Parameters
    that ``trainable`` does not match come back frozen (`freeze_untrainable`).
    """
    check_spec(spec)
    factory = _import_factory(spec.model)
    with _seeded(seed):
        try:
            model = factory(num_classes=num_classes, **spec.model_args)
        except Exception as exc:  # the user's code: whatever it raises, the operator needs its type and text
            raise ModelError(
                f"model {spec.model!r}: factory(num_classes={num_classes}, **model_args) raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec.model!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    _check_forward(spec, model, num_classes)
    freeze_untrainable(model, spec.trainable)
    return model


def build_model(name: str, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """Build a built-in by name (an import path needs an input shape: `build_from_spec`); ``seed`` as there."""
    return build_from_spec(ModelSpec(model=name), num_classes, seed=seed)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _import_factory(name: str) -> Callable[..., Any]:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the user's module: a syntax error or its own import error is as likely
        raise ModelError(f"model {name!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"model {name!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"model {name!r}: {attribute!r} is a {type(target).__name__}, not a callable factory")
    return target


def _check_forward(spec: ModelSpec, model: nn.Module, num_classes: int) -> None:
    """Two zero samples through ``model`` in eval mode; each submodule's train/eval mode is put back after."""
    shape = spec.sample_shape()
    where = f"model {spec.model!r} with input_shape {list(shape)}"
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as exc:  # the user's forward: a shape mismatch is the usual cause, and its text says so
        raise ModelError(f"{where}: a forward pass on 2 zero samples raised {type(exc).__name__}: {exc}") from exc
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ModelError(f"{where}: the forward pass returned {got}, not float logits")
    if tuple(out.shape) != (2, num_classes):
        raise ModelError(f"{where}: the forward pass on 2 samples returned shape {tuple(out.shape)}, not logits (2, num_classes={num_classes})")


def freeze_untrainable(model: nn.Module, prefixes: Sequence[str] | None) -> None:
    """Make trainable exactly the parameters of ``model`` with a name starting with one of ``prefixes``.

    A tied parameter counts as matched when any of its names is. ``None`` changes nothing: every
    parameter the factory left trainable stays so. Raises ModelError, changing nothing, when a
    prefix matches no parameter (naming it and a few of the model's parameter names).

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    >>> freeze_untrainable(net, ["1."])
    >>> [name for name, _ in trainable_params(net)]
    ['1.weight', '1.bias']
    """
    if prefixes is None:
        return
    named = list(model.named_parameters(remove_duplicate=False))
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name, _ in named)]
    if unmatched:
        names = [name for name, _ in model.named_parameters()]
        which = f"prefix {unmatched[0]!r} matches" if len(unmatched) == 1 else f"prefixes {', '.join(map(repr, unmatched))} match"
        raise ModelError(f"trainable {which} no parameter of the model; its parameters are {_listed(names, 6)}")
    matched = {id(p) for name, p in named if name.startswith(tuple(prefixes))}
    for _, p in named:
        p.requires_grad_(id(p) in matched)


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a node trains and exchanges, as ``named_parameters`` orders and names them."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def frozen_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules holding parameters none of which is trainable ("" for ``model`` itself).

    They run in eval mode while the target trains (`train_mode`): a frozen feature extractor's
    batch-norm statistics and dropout must not move either, or it would drift apart from the
    base that every node shares.
    """
    if all(p.requires_grad for p in model.parameters()):
        return []
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append((prefix, module))
            return
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return found


def train_mode(model: nn.Module) -> None:
    """``model.train()``, with its frozen modules (`frozen_modules`) left in eval mode."""
    model.train()
    for _, module in frozen_modules(model):
        module.eval()


def learnt_state(model: nn.Module, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """What a node learns, in ``state_dict`` order: its trainable parameters and the persistent
    buffers outside frozen modules, each tensor once (a tied one under its first name).

    The rest of the ``state_dict`` equals the shared base weights on every node: FedAvg sends and
    a checkpoint stores only this. ``keep_vars`` as in ``state_dict``: the live tensors.
    """
    frozen = tuple(f"{name}." if name else "" for name, _ in frozen_modules(model))
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    # One pass over the live entries; a tied tensor's first name in state_dict order is the one
    # named_parameters (and named_buffers) gives it: both walk the modules in the same order.
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if (t.requires_grad if isinstance(t, nn.Parameter) else not name.startswith(frozen)):
            out[name] = t if keep_vars else t.detach()
    return out


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def arch_id(model: nn.Module) -> str:
    """Stable id of an architecture: its name, the ordered parameter names and shapes, and which are trainable.

    Two nodes that train different parameters must not exchange KT blobs or FedAvg updates, and
    the MdS pairs nodes by this id. With every parameter trainable the id is what it always was.
    """
    name = getattr(model, "arch_name", type(model).__name__)
    parts = [name.encode()]
    for pname, p in model.named_parameters():
        parts.append(f"{pname}:{tuple(p.shape)}".encode())
    if not all(p.requires_grad for p in model.parameters()):
        parts.append(("trainable:" + ",".join(pname for pname, _ in trainable_params(model))).encode())
    return _digest(parts)


def lineage(state: dict[str, torch.Tensor] | nn.Module) -> str:
    """Id of a set of base weights (parameters and buffers, in order): equal iff bit-identical."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    parts = []
    for name, t in state.items():
        parts.append(name.encode())
        parts.append(t.detach().to("cpu").contiguous().numpy().tobytes())
    return _digest(parts)


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Ordered names and shapes of the trainable parameters: what a KT blob must match exactly."""
    return {name: tuple(p.shape) for name, p in trainable_params(model)}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(path: str | Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict as ``.safetensors`` when ``path`` ends so, else as an uncompressed ``.npz``.

    Neither format holds code (no pickle): this is how a fleet's base model ships.
    """
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        # A copy each: safetensors refuses tensors that share memory (tied weights).
        save_file({name: t.detach().cpu().contiguous().clone() for name, t in state.items()}, str(path))
        return
    import numpy as np

    with open(path, "wb") as fh:
        np.savez(fh, **{name: t.detach().cpu().numpy() for name, t in state.items()})


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load ``.safetensors`` or ``.npz`` weights into ``model``, checking the whole file first.

    A file that does not fit is refused with one ValueError naming the tensors it lacks, those the
    model lacks and those of another shape; NaN or infinite values are refused too.
    """
    tensors = _read_tensors(Path(path))
    expected = model.state_dict()
    _check_fit(path, tensors, expected, getattr(model, "arch_name", type(model).__name__))
    state = {}
    for name, ref in expected.items():
        t = tensors[name].to(ref.dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
        state[name] = t
    model.load_state_dict(state)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{path}: not a readable .safetensors weights file: {exc}") from exc
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: torch.from_numpy(npz[name]) for name in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz weights file: {exc}") from exc


def _check_fit(path: str | Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model_name: str) -> None:
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    misshaped = [
        f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(ref.shape)}"
        for name, ref in expected.items()
        if name in tensors and tuple(tensors[name].shape) != tuple(ref.shape)
    ]
    problems = [f"{label} ({_listed(names)})" for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if problems:
        raise ValueError(f"{path}: weights do not fit {model_name}: " + "; ".join(problems))


def _listed(items: list[str], limit: int = 10) -> str:
    """``n: a, b, …`` with at most ``limit`` items named: a foreign file can differ in thousands of tensors."""
    shown = ", ".join(items[:limit])
    return f"{len(items)}: {shown}" + (f", … and {len(items) - limit} more" if len(items) > limit else "")
